#!/usr/bin/env bash
# Starts one KRaft node (broker + controller) of the `kafka` StatefulSet.
#
# The node id is the Pod's ordinal (kafka-2 -> 2); the controller quorum is every Pod of the
# StatefulSet (BROKERS of them, found through the headless Service). The config is written to
# /tmp (an emptyDir: the root filesystem is read-only) and the storage formatted on first start.
# We bypass the image's own entrypoint so that nothing writes under /opt/kafka.
set -euo pipefail

kafka_home=${KAFKA_HOME:-/opt/kafka}

: "${BROKERS:?}" "${CLUSTER_ID:?}" "${POD_NAMESPACE:?}" "${HEADLESS_SERVICE:?}"
node_id=${HOSTNAME##*-}
statefulset=${HOSTNAME%-*}
domain="$HEADLESS_SERVICE.$POD_NAMESPACE.svc.cluster.local"

voters=""
for ((i = 0; i < BROKERS; i++)); do
    voters+="${voters:+,}$i@$statefulset-$i.$domain:9093"
done

config=/tmp/server.properties
cat > "$config" <<PROPERTIES
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$voters
listeners=PLAINTEXT://:9092,CONTROLLER://:9093
advertised.listeners=PLAINTEXT://$HOSTNAME.$domain:9092
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=/var/lib/kafka/data/logs
num.partitions=${PARTITIONS:-3}
default.replication.factor=${REPLICATION_FACTOR:-1}
offsets.topic.replication.factor=${REPLICATION_FACTOR:-1}
transaction.state.log.replication.factor=${REPLICATION_FACTOR:-1}
transaction.state.log.min.isr=${MIN_INSYNC_REPLICAS:-1}
# Broker-wide 1: topics the framework declares at run time (reply topics) may have one replica.
# The shop's own topics get min.insync.replicas from the topic Job.
min.insync.replicas=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=3000
PROPERTIES

"$kafka_home/bin/kafka-storage.sh" format --ignore-formatted \
    --cluster-id "$CLUSTER_ID" --config "$config"
# kafka-run-class.sh directly (not kafka-server-start.sh): no GC log files, logs on stdout.
exec "$kafka_home/bin/kafka-run-class.sh" -name kafkaServer kafka.Kafka "$config"
