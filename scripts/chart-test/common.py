"""Shared pieces of the chart test: the value sets, rendering with Helm's own library
(`helm-python-sdk`, which embeds Helm's Go SDK: no `helm` binary), durations, and the report.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "charts" / "loraplane"
RELEASE = "lp"
NAMESPACE = "loraplane-system"
# The extra seconds the operator gives agent pods past their drain timeout
# (`AgentParams::termination_margin` in operator/src/desired/mod.rs). The live test reads the
# real value off the StatefulSets a real operator applies, and fails if it differs.
AGENT_TERMINATION_MARGIN_S = 15.0


def value_sets() -> dict[str, dict]:
    """The renderings every static check covers: the defaults plus each `ci/*-values.yaml`."""
    sets = {"default": {}}
    for f in sorted((CHART / "ci").glob("*-values.yaml")):
        sets[f.name.removesuffix("-values.yaml")] = yaml.safe_load(f.read_text()) or {}
    return sets


def live_values() -> dict:
    """The rendering the live test runs: defaults with every monitoring object on."""
    return {
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        "prometheusRule": {"enabled": True},
    }


def merged(values: dict) -> dict:
    """The chart's defaults with `values` merged in (what Helm renders with)."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            out = copy.deepcopy(a)
            for k, v in b.items():
                out[k] = merge(a.get(k), v)
            return out
        return copy.deepcopy(b)

    return merge(base, values)


def render(values: dict) -> list[dict]:
    """Renders the chart; returns every manifest (NOTES.txt and empty documents dropped),
    each with `__source__` naming its template."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for source, text in sorted(out.items()):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source__"] = source
                docs.append(doc)
    return docs


def find(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def seconds(duration: str | int | float) -> float:
    """`30s`, `2m`, `500ms`, `1h`, or plain seconds (the operator's and agent's grammar)."""
    s = str(duration).strip()
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?", s)
    if not m:
        raise ValueError(f"not a duration: {duration!r}")
    n, unit = float(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def env_of(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def rules_granted(docs: list[dict]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) triples the rendered ClusterRoles and Roles grant."""
    out = set()
    for d in find(docs, "ClusterRole") + find(docs, "Role"):
        for rule in d.get("rules", []):
            for g in rule.get("apiGroups", []):
                for r in rule.get("resources", []):
                    for v in rule.get("verbs", []):
                        out.add((g, r, v))
    return out


class Report:
    """Prints one line per check and a closing `N passed, N failed, N skipped` line."""

    def __init__(self, name: str):
        self.name = name
        self.passed = self.failed = self.skipped = 0

    def ok(self, what: str):
        self.passed += 1
        print(f"  PASS {what}", flush=True)

    def fail(self, what: str, why: str = ""):
        self.failed += 1
        print(f"  FAIL {what}" + (f": {why}" if why else ""), flush=True)

    def skip(self, what: str, why: str):
        self.skipped += 1
        print(f"  SKIP {what}: {why}", flush=True)

    def check(self, cond: bool, what: str, why: str = "") -> bool:
        (self.ok if cond else lambda w: self.fail(w, why))(what)
        return cond

    def section(self, title: str):
        print(f"\n-- {title}", flush=True)

    def close(self) -> int:
        print(f"\n{self.name}: {self.passed} passed, {self.failed} failed, {self.skipped} skipped", flush=True)
        return 1 if self.failed else 0


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path




def tmpdir() -> Path:
    d = Path(os.environ.get("CHART_TEST_TMP") or (ROOT / "target" / "chart-test"))
    d.mkdir(parents=True, exist_ok=True)
    return d
