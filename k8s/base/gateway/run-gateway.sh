#!/bin/bash
# Runs the web gateway so that its access log also lands in a file for the log-shipper sidecar.
#
# The gateway logs JSON lines to stderr (framework.observability.logging). tee copies them to
# the container's stderr as usual and, through grep, the access log lines (logger
# framework.gateway.access) to $ACCESS_LOG on the volume shared with the sidecar. `exec`
# leaves `msa` as PID 1, so SIGTERM reaches the gateway and it drains. `tee -p` keeps going if
# the file's side fails. TODO(framework): a MSA_ACCESS_LOG_FILE option (a rotating handler on
# the access logger) would replace this wrapper.
set -euo pipefail
log=${ACCESS_LOG:-/var/log/gateway/access.log}
exec msa gateway --config "${GATEWAY_CONFIG:-/etc/gateway/web.yaml}" \
    2> >(tee -p >(grep --line-buffered '"logger":"framework.gateway.access"' >> "$log") >&2)
