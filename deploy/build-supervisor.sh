#!/usr/bin/env bash
# Builds the in-sandbox supervisor as a static binary (it runs inside any image) at
# target/x86_64-unknown-linux-gnu/release/codefleet-supervisor, where the agent looks for it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
  -p codefleet-supervisor --target x86_64-unknown-linux-gnu
echo "supervisor: $(pwd)/target/x86_64-unknown-linux-gnu/release/codefleet-supervisor"
