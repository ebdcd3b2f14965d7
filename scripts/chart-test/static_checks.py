#!/usr/bin/env python3
"""Static checks of charts/loraplane, for the defaults and every ci/*-values.yaml:

- `helm lint --strict` and the values schema, through Helm's own library (helm-python-sdk);
- every rendered manifest against the Kubernetes schemas (kubernetes-validate, strict, at the
  chart's minimum Kubernetes version and the newest one known); kinds it has no schema for
  (the Prometheus Operator's) are skipped by name, and checked for what they must select;
- the operator Deployment: restricted security context, probes, resources, and an environment
  whose every variable is a real `loraplane-operator run` flag (and that covers every flag);
- termination grace periods exceed the drain timeouts (operator and agents);
- RBAC equals `loraplane-operator rbac`; the CRDs equal `loraplane-operator crds`;
- `promtool check rules` on the PrometheusRule, and `promtool test rules` (alerts-test.yaml):
  each alert fires when it should, after its `for`, with its annotations rendered;
- the dashboard ConfigMap carries the dashboard;
- the autoscaler flags mirror the values; the prometheus-adapter rules ConfigMap holds the
  chart's rules file; every rule maps namespace and pod and its queries parse (promtool);
- values the chart must refuse are refused; the examples validate against their schemas.

Usage: static_checks.py OPERATOR_BINARY
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from common import (
    AGENT_TERMINATION_MARGIN_S,
    CHART,
    HERE,
    NAMESPACE,
    RELEASE,
    ROOT,
    Report,
    env_of,
    find,
    live_values,
    merged,
    render,
    rules_granted,
    seconds,
    tmpdir,
    value_sets,
    write_yaml,
)

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
KUBE_VERSIONS = ["1.27.0", "1.37.0"]  # Chart.yaml's kubeVersion floor, and the newest schemas
NO_SCHEMA_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
REQUIRED_ALERTS = {
    "LoraplaneAgentDown",
    "LoraplaneHighTimeToFirstToken",
    "LoraplanePoolExhausted",
    "LoraplanePreempting",
    "LoraplaneAdapterLoadFailures",
    "LoraplaneKvTransferFailures",
    "LoraplaneReconcileErrors",
}
# Values the chart must refuse, and a fragment of the reason.
MUST_REFUSE = [
    ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}, "leaderElection"),
    ({"operator": {"terminationGracePeriodSeconds": 5}}, "terminationGracePeriodSeconds"),
    ({"agent": {"drainTimeout": "30 seconds"}}, "drainTimeout"),
    ({"operator": {"logFormat": "xml"}}, "logFormat"),
    ({"operator": {"replicass": 2}}, "replicass"),
    ({"agent": {"image": {"digest": "latest"}}}, "digest"),
    ({"autoscaling": {"engine": "keda"}}, "prometheusAddress"),
    ({"autoscaling": {"engine": "vpa"}}, "engine"),
]
ADAPTER_RULES = CHART / "files" / "prometheus-adapter-rules.yaml"


def operator_flag_envs(operator: str) -> set[str]:
    help_text = subprocess.run([operator, "run", "--help"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"\[env: (LORAPLANE_[A-Z_]+)=", help_text))


def operator_rbac(operator: str) -> set[tuple[str, str, str]]:
    role = yaml.safe_load(subprocess.run([operator, "rbac"], check=True, capture_output=True, text=True).stdout)
    return rules_granted([role])


def lint(rep: Report, name: str, values: dict):
    import helm_python as helm

    for kv in (None, f"v{KUBE_VERSIONS[0]}"):
        res = helm.lint(str(CHART), values, strict=True, kube_version=kv)
        bad = [m for m in res["messages"] if m["severity"] >= 2] + [{"error": e} for e in res["errors"]]
        rep.check(not bad, f"[{name}] helm lint --strict" + (f" --kube-version {kv}" if kv else ""),
                  "; ".join(m["error"] for m in bad))
    try:
        with helm.Chart.load(str(CHART)) as chart:
            chart.validate_schema(values)
        rep.ok(f"[{name}] values.schema.json accepts the values")
    except Exception as e:  # noqa: BLE001 - the library's error says why
        rep.fail(f"[{name}] values.schema.json accepts the values", str(e))


def schema_errors(obj: dict) -> list[str]:
    """Why `obj` fails strict validation against each of KUBE_VERSIONS' schemas (empty: valid)."""
    import kubernetes_validate as kv

    errors = []
    for version in KUBE_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"k8s {version}: {e.message} at {'/'.join(map(str, e.path))}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"k8s {version}: no schema ({e})")
    return errors


