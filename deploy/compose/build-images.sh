#!/usr/bin/env bash
# Builds the images of the binaries, codefleet/gateway:latest and codefleet/agent:latest, on the
# local Docker engine, with no registry: the binaries are built on the host (release, glibc of
# bookworm like the base image), copied into a small build context under target/images/, and
# put on an otherwise empty image (deploy/images/{gateway,agent}/Dockerfile). Unchanged binaries
# hit Docker's cache, so a second run only checks. Prints each image's id and size.
#
#   deploy/compose/build-images.sh               # cargo build, then the images
#   deploy/compose/build-images.sh --no-cargo    # the images from the binaries already built
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo=1
[ "${1:-}" = "--no-cargo" ] && cargo=0

deploy/images/bootstrap-base.sh
if [ "$cargo" = 1 ]; then
  deploy/build-supervisor.sh
  echo "building the release binaries (gateway, agent)"
  cargo build --release -p codefleet-gateway -p codefleet-node-agent
fi

release=target/release
supervisor=target/x86_64-unknown-linux-gnu/release/codefleet-supervisor
for f in "$release/codefleet-gateway" "$release/codefleet-agent" "$supervisor"; do
  [ -x "$f" ] || { echo "$f is missing: run deploy/compose/build-images.sh without --no-cargo" >&2; exit 1; }
done

context=target/images
rm -rf "$context"
mkdir -p "$context/gateway" "$context/agent"
# The release profile keeps debug info for profiling; the images keep only the symbols
# (backtraces still name functions).
slim() {
  if command -v strip >/dev/null 2>&1; then strip --strip-debug -o "$2" "$1"; else cp "$1" "$2"; fi
}
cp deploy/images/gateway/Dockerfile "$context/gateway/"
slim "$release/codefleet-gateway" "$context/gateway/codefleet-gateway"
cp deploy/images/agent/Dockerfile deploy/images/agent/install-supervisor "$context/agent/"
slim "$release/codefleet-agent" "$context/agent/codefleet-agent"
slim "$supervisor" "$context/agent/codefleet-supervisor"

for image in gateway agent; do
  start=$(date +%s)
  # Its output only when it fails (the legacy builder also warns that it is legacy).
  out=$(docker build --quiet --tag "codefleet/$image:latest" "$context/$image" 2>&1) || { echo "$out" >&2; exit 1; }
  size=$(docker image inspect --format '{{.Size}}' "codefleet/$image:latest")
  id=$(docker image inspect --format '{{.Id}}' "codefleet/$image:latest")
  echo "image codefleet/$image:latest: ${id:7:12}, $(( size / 1000000 )) MB, $(( $(date +%s) - start ))s"
done
