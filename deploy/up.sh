#!/usr/bin/env bash
# Brings up a working codefleet on this machine: a gateway on 127.0.0.1:8080 with a local node
# agent in the same process (`--dev`), on the local Docker engine. Prepares the base image and
# the supervisor first; the agent builds missing language images in the background and logs its
# progress (GET /v1/languages shows each one as it becomes ready). Extra arguments go to the
# gateway, e.g. `deploy/up.sh --listen 0.0.0.0:8080`.
set -euo pipefail
cd "$(dirname "$0")/.."

docker info >/dev/null 2>&1 || { echo "Docker is not reachable; start the Docker engine first" >&2; exit 1; }
deploy/images/bootstrap-base.sh
deploy/build-supervisor.sh
cargo build --release -p codefleet-gateway
# The listen address defaults to 127.0.0.1:8080; `--listen ADDR` here (or CODEFLEET_LISTEN)
# replaces it. The local agent's node id is `local`: a second instance on this machine refuses
# to start (exit 64) rather than take over the first one's sandboxes.
export CODEFLEET_LISTEN=${CODEFLEET_LISTEN:-127.0.0.1:8080}
exec target/release/codefleet-gateway --dev --dev-node-id local "$@"
