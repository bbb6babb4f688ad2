#!/usr/bin/env bash
# PostgreSQL's docker-entrypoint-initdb.d hook: runs once, when the server initialises its
# empty data directory. For each service in SHOP_DATABASES it creates a login role named after
# the service and a database shop_<service> owned by it, with the password from
# <SERVICE>_DB_PASSWORD (a Secret). Only the owner may connect to its database.
# Later password changes are made with ALTER ROLE, not here.
set -euo pipefail

for service in ${SHOP_DATABASES:?SHOP_DATABASES is not set}; do
    variable="${service^^}_DB_PASSWORD"
    password="${!variable:?$variable is not set}"
    psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
        -v role="$service" -v db="shop_$service" -v password="$password" <<'SQL'
create role :"role" login password :'password';
create database :"db" owner :"role";
revoke all on database :"db" from public;
SQL
    echo "init-databases: role $service, database shop_$service"
done
