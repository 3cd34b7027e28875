#!/usr/bin/env bash
# Makes the base images `debian:<suite>-slim` without a registry: pull each when a registry
# answers, otherwise `debootstrap --variant=minbase <suite>` into a temporary folder and
# `docker import`. `bootstrap-base.sh [SUITE...]`: bookworm and trixie by default (the language
# recipes are built FROM both, see deploy/images/README.md). The Debian mirror is the one this
# host's apt already uses, so nothing here names a host. Idempotent: does nothing for an image
# already present. CODEFLEET_BASE_IMAGE names one image (of the first suite) instead.
set -euo pipefail

SUITES=("$@")
[ ${#SUITES[@]} -gt 0 ] || SUITES=(bookworm trixie)

mirror() {
  local m
  m=$(grep -hoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)
  [ -n "$m" ] || m=$(grep -hoE '^deb\s+\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
  printf '%s' "$m"
}

# debootstrap knows the suites of its own release and older; a newer one (trixie on a bookworm
# host) is bootstrapped with the script of the nearest it knows: they are all symlinks to sid's.
script_for() {
  local suite=$1
  if [ -e "/usr/share/debootstrap/scripts/$suite" ]; then printf '%s' "$suite"; else printf 'sid'; fi
}

bootstrap() {
  local suite=$1 image=$2
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image: present"
    return 0
  fi
  if timeout 60 docker pull "$image" >/dev/null 2>&1; then
    echo "base image $image: pulled"
    return 0
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
  fi
  local mirror root start
  mirror=$(mirror)
  [ -n "$mirror" ] || { echo "no Debian mirror found in this host's apt sources" >&2; return 1; }
  root=$(mktemp -d /tmp/codefleet-rootfs.XXXXXX)
  echo "base image $image: debootstrap --variant=minbase $suite (mirror from apt sources)"
  start=$(date +%s)
  if ! debootstrap --variant=minbase "$suite" "$root" "$mirror" \
         "/usr/share/debootstrap/scripts/$(script_for "$suite")" >"$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2
    rm -rf "$root" "$root.log"
    return 1
  fi
  rm -f "$root.log"
  # Slim it like the official image: no apt lists, docs or man pages, and apt keeps no
  # downloaded package in the images built on it (the official image's docker-clean).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  tar -C "$root" -c . | docker import - "$image" >/dev/null
  rm -rf "$root"
  echo "base image $image: imported in $(( $(date +%s) - start ))s"
}

for suite in "${SUITES[@]}"; do
  image="debian:$suite-slim"
  if [ -n "${CODEFLEET_BASE_IMAGE:-}" ]; then image=$CODEFLEET_BASE_IMAGE; fi
  bootstrap "$suite" "$image"
  if [ -n "${CODEFLEET_BASE_IMAGE:-}" ]; then break; fi
done