def validate_manifests(rep: Report, name: str, docs: list[dict]):
    skipped: set[str] = set()
    for d in docs:
        obj = {k: v for k, v in d.items() if k != "__source__"}
        what = f"[{name}] {d['kind']} {d['metadata']['name']}"
        if d["kind"] in NO_SCHEMA_KINDS:
            skipped.add(d["kind"])
            continue
        errors = schema_errors(obj)
        rep.check(not errors, f"{what} validates against Kubernetes {' and '.join(KUBE_VERSIONS)} (strict)", "; ".join(errors))
    for kind in sorted(skipped):
        rep.skip(f"[{name}] {kind} schema validation",
                 "kubernetes-validate has no schema for Prometheus Operator kinds; checked below for what they select and, for rules, by promtool")


def check_deployment(rep: Report, name: str, docs: list[dict], values: dict, flag_envs: set[str]) -> set[str]:
    (dep,) = find(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    rep.check(psc.get("runAsNonRoot") is True and c["securityContext"].get("runAsNonRoot") is True,
              f"[{name}] operator runs as non-root")
    rep.check(sc.get("readOnlyRootFilesystem") is True, f"[{name}] operator has a read-only root filesystem")
    rep.check(sc.get("allowPrivilegeEscalation") is False and sc.get("capabilities", {}).get("drop") == ["ALL"],
              f"[{name}] operator drops every capability and cannot escalate")
    rep.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"[{name}] operator uses the RuntimeDefault seccomp profile")
    rep.check(all(k in c for k in ("livenessProbe", "readinessProbe", "startupProbe")), f"[{name}] operator has liveness, readiness and startup probes")
    res = c.get("resources", {})
    rep.check(bool(res.get("requests")) and "memory" in res.get("limits", {}), f"[{name}] operator has resource requests and a memory limit")
    v = merged(values)
    rep.check(res == v["operator"]["resources"], f"[{name}] operator resources are the values'")
    img = v["operator"]["image"]
    want = f"{img['repository']}@{img['digest']}" if img.get("digest") else f"{img['repository']}:{img.get('tag') or APP_VERSION}"
    rep.check(c["image"] == want, f"[{name}] operator image is {want}", c["image"])

    env = {e["name"] for e in c.get("env", [])}
    ours = {e for e in env if e.startswith("LORAPLANE_")}
    unknown = ours - flag_envs
    rep.check(not unknown, f"[{name}] every LORAPLANE_* variable of the operator is a `loraplane-operator run` flag", f"unknown: {sorted(unknown)}")
    vals = env_of(dep)
    mirrors = {
        "LORAPLANE_AGENT_DRAIN_TIMEOUT": v["agent"]["drainTimeout"],
        "LORAPLANE_AGENT_REQUEST_TIMEOUT": v["agent"]["requestTimeout"],
        "LORAPLANE_LOG_LEVEL": v["operator"]["logLevel"],
        "LORAPLANE_METRICS_ADDR": f"0.0.0.0:{v['metrics']['port']}",
    }
    bad = {k: (vals.get(k), w) for k, w in mirrors.items() if vals.get(k) != w}
    rep.check(not bad, f"[{name}] operator flags mirror the values", str(bad))

    # Termination grace periods against drain timeouts.
    grace = pod["terminationGracePeriodSeconds"]
    request = seconds(vals["LORAPLANE_AGENT_REQUEST_TIMEOUT"])
    rep.check(grace > request, f"[{name}] operator terminationGracePeriodSeconds {grace} > agent request timeout {request:g}s (in-flight Admin calls finish, the Lease is released)")
    drain = seconds(vals["LORAPLANE_AGENT_DRAIN_TIMEOUT"])
    agent_grace = drain + AGENT_TERMINATION_MARGIN_S
    rep.check(agent_grace > drain, f"[{name}] agent pods' terminationGracePeriodSeconds {agent_grace:g} (drain + {AGENT_TERMINATION_MARGIN_S:g}s) > drain timeout {drain:g}s")
    return ours


