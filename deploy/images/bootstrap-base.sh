#!/usr/bin/env bash
# Makes the base image `debian:bookworm-slim` without a registry: pull it when a registry answers,
# otherwise `debootstrap --variant=minbase bookworm` into a temporary folder and `docker import`.
# The Debian mirror is the one this host's apt already uses, so nothing here names a host.
# Idempotent: does nothing when the image is already present.
set -euo pipefail

IMAGE=${CODEFLEET_BASE_IMAGE:-debian:bookworm-slim}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: present"
  exit 0
fi

if timeout 60 docker pull "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: pulled"
  exit 0
fi

mirror() {
  local m
  m=$(grep -hoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  [ -n "$m" ] || m=$(grep -hoE '^deb\s+\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
  printf '%s' "$m"
}

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "installing debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq debootstrap >/dev/null
fi

MIRROR=$(mirror)
[ -n "$MIRROR" ] || { echo "no Debian mirror found in this host's apt sources" >&2; exit 1; }

ROOT=$(mktemp -d /tmp/codefleet-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "base image $IMAGE: debootstrap --variant=minbase bookworm (mirror from apt sources)"
start=$(date +%s)
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -n 30 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
# Slim it like the official image: no apt lists, docs or man pages.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
tar -C "$ROOT" -c . | docker import - "$IMAGE" >/dev/null
echo "base image $IMAGE: imported in $(( $(date +%s) - start ))s"
