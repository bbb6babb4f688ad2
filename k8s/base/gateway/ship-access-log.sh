#!/bin/sh
# The gateway's log shipper (busybox sh), a sidecar in the gateway Pod: follows the access log
# the gateway container writes to the shared emptyDir and ships it, one JSON line per request,
# to stdout, where the node's log agent collects it as a stream of its own (gateway/access).
# A real shipper (fluent-bit, vector) would send it to the metering/billing pipeline instead.
#
# Rotation (copytruncate): the writer appends (O_APPEND), so truncating the file in place is
# safe for it, and `tail -F` starts again from the top. Lines written between tail's last
# read and the truncation may be lost; the limit keeps the emptyDir under its sizeLimit.
set -eu
log=${ACCESS_LOG:-/var/log/gateway/access.log}
max_bytes=${MAX_BYTES:-67108864}

touch "$log"
tail -n +1 -F "$log" &
tail_pid=$!
trap 'kill "$tail_pid" 2>/dev/null; exit 0' TERM INT

while true; do
    sleep 30 &
    wait $! || true
    size=$(stat -c %s "$log" 2>/dev/null || echo 0)
    if [ "$size" -gt "$max_bytes" ]; then
        : > "$log"
    fi
done