def check_wiring(rep: Report, name: str, docs: list[dict], values: dict, want_rbac: set):
    v = merged(values)
    (dep,) = find(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    (svc,) = find(docs, "Service")
    rep.check(all(pod_labels.get(k) == x for k, x in svc["spec"]["selector"].items()), f"[{name}] the metrics Service selects the operator pods")
    ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    rep.check(all(p["targetPort"] in ports for p in svc["spec"]["ports"]), f"[{name}] the metrics Service targets a named container port")
    namespaces = {"templates/dashboard.yaml": v["dashboard"]["namespace"] or NAMESPACE,
                  "templates/prometheus-adapter-rules.yaml": v["autoscaling"]["prometheusAdapter"]["configMap"]["namespace"] or NAMESPACE}
    for d in docs:
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            want_ns = next((ns for src, ns in namespaces.items() if d["__source__"].endswith(src)), NAMESPACE)
            if d["metadata"].get("namespace") != want_ns:
                rep.fail(f"[{name}] {d['kind']} {d['metadata']['name']} is in namespace {want_ns}", str(d["metadata"].get("namespace")))

    if v["rbac"]["create"]:
        granted = rules_granted(docs)
        expect = set(want_rbac)
        if not v["operator"]["leaderElection"]["enabled"]:
            expect = {t for t in expect if t[0] != "coordination.k8s.io"}
        rep.check(granted == expect, f"[{name}] RBAC grants exactly `loraplane-operator rbac`",
                  f"extra {sorted(granted - expect)}, missing {sorted(expect - granted)}")
        leases = [r for r in find(docs, "Role") for rule in r["rules"] if "leases" in rule["resources"]]
        rep.check(all(r["metadata"]["namespace"] == NAMESPACE for r in leases) and not any(
            "leases" in rule["resources"] for r in find(docs, "ClusterRole") for rule in r["rules"]),
            f"[{name}] Lease permissions are namespaced to the release namespace")
        sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
        subjects = [s for b in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding") for s in b["subjects"]]
        rep.check(all(s["name"] == sa and s["namespace"] == NAMESPACE for s in subjects) and subjects,
                  f"[{name}] every binding names the operator's ServiceAccount {sa}")
        rep.check(bool(find(docs, "ServiceAccount")) == v["serviceAccount"]["create"], f"[{name}] a ServiceAccount is created iff serviceAccount.create")

    for sm in find(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        labels = svc["metadata"]["labels"]
        rep.check(all(labels.get(k) == x for k, x in sel.items()), f"[{name}] the ServiceMonitor selects the metrics Service")
        rep.check(NAMESPACE in sm["spec"]["namespaceSelector"]["matchNames"], f"[{name}] the ServiceMonitor looks in the release namespace")
        rep.check({e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}, f"[{name}] the ServiceMonitor scrapes a named Service port")
        job = labels.get(sm["spec"]["jobLabel"])
        rep.check(job == v["prometheusRule"]["operatorJob"], f"[{name}] the ServiceMonitor's job ({job}) is the one the alerts use")
    for pm in find(docs, "PodMonitor"):
        sel = pm["spec"]["selector"]["matchLabels"]
        rep.check(sel.get(pm["spec"]["jobLabel"]) == v["prometheusRule"]["agentJob"],
                  f"[{name}] the PodMonitor's job ({sel.get(pm['spec']['jobLabel'])}) is the one the alerts use")

    dashboards = [d for d in find(docs, "ConfigMap") if d["__source__"].endswith("templates/dashboard.yaml")]
    if v["dashboard"]["enabled"]:
        (cm,) = dashboards
        rep.check(all(cm["metadata"]["labels"].get(k) == x for k, x in v["dashboard"]["labels"].items()), f"[{name}] the dashboard ConfigMap carries the sidecar labels")
        file_json = json.loads((CHART / "dashboards" / "loraplane.json").read_text())
        rep.check(json.loads(cm["data"]["loraplane.json"]) == file_json, f"[{name}] the dashboard ConfigMap holds dashboards/loraplane.json")
    else:
        rep.check(not dashboards, f"[{name}] no dashboard ConfigMap when dashboard.enabled=false")


def check_autoscaling(rep: Report, name: str, docs: list[dict], values: dict):
    """The operator's autoscaler flags mirror the values; the adapter rules ConfigMap exists
    exactly when asked for and holds the chart's rules file."""
    v = merged(values)["autoscaling"]
    (dep,) = find(docs, "Deployment")
    env = env_of(dep)
    rep.check(env.get("LORAPLANE_AUTOSCALER") == v["engine"], f"[{name}] --autoscaler is autoscaling.engine ({v['engine']})")
    keda = env.get("LORAPLANE_KEDA_PROMETHEUS_ADDRESS")
    want = v["keda"]["prometheusAddress"] if v["engine"] == "keda" else None
    rep.check(keda == want, f"[{name}] --keda-prometheus-address is set exactly with engine=keda", f"{keda!r} != {want!r}")
    cms = [d for d in find(docs, "ConfigMap") if d["__source__"].endswith("templates/prometheus-adapter-rules.yaml")]
    if v["prometheusAdapter"]["configMap"]["enabled"]:
        (cm,) = cms
        same = yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(ADAPTER_RULES.read_text())
        rep.check(same, f"[{name}] the prometheus-adapter ConfigMap's config.yaml is files/prometheus-adapter-rules.yaml")
        labels = cm["metadata"]["labels"]
        rep.check(all(labels.get(k) == x for k, x in v["prometheusAdapter"]["configMap"]["labels"].items()),
                  f"[{name}] the prometheus-adapter ConfigMap carries the extra labels")
    else:
        rep.check(not cms, f"[{name}] no prometheus-adapter ConfigMap unless asked for")


def check_adapter_rules(rep: Report, tmp: Path):
    """files/prometheus-adapter-rules.yaml: every rule maps namespace and pod, renames one
    series, and its queries (templated as prometheus-adapter does) are valid PromQL."""
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    rep.check(len(rules) >= 3, f"{len(rules)} prometheus-adapter rules")
    exprs = []
    for i, r in enumerate(rules):
        name = r.get("name", {}).get("as", f"rule {i}")
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", r["seriesQuery"]).group(0)
        overrides = r["resources"]["overrides"]
        rep.check(overrides.get("namespace") == {"resource": "namespace"} and overrides.get("pod") == {"resource": "pod"},
                  f"adapter rule {name}: namespace and pod labels map to their resources")
        rep.check(re.fullmatch(r["name"]["matches"], series) is not None, f"adapter rule {name}: name.matches selects {series}")
        q = r["metricsQuery"]
        rep.check("<<.LabelMatchers>>" in q and "by (<<.GroupBy>>)" in q, f"adapter rule {name}: the query is filtered and grouped per pod")
        exprs.append(r["seriesQuery"])
        exprs.append(q.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a-0|a-1"')
                     .replace("<<.GroupBy>>", "namespace,pod"))
    path = write_yaml(tmp / "adapter-rules-as-recording-rules.yaml",
                      {"groups": [{"name": "adapter", "rules": [{"record": f"adapter_check_{i}", "expr": e} for i, e in enumerate(exprs)]}]})
    res = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    rep.check(res.returncode == 0, f"every adapter rule's seriesQuery and metricsQuery parse (promtool, {len(exprs)} expressions)",
              (res.stdout + res.stderr).strip())


def check_rules(rep: Report, name: str, docs: list[dict], tmp: Path):
    rules = find(docs, "PrometheusRule")
    if not rules:
        return
    groups = [g for r in rules for g in r["spec"]["groups"]]
    alerts = {rule["alert"] for g in groups for rule in g["rules"] if "alert" in rule}
    rep.check(REQUIRED_ALERTS <= alerts, f"[{name}] the PrometheusRule has every required alert", f"missing {sorted(REQUIRED_ALERTS - alerts)}")
    path = write_yaml(tmp / f"{name}-rules.yaml", {"groups": groups})
    res = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    rep.check(res.returncode == 0, f"[{name}] promtool check rules ({len(alerts)} alerts)", (res.stdout + res.stderr).strip())


def check_alert_tests(rep: Report, tmp: Path):
    """`promtool test rules` (alerts-test.yaml) on the rules at their default thresholds."""
    docs = render(live_values())
    groups = [g for r in find(docs, "PrometheusRule") for g in r["spec"]["groups"]]
    d = tmp / "alert-tests"
    write_yaml(d / "rules.yaml", {"groups": groups})
    (d / "alerts-test.yaml").write_text((HERE / "alerts-test.yaml").read_text())
    res = subprocess.run(["promtool", "test", "rules", "alerts-test.yaml"], cwd=d, capture_output=True, text=True)
    tests = yaml.safe_load((HERE / "alerts-test.yaml").read_text())["tests"]
    rep.check(res.returncode == 0, f"promtool test rules: {len(tests)} alert unit tests (scripts/chart-test/alerts-test.yaml)",
              (res.stdout + res.stderr).strip())


def check_refusals(rep: Report):
    import helm_python as helm

    for values, fragment in MUST_REFUSE:
        try:
            with helm.Chart.load(str(CHART)) as chart:
                chart.validate_schema(values)
                chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            rep.fail(f"the chart refuses {json.dumps(values)}", "it rendered")
        except Exception as e:  # noqa: BLE001
            rep.check(fragment in str(e), f"the chart refuses {json.dumps(values)}", f"refused, but for: {e}")


def check_crds(rep: Report, operator: str, tmp: Path):
    chart_dir = CHART / "crds"
    gen = tmp / "crds"
    gen.mkdir(parents=True, exist_ok=True)
    for f in gen.glob("*"):
        f.unlink()
    subprocess.run([operator, "crds", "--out-dir", str(gen)], check=True, capture_output=True)
    want = {f.name: f.read_text() for f in sorted(gen.glob("*.yaml"))}
    have = {f.name: f.read_text() for f in sorted(chart_dir.glob("*.yaml"))} if chart_dir.is_dir() else {}
    if not have:
        rep.fail("charts/loraplane/crds/ holds the generated CRDs",
                 "it is missing: run `cargo run -p loraplane-operator -- crds --out-dir charts/loraplane/crds`")
    else:
        diff = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        rep.check(not diff, f"charts/loraplane/crds/ equals `loraplane-operator crds` ({', '.join(sorted(want))})",
                  f"differs: {diff}; regenerate with `cargo run -p loraplane-operator -- crds --out-dir charts/loraplane/crds`")
    for name, text in want.items():
        for doc in yaml.safe_load_all(text):
            errors = schema_errors(doc)
            rep.check(not errors, f"CRD {doc['metadata']['name']} validates against Kubernetes {' and '.join(KUBE_VERSIONS)}", "; ".join(errors))
    return [doc for text in want.values() for doc in yaml.safe_load_all(text)]


def check_examples(rep: Report, crds: list[dict]):
    """examples/*.yaml: built-in kinds against Kubernetes' schemas, ours against the CRDs'."""
    import jsonschema
    import kubernetes_validate as kv

    schemas = {}
    for crd in crds:
        for ver in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{ver['name']}", crd["spec"]["names"]["kind"])] = ver["schema"]["openAPIV3Schema"]
    files = sorted((ROOT / "examples").glob("*.yaml"))
    rep.check(bool(files), "examples/ has manifests")
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            what = f"examples/{f.name}: {doc['kind']} {doc['metadata']['name']}"
            schema = schemas.get((doc["apiVersion"], doc["kind"]))
            try:
                if schema is not None:
                    jsonschema.validate(doc, schema)
                    rep.ok(f"{what} validates against its CRD schema (CEL rules need an API server)")
                else:
                    kv.validate(doc, KUBE_VERSIONS[-1], strict=True)
                    rep.ok(f"{what} validates against Kubernetes {KUBE_VERSIONS[-1]}")
            except (jsonschema.ValidationError, kv.ValidationError, kv.SchemaNotFoundError) as e:
                rep.fail(what, getattr(e, "message", str(e)))


def main() -> int:
    operator = sys.argv[1]
    rep = Report("chart-test static")
    tmp = tmpdir() / "static"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flag_envs = operator_flag_envs(operator)
    want_rbac = operator_rbac(operator)
    envs_used: set[str] = set()
    sets = value_sets()
    for name, values in sets.items():
        rep.section(f"value set {name!r}")
        lint(rep, name, values)
        try:
            docs = render(values)
        except Exception as e:  # noqa: BLE001
            rep.fail(f"[{name}] renders", str(e))
            continue
        rep.ok(f"[{name}] renders ({len(docs)} manifests: {', '.join(sorted({d['kind'] for d in docs}))})")
        validate_manifests(rep, name, docs)
        envs_used |= check_deployment(rep, name, docs, values, flag_envs)
        check_wiring(rep, name, docs, values, want_rbac)
        check_autoscaling(rep, name, docs, values)
        check_rules(rep, name, docs, tmp)
    rep.section("all value sets together")
    rep.check(len(sets) >= 4, f"{len(sets)} value sets rendered ({', '.join(sets)})")
    missing = flag_envs - envs_used
    rep.check(not missing, "every `loraplane-operator run` flag is reachable from the values", f"never set: {sorted(missing)}")
    rep.section("prometheus-adapter rules (files/prometheus-adapter-rules.yaml)")
    check_adapter_rules(rep, tmp)
    rep.section("alert unit tests")
    check_alert_tests(rep, tmp)
    rep.section("values the chart must refuse")
    check_refusals(rep)
    rep.section("CRDs")
    crds = check_crds(rep, operator, tmp)
    rep.section("examples")
    check_examples(rep, crds)
    return rep.close()


if __name__ == "__main__":
    sys.exit(main())
