// MongoDB's docker-entrypoint-initdb.d hook (mongosh): runs once, when the server starts on an
// empty data directory. For each service in SHOP_DATABASES it creates a user named after the
// service with readWrite on database shop_<service> only, password from
// <SERVICE>_MONGO_PASSWORD (a Secret).
const services = (process.env.SHOP_DATABASES || "").split(/\s+/).filter(Boolean);
if (services.length === 0) {
  throw new Error("SHOP_DATABASES is not set");
}
for (const service of services) {
  const variable = `${service.toUpperCase()}_MONGO_PASSWORD`;
  const password = process.env[variable];
  if (!password) {
    throw new Error(`${variable} is not set`);
  }
  const database = `shop_${service}`;
  db.getSiblingDB(database).createUser({
    user: service,
    pwd: password,
    roles: [{ role: "readWrite", db: database }],
  });
  print(`init-databases: user ${service}, database ${database}`);
}
