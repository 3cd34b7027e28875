#!/usr/bin/env python3
"""Checks of deploy/kubernetes/ that the Kubernetes schemas cannot make (run by
.ci/deploy-checks.sh, in the venv that has kubernetes-validate, PyYAML and jsonschema):

- every ServiceMonitor (a CRD the offline schemas do not know) against servicemonitor.schema.json;
- kustomization.yaml lists every manifest of the folder, and only files that exist;
- every Service, ServiceMonitor, PodDisruptionBudget and workload selector matches labels that
  the manifests really set, and every port named by a probe or a Service exists;
- the agents report to at least as many gateway names as the autoscaler may start, and the
  grace periods cover the agent's --grace-s and the gateway's preStop pause.

Prints one line per check; exits 1 when any fails."""

import json
import pathlib
import sys

import jsonschema
import yaml

HERE = pathlib.Path(__file__).resolve().parent
failures = 0


def check(ok, what):
    global failures
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures += 1


def load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


docs = []
for path in sorted(HERE.glob("*.yaml")):
    if path.name == "kustomization.yaml":
        continue
    docs += [(path.name, d) for d in load(path)]
by_kind = {}
for name, d in docs:
    by_kind.setdefault(d["kind"], []).append(d)

# ServiceMonitors against the schema written down for them.
schema = json.loads((HERE / "servicemonitor.schema.json").read_text())
for monitor in by_kind.get("ServiceMonitor", []):
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(monitor), key=str)
    check(not errors, f"ServiceMonitor {monitor['metadata']['name']} matches servicemonitor.schema.json"
          + "".join(f"\n     {'/'.join(map(str, e.path))}: {e.message}" for e in errors))
check(len(by_kind.get("ServiceMonitor", [])) == 2, "a ServiceMonitor for the gateways and one for the agents")

# The kustomization lists exactly the manifests.
kustomization = load(HERE / "kustomization.yaml")[0]
listed = set(kustomization["resources"])
present = {p.name for p in HERE.glob("*.yaml")} - {"kustomization.yaml"}
check(listed == present, f"kustomization.yaml lists every manifest ({sorted(listed ^ present) or 'all'})")
images = {i["name"] for i in kustomization.get("images", [])}
used = set()
for kind in ("StatefulSet", "DaemonSet", "Deployment"):
    for w in by_kind.get(kind, []):
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            used.add(c["image"].rsplit(":", 1)[0])
check(used <= images, f"kustomization.yaml sets every image ({sorted(used)})")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


workloads = [w for k in ("StatefulSet", "DaemonSet", "Deployment") for w in by_kind.get(k, [])]
pod_labels = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads]
for w, labels in pod_labels:
    name = f"{w['kind']} {w['metadata']['name']}"
    check(matches(w["spec"]["selector"]["matchLabels"], labels), f"{name}'s selector matches its pods")
    ports = {p["name"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    for c in w["spec"]["template"]["spec"]["containers"]:
        for probe in ("readinessProbe", "livenessProbe"):
            get = c.get(probe, {}).get("httpGet")
            check(get is not None, f"{name} has a {probe}")
            if get:
                check(get["port"] in ports, f"{name}'s {probe} on {get['path']} uses a declared port")
    if w["kind"] == "StatefulSet":
        services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
        peers = services.get(w["spec"]["serviceName"])
        check(peers is not None and peers["spec"].get("clusterIP") == "None"
              and peers["spec"].get("publishNotReadyAddresses") is True,
              f"{name}'s serviceName is a headless Service publishing pods before they are ready")

for s in by_kind.get("Service", []):
    selected = [w for w, labels in pod_labels if matches(s["spec"]["selector"], labels)]
    check(len(selected) == 1, f"Service {s['metadata']['name']} selects the pods of one workload")
    for port in s["spec"]["ports"]:
        target = port.get("targetPort")
        names = {p["name"] for w in selected for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        check(not isinstance(target, str) or target in names, f"Service {s['metadata']['name']} targets port {target!r} of its pods")

for m in by_kind.get("ServiceMonitor", []):
    selected = [s for s in by_kind["Service"] if matches(m["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    check(len(selected) == 1, f"ServiceMonitor {m['metadata']['name']} selects one Service ({[s['metadata']['name'] for s in selected]})")
    for s in selected:
        job = s["metadata"]["labels"].get(m["spec"]["jobLabel"])
        check(job == m["metadata"]["name"], f"ServiceMonitor {m['metadata']['name']} gives job={job!r}, the job the alerts use")
        check(s["spec"].get("publishNotReadyAddresses") is True, f"ServiceMonitor {m['metadata']['name']} scrapes pods that are not ready yet")
        ports = {p["name"] for p in s["spec"]["ports"]}
        check(all(e["port"] in ports for e in m["spec"]["endpoints"]), f"ServiceMonitor {m['metadata']['name']} scrapes a port of its Service")

for pdb in by_kind.get("PodDisruptionBudget", []):
    check(any(matches(pdb["spec"]["selector"]["matchLabels"], labels) for _, labels in pod_labels),
          f"PodDisruptionBudget {pdb['metadata']['name']} selects pods")

# Agents report to every gateway the autoscaler may run; grace periods cover the drains.
configs = {c["metadata"]["name"]: c["data"] for c in by_kind["ConfigMap"]}
gateways = configs["codefleet-agent"]["CODEFLEET_GATEWAY"].split(",")
for hpa in by_kind.get("HorizontalPodAutoscaler", []):
    target = hpa["spec"]["scaleTargetRef"]
    check(any(w["kind"] == target["kind"] and w["metadata"]["name"] == target["name"] for w in workloads),
          f"HorizontalPodAutoscaler {hpa['metadata']['name']} scales a workload of these manifests")
    expected = [f"http://{target['name']}-{i}.codefleet-gateway-peers:8080" for i in range(hpa["spec"]["maxReplicas"])]
    check(gateways == expected, f"the agents report to all {hpa['spec']['maxReplicas']} gateway pods the autoscaler may run")
agent = next(w for w in workloads if w["metadata"]["name"] == "codefleet-agent")
grace_s = int(configs["codefleet-agent"]["CODEFLEET_GRACE_S"])
check(agent["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace_s + 15,
      f"the agent's grace period covers --grace-s ({grace_s} s) and removing its containers")
mounts = {m["mountPath"] for c in agent["spec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]}
host = {v["name"]: v["hostPath"]["path"] for v in agent["spec"]["template"]["spec"]["volumes"] if "hostPath" in v}
for key in ("CODEFLEET_RUN_DIR", "CODEFLEET_SUPERVISOR"):
    path = configs["codefleet-agent"][key]
    check(any(path == h or path.startswith(h + "/") for h in host.values()) and
          any(path == m or path.startswith(m + "/") for m in mounts if m in host.values()),
          f"{key} ({path}) is a host path mounted at the same path")

print(f"{'all manifest checks passed' if not failures else f'{failures} manifest checks failed'}")
sys.exit(1 if failures else 0)
