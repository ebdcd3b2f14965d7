#!/usr/bin/env python3
"""The chart's dashboard and alerts against real processes, on loopback only:

1. fixture checkpoints; three real `loraplane-agent serve` processes: a prefill and a decode
   agent (BaseModel `tiny`, disaggregated, KV cache over gRPC) and a unified one
   (BaseModel `tiny-unified`);
2. a small in-memory Kubernetes API (fake_kube.py) holding those BaseModels, their agent pods
   (pointing at the real agents), a tenant namespace with an API-key Secret, two LoraAdapters
   and a BaseModel whose credentials Secret is broken (so reconcile errors exist);
3. the real `loraplane-operator run`, configured by the environment of the chart's rendered
   Deployment: it reconciles, pushes tenants and loads the adapters into the agents;
4. Debian's `prometheus`, scraping the agents and the operator the way the chart's PodMonitor
   and ServiceMonitor would have the Prometheus Operator do it (their selectors, jobLabel and
   relabelings), and evaluating the chart's PrometheusRule;
5. a short workload through the OpenAI API with the tenant's key;
6. then: every alert evaluates without error and reads only metrics that exist; every
   template variable resolves; every query of every dashboard panel returns data, with the
   variables at "All" and at concrete values; the StatefulSets the operator applied give
   agents a termination grace period longer than their drain timeout; the HPAs it applied for
   the autoscaled roles name metrics that the chart's prometheus-adapter rules serve, and
   every rule's query returns one value per agent pod; every Kubernetes call the operator
   made is allowed by the chart's RBAC.

Usage: live_check.py AGENT_BINARY OPERATOR_BINARY
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from common import (
    AGENT_TERMINATION_MARGIN_S,
    CHART,
    HERE,
    NAMESPACE,
    Report,
    env_of,
    find,
    live_values,
    render,
    rules_granted,
    seconds,
    tmpdir,
    write_yaml,
)

TENANT, API_KEY = "team-a", "sk-team-a-chart-test"
PROCS: list[tuple[str, subprocess.Popen]] = []


# -- processes ----------------------------------------------------------------------------------
def start(name: str, argv: list[str], logdir: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(logdir / f"{name}.out", "w")
    err = open(logdir / f"{name}.err", "w")
    p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    PROCS.append((name, p))
    return p


def stop_all():
    for _, p in PROCS:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for _, p in PROCS:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    PROCS.clear()


def wait_for(what: str, fn, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name, p in PROCS:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for {what}")
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def first_json_line(path: Path):
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body=None, headers=None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- the world ----------------------------------------------------------------------------------
def pod_labels(model: str, role: str) -> dict:
    """The labels the operator puts on agent pods (operator/src/desired/mod.rs role_labels);
    checked below against the pod templates of the StatefulSets it really applies."""
    return {
        "app.kubernetes.io/name": "loraplane-agent",
        "app.kubernetes.io/instance": model,
        "app.kubernetes.io/managed-by": "loraplane-operator",
        "app.kubernetes.io/component": role,
        "loraplane.dev/base-model": model,
        "loraplane.dev/role": role,
    }


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def seed(models_dir: Path, adapters_dir: Path, agents: dict[str, dict]) -> list[dict]:
    objs: list[dict] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": TENANT}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{TENANT}-key", "namespace": TENANT, "labels": {"loraplane.dev/api-key": "true"}},
         "type": "Opaque", "data": {"api-key": b64(API_KEY)}},
    ]
    # Both served models are autoscaled, so the operator renders an HPA per role and
    # check_autoscaling can run the prometheus-adapter rules the HPAs depend on.
    for model, mode, serving in [
        ("tiny", "Disaggregated", {
            "prefill": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3, "target": {"queuedPromptTokens": 512}}},
            "decode": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "scaleDownStabilizationSeconds": 60,
                                       "target": {"runningSequences": 4, "kvCacheUtilizationPercent": 50}}}}),
        ("tiny-unified", "Unified", {"unified": {"autoscaling": {"minReplicas": 1, "maxReplicas": 2,
                                                                 "target": {"runningSequences": 8, "kvCacheUtilizationPercent": 80}}}}),
        ("broken", "Unified", {"unified": {"replicas": 1}}),
    ]:
        objs.append({"apiVersion": "loraplane.dev/v1alpha1", "kind": "BaseModel", "metadata": {"name": model, "namespace": NAMESPACE},
                     "spec": {"source": {"uri": f"file://{models_dir / 'tiny'}"}, "serving": {"mode": mode, **serving},
                              "tenancy": {"allowedNamespaces": [TENANT]}}})
        # The operator creates credentials when missing; these are the agents' own. The broken
        # model's Secret lacks its tokens: every reconcile of it fails (the errors panel's data).
        data = {} if model == "broken" else {"admin-token": b64(f"admin-{model}"), "cluster-token": b64(f"cluster-{model}")}
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{model}-agent-credentials", "namespace": NAMESPACE},
                     "type": "Opaque", "data": data})
    for adapter, model in [("sql", "tiny"), ("sql-unified", "tiny-unified")]:
        objs.append({"apiVersion": "loraplane.dev/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": adapter, "namespace": TENANT},
                     "spec": {"baseModel": {"name": model, "namespace": NAMESPACE},
                              "source": {"uri": f"file://{adapters_dir / 'sql'}"}, "replicas": 1}})
    for pod, a in agents.items():
        objs.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": NAMESPACE, "labels": pod_labels(a["model"], a["role"])},
            "spec": {"nodeName": "node-a", "containers": [{"name": "agent", "image": "loraplane-agent", "ports": [
                {"name": "grpc", "containerPort": a["grpc_port"]}, {"name": "http", "containerPort": a["http_port"]},
                {"name": "metrics", "containerPort": a["metrics_port"]}]}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "agent", "ready": True, "restartCount": 0, "image": "x", "imageID": "x", "started": True}]},
        })
    return objs


# -- Prometheus, configured as the Prometheus Operator would from the chart's monitors -----------
def sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def relabelings(rs: list[dict]) -> list[dict]:
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label", "separator": "separator",
            "regex": "regex", "replacement": "replacement", "action": "action", "modulus": "modulus"}
    return [{keys[k]: v for k, v in r.items()} for r in rs]


def scrape_configs(docs: list[dict], agents: dict[str, dict], operator_addr: str) -> list[dict]:
    (pm,) = find(docs, "PodMonitor")
    (sm,) = find(docs, "ServiceMonitor")
    (svc,) = find(docs, "Service")
    (dep,) = find(docs, "Deployment")
    jobs = []
    for i, ep in enumerate(pm["spec"]["podMetricsEndpoints"]):
        keep = [{"source_labels": [f"__meta_kubernetes_pod_label_{sanitize(k)}"], "regex": v, "action": "keep"}
                for k, v in pm["spec"]["selector"]["matchLabels"].items()]
        targets = []
        for pod, a in agents.items():
            labels = {f"__meta_kubernetes_pod_label_{sanitize(k)}": v for k, v in a["labels"].items()}
            labels |= {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": pod,
                       "__meta_kubernetes_pod_container_name": "agent", "__meta_kubernetes_pod_container_port_name": "metrics"}
            targets.append({"targets": [f"127.0.0.1:{a['metrics_port']}"], "labels": labels})
        jobs.append({
            "job_name": f"podMonitor/{NAMESPACE}/{pm['metadata']['name']}/{i}",
            "scrape_interval": "1s", "scrape_timeout": "1s", "metrics_path": ep.get("path", "/metrics"),
            "static_configs": targets,
            "relabel_configs": keep + [
                {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": ep["port"], "action": "keep"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"target_label": "job", "replacement": f"{NAMESPACE}/{pm['metadata']['name']}"},
                {"source_labels": [f"__meta_kubernetes_pod_label_{sanitize(pm['spec']['jobLabel'])}"], "target_label": "job", "regex": "(.+)", "replacement": "${1}"},
                {"target_label": "endpoint", "replacement": ep["port"]},
            ] + relabelings(ep.get("relabelings", [])),
        })
    pod_name = f"{dep['metadata']['name']}-5d8f7c9b4-x2x4q"
    for i, ep in enumerate(sm["spec"]["endpoints"]):
        labels = {f"__meta_kubernetes_service_label_{sanitize(k)}": v for k, v in svc["metadata"]["labels"].items()}
        labels |= {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_service_name": svc["metadata"]["name"],
                   "__meta_kubernetes_pod_name": pod_name, "__meta_kubernetes_pod_container_name": "operator",
                   "__meta_kubernetes_endpoint_port_name": "metrics"}
        keep = [{"source_labels": [f"__meta_kubernetes_service_label_{sanitize(k)}"], "regex": v, "action": "keep"}
                for k, v in sm["spec"]["selector"]["matchLabels"].items()]
        jobs.append({
            "job_name": f"serviceMonitor/{NAMESPACE}/{sm['metadata']['name']}/{i}",
            "scrape_interval": "1s", "scrape_timeout": "1s", "metrics_path": ep.get("path", "/metrics"),
            "static_configs": [{"targets": [operator_addr], "labels": labels}],
            "relabel_configs": keep + [
                {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": ep["port"], "action": "keep"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
                {"source_labels": [f"__meta_kubernetes_service_label_{sanitize(sm['spec']['jobLabel'])}"], "target_label": "job", "regex": "(.+)", "replacement": "${1}"},
                {"target_label": "endpoint", "replacement": ep["port"]},
            ] + relabelings(ep.get("relabelings", [])),
        })
    return jobs


class Prom:
    def __init__(self, base: str):
        self.base = base

    def get(self, path: str, **params):
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        code, body = http("GET", url)
        data = json.loads(body)
        if code != 200 or data.get("status") != "success":
            raise RuntimeError(f"{data.get('errorType')}: {data.get('error')}")
        return data["data"]


# -- checks -------------------------------------------------------------------------------------
def substitute(expr: str, variables: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", "1m").replace("${__rate_interval}", "1m")
    for k, v in variables.items():
        expr = expr.replace(f"${{{k}}}", v).replace(f"${k}", v)
    return expr


def has_data(result: list[dict]) -> bool:
    for series in result:
        values = series.get("values") or [series.get("value")]
        if any(v and v[1] not in ("NaN", "+Inf", "-Inf") for v in values):
            return True
    return False


def check_dashboard(rep: Report, prom: Prom, start_ts: float):
    dash = json.loads((CHART / "dashboards" / "loraplane.json").read_text())
    variables = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    concrete: dict[str, str] = {}
    for v in variables:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
        if not rep.check(bool(m), f"variable ${v['name']} is a label_values() query", q):
            continue
        selector, label = substitute(m.group(1), concrete), m.group(2)
        try:
            res = prom.get("/api/v1/query", query=f"group by ({label}) ({selector})")
            values = sorted(r["metric"].get(label, "") for r in res["result"])
        except RuntimeError as e:
            rep.fail(f"variable ${v['name']} resolves", str(e))
            continue
        if rep.check(bool(values), f"variable ${v['name']} resolves: {values}"):
            want = {"namespace": NAMESPACE, "base_model": "tiny", "pod": "tiny-decode-0"}.get(v["name"], values[0])
            rep.check(want in values, f"variable ${v['name']} offers {want}")
            concrete[v["name"]] = want
    modes = {"All": {v["name"]: v.get("allValue") or ".*" for v in variables}, "concrete": concrete}
    now = time.time()
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            for mode, vars_ in modes.items():
                expr = substitute(t["expr"], vars_)
                what = f"panel {panel['title']!r} {t['refId']} ({mode}: {', '.join(f'{k}={v}' for k, v in vars_.items())})"
                try:
                    res = prom.get("/api/v1/query_range", query=expr, start=f"{start_ts:.3f}", end=f"{now:.3f}", step="1")
                except RuntimeError as e:
                    rep.fail(what, f"{e} in {expr}")
                    continue
                rep.check(has_data(res["result"]), what + " returns data", f"no data for {expr}")


def check_alerts(rep: Report, prom: Prom, groups: list[dict]):
    def rules_evaluated():
        got = prom.get("/api/v1/rules")["groups"]
        rules = [r for g in got for r in g["rules"]]
        return got if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    got = wait_for("every rule evaluated once", rules_evaluated, 20)
    loaded = {r["name"]: r for g in got for r in g["rules"]}
    for g in groups:
        for rule in g["rules"]:
            name = rule.get("alert") or rule.get("record")
            r = loaded.get(name)
            if not rep.check(r is not None, f"alert {name} is loaded by Prometheus"):
                continue
            rep.check(r["health"] == "ok" and not r.get("lastError"), f"alert {name} evaluates without error", r.get("lastError", r["health"]))
            try:
                prom.get("/api/v1/query", query=rule["expr"])
                rep.ok(f"alert {name} expression parses and runs as a query")
            except RuntimeError as e:
                rep.fail(f"alert {name} expression parses and runs as a query", str(e))
            names = set(re.findall(r"\b((?:loraplane_|vllm:)[a-zA-Z0-9_:]+|up)\s*\{", rule["expr"]))
            missing = [n for n in sorted(names) if not prom.get("/api/v1/series", **{"match[]": f'{{__name__="{n}"}}'})]
            rep.check(not missing, f"alert {name} reads only scraped metrics ({', '.join(sorted(names))})", f"absent: {missing}")


def check_rbac(rep: Report, docs: list[dict], kube: str):
    granted_cluster = rules_granted(find(docs, "ClusterRole"))
    granted_ns = rules_granted(find(docs, "Role"))
    _, body = http("GET", f"{kube}/_requests")
    denied = set()
    calls = json.loads(body)["requests"]
    for call in calls:
        method, _, path = call.partition(" ")
        watch = path.endswith("?watch")
        segs = path.removesuffix("?watch").strip("/").split("/")
        group, rest = ("", segs[2:]) if segs[0] == "api" else (segs[1], segs[3:])
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        named = len(rest) > 1
        verb = {"GET": "watch" if watch else ("get" if named else "list"), "POST": "create", "PUT": "update",
                "PATCH": "patch", "DELETE": "delete" if named else "deletecollection"}[method]
        t = (group, resource, verb)
        if not (t in granted_cluster or (t in granted_ns and ns == NAMESPACE)):
            denied.add(f"{verb} {group or 'core'}/{resource}" + (f" in {ns}" if ns else ""))
    rep.check(bool(calls) and not denied, f"the chart's RBAC allows every one of the operator's {len(calls)} API calls", f"denied: {sorted(denied)}")


def check_statefulsets(rep: Report, kube: str, env: dict, agents: dict):
    _, body = http("GET", f"{kube}/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets")
    sts = json.loads(body)["items"]
    names = sorted(s["metadata"]["name"] for s in sts)
    rep.check({"tiny-prefill", "tiny-decode", "tiny-unified-unified"} <= set(names), f"the operator applied the agents' StatefulSets ({', '.join(names)})")
    drain = seconds(env["LORAPLANE_AGENT_DRAIN_TIMEOUT"])
    for s in sts:
        spec = s["spec"]["template"]["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        rep.check(grace > drain, f"StatefulSet {s['metadata']['name']}: terminationGracePeriodSeconds {grace} > agent drain timeout {drain:g}s (LORAPLANE_AGENT_DRAIN_TIMEOUT)")
        rep.check(grace == drain + AGENT_TERMINATION_MARGIN_S, f"StatefulSet {s['metadata']['name']}: the margin past the drain is {AGENT_TERMINATION_MARGIN_S:g}s, as the static check assumes", f"{grace - drain:g}s")
        role = s["spec"]["template"]["metadata"]["labels"].get("loraplane.dev/role")
        model = s["spec"]["template"]["metadata"]["labels"].get("loraplane.dev/base-model")
        rep.check(s["spec"]["template"]["metadata"]["labels"] == pod_labels(model, role),
                  f"StatefulSet {s['metadata']['name']}: its pods carry the labels the PodMonitor and this test expect")
        ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        rep.check(ports.get("metrics") == 9400 and ports.get("http") != ports.get("metrics"),
                  f"StatefulSet {s['metadata']['name']}: its agents serve /metrics on the `metrics` port the PodMonitor scrapes, apart from the API", f"{ports}")


def check_autoscaling(rep: Report, prom: Prom, kube: str, agents: dict):
    """The HPAs the operator applied name metrics the chart's prometheus-adapter rules serve,
    and each rule's query, templated the way prometheus-adapter does for the HPA's pods,
    returns one value per agent pod from the live agents' series."""
    _, body = http("GET", f"{kube}/apis/autoscaling/v2/namespaces/{NAMESPACE}/horizontalpodautoscalers")
    hpas = json.loads(body)["items"]
    names = sorted(h["metadata"]["name"] for h in hpas)
    rep.check(names == ["tiny-decode", "tiny-prefill", "tiny-unified-unified"], f"the operator applied one HPA per autoscaled role ({', '.join(names)})")
    _, body = http("GET", f"{kube}/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets")
    sts = {s["metadata"]["name"]: s for s in json.loads(body)["items"]}
    rules = {r["name"]["as"]: r for r in yaml.safe_load((CHART / "files" / "prometheus-adapter-rules.yaml").read_text())["rules"]}
    for name, rule in sorted(rules.items()):
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
        rep.check(re.search(rule["name"]["matches"], series) is not None, f"adapter rule {name}: name.matches matches its series {series}")
        found = prom.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
        rep.check(bool(found) and all(f.get("namespace") and f.get("pod") for f in found),
                  f"adapter rule {name}: its seriesQuery finds the agents' series, with namespace and pod ({len(found)})")
    for h in hpas:
        target = h["spec"]["scaleTargetRef"]["name"]
        rep.check(target in sts and "replicas" not in sts[target]["spec"], f"HPA {h['metadata']['name']}: StatefulSet {target} leaves replicas to it")
        pods = sorted(p for p, a in agents.items() if f"{a['model']}-{a['role']}" == target)
        for m in h["spec"]["metrics"]:
            name = m["pods"]["metric"]["name"]
            what = f"HPA {h['metadata']['name']} metric {name}"
            rule = rules.get(name)
            if not rep.check(rule is not None, f"{what} is served by a prometheus-adapter rule"):
                continue
            series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
            matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(pods)}"'
            q = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
                 .replace("<<.GroupBy>>", "namespace,pod"))
            try:
                res = prom.get("/api/v1/query", query=q)["result"]
            except RuntimeError as e:
                rep.fail(f"{what}: the adapter's query runs", f"{e} in {q}")
                continue
            got = sorted(r["metric"].get("pod", "") for r in res)
            values = [float(r["value"][1]) for r in res]
            ok = got == pods and all(v >= 0 for v in values) and (name != "loraplane_kv_cache_utilization" or all(v <= 1 for v in values))
            rep.check(ok, f"{what}: the adapter's query gives one value per agent pod ({', '.join(f'{p}={v:g}' for p, v in zip(got, values))})", q)


