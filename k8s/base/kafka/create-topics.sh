#!/usr/bin/env bash
# Creates the shop's topics (one a line in $TOPICS_FILE: the name, then any topic configs as
# key=value, e.g. cleanup.policy=compact) if they do not exist yet, with
# PARTITIONS partitions, REPLICATION_FACTOR replicas and MIN_INSYNC_REPLICAS. Idempotent: the
# Job may run on every deploy. Used by the `kafka-topics` Job and by compose.yaml.
set -euo pipefail

: "${BOOTSTRAP:?}" "${TOPICS_FILE:?}"
topics=${KAFKA_HOME:-/opt/kafka}/bin/kafka-topics.sh

for attempt in $(seq 1 60); do
    "$topics" --bootstrap-server "$BOOTSTRAP" --list >/dev/null 2>&1 && break
    echo "waiting for Kafka at $BOOTSTRAP ($attempt)"
    sleep 5
done

grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$TOPICS_FILE" | while read -r topic settings; do
    extra=()
    for setting in $settings; do  # a line may add topic configs: name key=value ...
        extra+=(--config "$setting")
    done
    "$topics" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$topic" \
        --partitions "${PARTITIONS:-3}" --replication-factor "${REPLICATION_FACTOR:-1}" \
        --config "min.insync.replicas=${MIN_INSYNC_REPLICAS:-1}" "${extra[@]}"
done
"$topics" --bootstrap-server "$BOOTSTRAP" --describe --topics-with-overrides
