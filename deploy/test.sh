#!/usr/bin/env bash
# Runs every test against the local Docker engine, preparing what they need first: the base
# images (bookworm and trixie, bootstrapped offline when they cannot be pulled), the static
# supervisor, the binaries and every runtime's image of the built-in catalog (the fifteen
# languages and the newer toolchains of seven of them; all reused when present). This is the
# README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

docker info >/dev/null 2>&1 || { echo "Docker is not reachable; start it first (.ci/run does)" >&2; exit 1; }
deploy/images/bootstrap-base.sh
deploy/build-supervisor.sh
cargo build --workspace --bins
echo "language images:"
# One retry: a build that fetches Debian packages can meet a passing network error.
target/debug/codefleet-agent --prepare-only || target/debug/codefleet-agent --prepare-only
deploy/compose/build-images.sh  # the images of the binaries, for tests/tests/compose.rs
cargo test --workspace "$@"
