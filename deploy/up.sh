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
cargo build --quiet --release -p codefleet-gateway
exec target/release/codefleet-gateway --dev --dev-node-id local --listen 127.0.0.1:8080 "$@"
