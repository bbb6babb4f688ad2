#!/bin/bash
# Runs the web gateway with its access log in a file for the log-shipper sidecar.
#
# MSA_ACCESS_LOG_FILE makes the gateway append its access log (logger framework.gateway.access,
# one JSON line per request, written by a logging thread off the event loop) to that file on the
# volume shared with the sidecar, instead of stderr; the rest of its log stays on stderr. The
# gateway opens the file in append mode, so the sidecar's copytruncate rotation is safe for it.
# `exec` leaves `msa` as PID 1, so SIGTERM reaches the gateway and it drains; the lines still
# queued are written before it exits.
set -euo pipefail
export MSA_ACCESS_LOG_FILE="${MSA_ACCESS_LOG_FILE:-/var/log/gateway/access.log}"
exec msa gateway --config "${GATEWAY_CONFIG:-/etc/gateway/web.yaml}"