def run(agent_bin: str, operator_bin: str) -> int:
    rep = Report("chart-test live")
    tmp = tmpdir() / "live"
    shutil.rmtree(tmp, ignore_errors=True)
    logs = tmp / "logs"
    logs.mkdir(parents=True)
    docs = render(live_values())
    (dep,) = find(docs, "Deployment")
    groups = [g for r in find(docs, "PrometheusRule") for g in r["spec"]["groups"]]

    rep.section("processes")
    models, adapters = tmp / "models", tmp / "adapters"
    subprocess.run([agent_bin, "fixtures", "model", "--preset", "tiny", "--out", str(models / "tiny")], check=True, capture_output=True)
    subprocess.run([agent_bin, "fixtures", "adapter", "--model", str(models / "tiny"), "--rank", "8", "--out", str(adapters / "sql")], check=True, capture_output=True)
    agents: dict[str, dict] = {}

    def agent(pod: str, model: str, role: str, extra: list[str]):
        for kind in ("admin", "cluster"):
            (tmp / f"{model}-{kind}-token").write_text(f"{kind}-{model}")
        argv = [agent_bin, "serve", "--role", role, "--model", str(models / "tiny"), "--served-model-name", model,
                "--adapter-roots", str(adapters), "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
                "--admin-token-file", str(tmp / f"{model}-admin-token"), "--log-format", "json"] + extra
        if role != "unified":
            argv += ["--cluster-token-file", str(tmp / f"{model}-cluster-token")]
        start(pod, argv, logs)
        listening = wait_for(f"{pod} listening", lambda: first_json_line(logs / f"{pod}.out"), 30)
        agents[pod] = {"model": model, "role": role, "labels": pod_labels(model, role), "listening": listening,
                       "grpc_port": int(listening["grpc"].rsplit(":", 1)[1]), "http_port": int(listening["http"].rsplit(":", 1)[1]),
                       "metrics_port": int(listening["metrics"].rsplit(":", 1)[1]),
                       "http": f"http://{listening['http']}"}

    agent("tiny-prefill-0", "tiny", "prefill", ["--kv-addr", "127.0.0.1:0"])
    agent("tiny-decode-0", "tiny", "decode", ["--prefill-peers", agents["tiny-prefill-0"]["listening"]["kv"], "--local-prefill-threshold", "8"])
    agent("tiny-unified-unified-0", "tiny-unified", "unified", [])
    listening = ", ".join(f"{p}={a['listening']['http']}" for p, a in agents.items())
    rep.ok(f"3 agents listening ({listening})")

    seed_file = tmp / "seed.yaml"
    seed_file.write_text(yaml.safe_dump_all(seed(models, adapters, agents)))
    start("fake-kube", [sys.executable, str(HERE / "fake_kube.py"), "--seed", str(seed_file), "--port-file", str(tmp / "kube.port")], logs)
    kube = "http://127.0.0.1:" + wait_for("the Kubernetes API", lambda: (tmp / "kube.port").exists() and (tmp / "kube.port").read_text(), 10)
    write_yaml(tmp / "kubeconfig", {
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": kube}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}]})

    # The operator, configured exactly as the chart's Deployment configures it (but on loopback).
    env = env_of(dep)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLANE_")}
    run_env |= env | {"LORAPLANE_METRICS_ADDR": "127.0.0.1:0", "LORAPLANE_POD_NAME": "lp-loraplane-operator-0",
                      "LORAPLANE_POD_NAMESPACE": NAMESPACE, "KUBECONFIG": str(tmp / "kubeconfig")}
    start("operator", [operator_bin] + dep["spec"]["template"]["spec"]["containers"][0]["args"], logs, env=run_env)

    def operator_addr():
        for line in (logs / "operator.err").read_text().splitlines():
            if '"bound"' in line:
                return json.loads(line)["fields"]["bound"]
        return None

    op_addr = wait_for("the operator's metrics address", operator_addr, 20)
    rep.ok(f"operator serving /metrics on {op_addr}, Kubernetes API on {kube}")

    def adapters_ready():
        _, body = http("GET", f"{kube}/apis/loraplane.dev/v1alpha1/namespaces/{TENANT}/loraadapters")
        items = json.loads(body)["items"]
        return all((i.get("status") or {}).get("phase") == "Ready" for i in items) and items

    wait_for("both LoraAdapters Ready (loaded by the operator into the agents)", adapters_ready, 60, 0.5)
    rep.ok("the operator loaded both LoraAdapters into the agents (phase Ready)")

    rules_file = write_yaml(tmp / "rules.yaml", {"groups": groups})
    prom_port = free_port()
    write_yaml(tmp / "prometheus.yml", {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": scrape_configs(docs, agents, op_addr)})
    start("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], logs)
    prom = Prom(f"http://127.0.0.1:{prom_port}")

    def targets_up():
        active = prom.get("/api/v1/targets", state="active")["activeTargets"]
        return len(active) == len(agents) + 1 and all(t["health"] == "up" for t in active) and active

    up = wait_for("every target up", targets_up, 30, 0.5)
    rep.ok(f"Prometheus scrapes {len(up)} targets selected through the chart's PodMonitor and ServiceMonitor: "
           + ", ".join(f"{t['labels'].get('job')}/{t['labels'].get('pod')}" for t in up))

    rep.section("workload")
    start_ts = time.time() - 2
    auth = {"Authorization": f"Bearer {API_KEY}"}
    prompt = "The quick brown fox jumps over the lazy dog and keeps running across the field"
    failures: list[str] = []
    sent = {"ok": 0, "refused": 0}

    def call(base, body, want=200):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        code, text = http("POST", base + path, body, auth)
        sent["ok" if want == 200 else "refused"] += 1
        if code != want:
            failures.append(f"{path} {body.get('model')}: {code} {text[:200]}")

    decode, unified = agents["tiny-decode-0"]["http"], agents["tiny-unified-unified-0"]["http"]
    for round_ in range(4):
        threads = [threading.Thread(target=call, args=(decode, {"model": "sql", "prompt": f"{prompt} {i}", "max_tokens": 12})) for i in range(4)]
        threads += [threading.Thread(target=call, args=(unified, {"model": "sql-unified", "prompt": f"{prompt} {i}", "max_tokens": 12})) for i in range(2)]
        threads += [threading.Thread(target=call, args=(decode, {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "stream": True}))]
        threads += [threading.Thread(target=call, args=(unified, {"model": "tiny-unified", "prompt": prompt, "max_tokens": 8}))]
        threads += [threading.Thread(target=call, args=(decode, {"model": "no-such-adapter", "prompt": "x", "max_tokens": 2}, 404))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        time.sleep(1.5)
    rep.check(not failures, f"{sent['ok']} requests through the OpenAI API with the tenant's key, {sent['refused']} refused as model_not_found", "; ".join(failures[:5]))
    time.sleep(3)  # a few more scrapes after the last request

    rep.section("alerts (the chart's PrometheusRule, loaded by Prometheus)")
    check_alerts(rep, prom, groups)
    rep.section("dashboard (every query of every panel, through Prometheus' HTTP API)")
    check_dashboard(rep, prom, start_ts)
    rep.section("what the operator did")
    check_statefulsets(rep, kube, env, agents)
    rep.section("autoscaling (the operator's HPAs through the chart's prometheus-adapter rules)")
    check_autoscaling(rep, prom, kube, agents)
    rep.section("RBAC")
    check_rbac(rep, docs, kube)
    return rep.close()


def main() -> int:
    agent_bin, operator_bin = sys.argv[1], sys.argv[2]
    if not shutil.which("prometheus"):
        print("chart-test live: Debian's `prometheus` is not installed", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return run(agent_bin, operator_bin)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as e:
        print(f"\nchart-test live: FAIL {e}", flush=True)
        logs = tmpdir() / "live" / "logs"
        for f in sorted(logs.glob("*.err")):
            tail = f.read_text().splitlines()[-8:]
            print(f"--- {f.name} (last lines)\n" + "\n".join(line[:400] for line in tail))
        print("\nchart-test live: 0 passed, 1 failed", flush=True)
        return 1
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
