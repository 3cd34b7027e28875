#!/usr/bin/env bash
# Checks of deploy/ that need no cluster: the alert rules (promtool check and unit tests), the
# example Prometheus config, and the Kubernetes manifests against the Kubernetes schemas (offline,
# kubernetes-validate) plus the checks those schemas cannot make. Installs what it needs when
# missing: Debian's prometheus package (promtool, and the prometheus binary that
# tests/tests/prometheus.rs starts) and a venv with kubernetes-validate (reused when present).
# One line per check; exits non-zero when any fails.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=(1.30.0 1.33.0)
VALIDATOR=kubernetes-validate==1.37.0
VENV=${CODEFLEET_DEPLOY_VENV:-target/deploy-venv}

install_prometheus() {
  command -v promtool >/dev/null 2>&1 && [ -x /usr/bin/prometheus ] && return 0
  echo "installing Debian's prometheus (promtool and the server the Prometheus test starts)"
  # The package starts its service on install; refuse that (the tests start their own
  # Prometheus on a port of their own, and nothing should hold :9090 behind our back).
  local guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$guard"
    chmod +x "$guard"
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ -n "$guard" ] && rm -f "$guard"
  # Should a service manager have started it anyway, stop it.
  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  command -v promtool >/dev/null 2>&1 && [ -x /usr/bin/prometheus ]
}

install_validator() {
  if [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/python" ]; then return 0; fi
  echo "installing $VALIDATOR in $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$VALIDATOR"
}

failed=0
run() {
  local what=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    echo "ok   $what"
  else
    echo "FAIL $what"
    printf '%s\n' "$out" | sed 's/^/     /'
    failed=$((failed + 1))
  fi
}

install_prometheus
install_validator

run "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
run "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
run "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
run "deploy/grafana/codefleet.json is JSON" "$VENV/bin/python" -m json.tool deploy/grafana/codefleet.json

for file in deploy/kubernetes/*.yaml; do
  case $(basename "$file") in
    # Not Kubernetes resources the schemas know: the kustomization is kustomize's own file, and
    # ServiceMonitor is the Prometheus Operator's CRD; check-manifests.py checks both.
    kustomization.yaml | servicemonitor.yaml) continue ;;
  esac
  for version in "${K8S_VERSIONS[@]}"; do
    run "$file valid against Kubernetes $version (strict)" \
      "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$file"
  done
done
run "deploy/kubernetes/check-manifests.py (ServiceMonitor schema, kustomization, selectors, ports, grace)" \
  "$VENV/bin/python" deploy/kubernetes/check-manifests.py

if [ "$failed" -ne 0 ]; then
  echo "deploy checks: $failed failed"
  exit 1
fi
echo "deploy checks: all passed"
