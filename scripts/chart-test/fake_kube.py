#!/usr/bin/env python3
"""A small in-memory Kubernetes API server for the chart test's live run.

It lets the real `loraplane-operator run` start without a cluster, so Prometheus can scrape the
operator's `/metrics` after real reconciles against real agents. It is deliberately generic (no
knowledge of loraplane beyond the kind names of a few plurals), the way the operator's own
`operator/src/fixtures/api.rs` mock is:

- GET an object or a collection (label selectors: `k=v`, `k!=v`, `k`, `!k`), and `watch=true`
  streams ADDED/MODIFIED/DELETED events of later writes until `timeoutSeconds`;
- POST (create; 409 when it exists), PUT (replace; 409 on a stale resourceVersion), PATCH
  (server-side apply, JSON merge, strategic merge treated as merge, JSON patch with `test`;
  `/status` patches only the status), DELETE (an object with finalizers gets a
  deletionTimestamp instead);
- answers in Kubernetes' shapes (`Status` errors, `List` kinds, resourceVersions, uids);
- `GET /_requests` lists every call so far (`METHOD /path`, `?watch` for watches), so the
  test can hold them against the chart's RBAC.

It is not a conformance-grade API server: no admission, validation, defaulting, garbage
collection or field ownership. It is enough for list/watch caches and idempotent applies.

Usage: fake_kube.py --seed seed.yaml --port-file PATH
  seed.yaml: a multi-document YAML of objects (with apiVersion, kind, metadata) to start with.
"""

from __future__ import annotations

import argparse
import copy
import json
import queue
import re
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

KINDS = {
    "pods": "Pod",
    "services": "Service",
    "configmaps": "ConfigMap",
    "secrets": "Secret",
    "namespaces": "Namespace",
    "events": "Event",
    "statefulsets": "StatefulSet",
    "deployments": "Deployment",
    "poddisruptionbudgets": "PodDisruptionBudget",
    "horizontalpodautoscalers": "HorizontalPodAutoscaler",
    "scaledobjects": "ScaledObject",
    "leases": "Lease",
    "basemodels": "BaseModel",
    "loraadapters": "LoraAdapter",
}
CLUSTER_SCOPED = {"namespaces"}
PLURAL = {v: k for k, v in KINDS.items()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path: str):
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc, ops):
    """RFC 6902 (add, remove, replace, test, copy/move not needed)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1] if parts else None
        kind = op["op"]
        if kind == "test":
            cur = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if cur != op.get("value"):
                raise PatchConflict(f"test failed at {op['path']}: {cur!r} != {op.get('value')!r}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
        else:
            raise ValueError(f"unsupported JSON patch op {kind}")
    return doc


class PatchConflict(Exception):
    pass


def selector_matches(selector: str, labels: dict) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        term = term.strip()
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "==" in term or "=" in term:
            k, v = re.split("==?", term, maxsplit=1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif " in " in term or " notin " in term:
            k, op, vals = re.match(r"(\S+)\s+(in|notin)\s+\((.*)\)", term).groups()
            vals = {x.strip() for x in vals.split(",")}
            if (labels.get(k) in vals) != (op == "in"):
                return False
        elif term not in labels:
            return False
    return True


class Store:
    def __init__(self):
        self.lock = threading.Lock()
        self.rv = 1
        # (group, plural) -> {(namespace, name): obj}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self.watchers: list[tuple[tuple[str, str], str | None, str, queue.Queue]] = []
        self.requests: list[str] = []
        # (resourceVersion, key, event type, object): replayed to a watch that starts behind.
        self.log: list[tuple[int, tuple[str, str], str, dict]] = []

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def notify(self, key, event_type, obj):
        if event_type == "DELETED":
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = self.next_rv()
        self.log.append((int(obj["metadata"]["resourceVersion"]), key, event_type, copy.deepcopy(obj)))
        ns = obj["metadata"].get("namespace")
        labels = obj["metadata"].get("labels") or {}
        for wkey, wns, wsel, q in list(self.watchers):
            if wkey == key and (wns is None or wns == ns) and selector_matches(wsel, labels):
                q.put({"type": event_type, "object": copy.deepcopy(obj)})

    def put(self, key, obj, event_type):
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = self.next_rv()
        self.objects.setdefault(key, {})[(meta.get("namespace"), meta["name"])] = obj
        self.notify(key, event_type, obj)

    def seed(self, obj):
        group, _, version = obj["apiVersion"].rpartition("/")
        plural = PLURAL[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        meta.setdefault("generation", 1)
        if plural in CLUSTER_SCOPED:
            meta.pop("namespace", None)
        else:
            meta.setdefault("namespace", "default")
        self.put((group, plural), obj, "ADDED")


class Route:
    """`/api/v1[/namespaces/NS]/PLURAL[/NAME[/SUB]]` or `/apis/G/V[/namespaces/NS]/…`."""

    def __init__(self, path: str):
        segs = [unquote(s) for s in path.strip("/").split("/")]
        if segs[0] == "api":
            self.group, self.version, rest = "", segs[1], segs[2:]
        elif segs[0] == "apis" and len(segs) >= 3:
            self.group, self.version, rest = segs[1], segs[2], segs[3:]
        else:
            raise LookupError(path)
        self.namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            self.namespace, rest = rest[1], rest[2:]
        if not rest:
            raise LookupError(path)
        self.plural = rest[0]
        self.name = rest[1] if len(rest) > 1 else None
        self.sub = rest[2] if len(rest) > 2 else None
        self.key = (self.group, self.plural)
        self.api_version = f"{self.group}/{self.version}" if self.group else self.version
        self.kind = KINDS.get(self.plural, self.plural[:-1].capitalize())


def status_body(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: Store = None  # set by main

    def log_message(self, fmt, *args):  # quiet: the test prints a summary instead
        pass

    # -- plumbing --------------------------------------------------------------------------
    def send_json(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fail(self, code: int, reason: str, message: str):
        self.send_json(code, status_body(code, reason, message))

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return None
        ctype = self.headers.get("Content-Type", "")
        return yaml.safe_load(raw) if "yaml" in ctype else json.loads(raw)

    def route(self):
        url = urlparse(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/_requests":  # the test's view of every call made so far
            self.send_json(200, {"requests": list(self.store.requests)})
            return None
        self.store.requests.append(f"{self.command} {url.path}" + ("?watch" if self.query.get("watch") in ("true", "1") else ""))
        try:
            return Route(url.path)
        except LookupError:
            self.fail(404, "NotFound", f"no route {url.path}")
            return None

    def dispatch(self, fn):
        r = self.route()
        if r is None:
            return
        try:
            fn(r)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except PatchConflict as e:
            print(f"{self.command} {self.path}: {e}", file=sys.stderr, flush=True)
            self.fail(422, "Invalid", str(e))
        except Exception as e:  # a bug here must show up as an API error, not a hang
            self.fail(500, "InternalError", f"{type(e).__name__}: {e}")

    # -- verbs -----------------------------------------------------------------------------
    def do_GET(self):
        self.dispatch(self.get)

    def do_POST(self):
        self.dispatch(self.create)

    def do_PUT(self):
        self.dispatch(self.replace)

    def do_PATCH(self):
        self.dispatch(self.patch)

    def do_DELETE(self):
        self.dispatch(self.delete)

    def get(self, r: Route):
        s = self.store
        if r.name:
            with s.lock:
                obj = s.objects.get(r.key, {}).get((r.namespace, r.name))
            if obj is None:
                return self.fail(404, "NotFound", f'{r.plural} "{r.name}" not found')
            return self.send_json(200, obj)
        selector = self.query.get("labelSelector", "")
        if self.query.get("watch") in ("true", "1"):
            return self.watch(r, selector)
        with s.lock:
            items = [
                copy.deepcopy(o)
                for (ns, _), o in sorted(s.objects.get(r.key, {}).items(), key=lambda kv: kv[0][1])
                if (r.namespace is None or ns == r.namespace)
                and selector_matches(selector, o["metadata"].get("labels") or {})
            ]
            rv = str(s.rv)
        self.send_json(
            200,
            {
                "kind": f"{r.kind}List",
                "apiVersion": r.api_version,
                "metadata": {"resourceVersion": rv},
                "items": items,
            },
        )

    def watch(self, r: Route, selector: str):
        q: queue.Queue = queue.Queue()
        entry = (r.key, r.namespace, selector, q)
        since = int(self.query.get("resourceVersion") or 0)
        with self.store.lock:
            self.store.watchers.append(entry)
            for rv, key, event_type, obj in self.store.log:
                labels = obj["metadata"].get("labels") or {}
                if (
                    rv > since
                    and key == r.key
                    and (r.namespace is None or obj["metadata"].get("namespace") == r.namespace)
                    and selector_matches(selector, labels)
                ):
                    q.put({"type": event_type, "object": copy.deepcopy(obj)})
        deadline = time.monotonic() + min(float(self.query.get("timeoutSeconds", 60)), 300)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while time.monotonic() < deadline and not STOP.is_set():
                try:
                    ev = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                line = (json.dumps(ev) + "\n").encode()
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            with self.store.lock:
                self.store.watchers.remove(entry)

    def _stamp(self, r: Route, obj: dict):
        obj["apiVersion"], obj["kind"] = r.api_version, r.kind
        meta = obj.setdefault("metadata", {})
        meta["name"] = meta.get("name") or r.name
        if r.plural not in CLUSTER_SCOPED:
            meta["namespace"] = r.namespace or meta.get("namespace") or "default"
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now())
        meta.setdefault("generation", 1)
        return obj

    def create(self, r: Route):
        obj = self.body() or {}
        if not obj.get("metadata", {}).get("name") and obj.get("metadata", {}).get("generateName"):
            obj["metadata"]["name"] = obj["metadata"]["generateName"] + uuid.uuid4().hex[:5]
        obj = self._stamp(r, obj)
        s = self.store
        with s.lock:
            if (obj["metadata"].get("namespace"), obj["metadata"]["name"]) in s.objects.get(r.key, {}):
                return self.fail(409, "AlreadyExists", f'{r.plural} "{obj["metadata"]["name"]}" already exists')
            s.put(r.key, obj, "ADDED")
            out = copy.deepcopy(obj)
        self.send_json(201, out)

    def replace(self, r: Route):
        new = self._stamp(r, self.body() or {})
        s = self.store
        with s.lock:
            old = s.objects.get(r.key, {}).get((r.namespace, r.name))
            if old is None:
                return self.fail(404, "NotFound", f'{r.plural} "{r.name}" not found')
            want = new["metadata"].get("resourceVersion")
            if want and want != old["metadata"]["resourceVersion"]:
                return self.fail(409, "Conflict", "the object has been modified")
            if r.sub == "status":
                merged = copy.deepcopy(old)
                merged["status"] = new.get("status")
                new = merged
            else:
                new["metadata"]["uid"] = old["metadata"]["uid"]
                new["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
                if new.get("spec") != old.get("spec"):
                    new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            s.put(r.key, new, "MODIFIED")
            out = copy.deepcopy(new)
        self.send_json(200, out)

    def patch(self, r: Route):
        ctype = self.headers.get("Content-Type", "")
        body = self.body()
        s = self.store
        with s.lock:
            old = s.objects.get(r.key, {}).get((r.namespace, r.name))
            if old is None:
                if "apply-patch" not in ctype or r.sub:
                    return self.fail(404, "NotFound", f'{r.plural} "{r.name}" not found')
                new = self._stamp(r, body)
                s.put(r.key, new, "ADDED")
                out, code = copy.deepcopy(new), 201
            else:
                if "json-patch" in ctype:
                    patched = json_patch(old, body)
                else:  # apply, merge and strategic merge: a recursive merge is close enough
                    patched = merge_patch(old, body)
                if r.sub == "status":
                    new = copy.deepcopy(old)
                    new["status"] = patched.get("status")
                else:
                    new = patched
                    new["status"] = old.get("status") if "status" in old else new.get("status")
                    if new.get("spec") != old.get("spec"):
                        new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
                new["metadata"]["uid"] = old["metadata"]["uid"]
                if new == old:
                    out, code = copy.deepcopy(old), 200
                else:
                    finalized = new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers")
                    if finalized:
                        del s.objects[r.key][(r.namespace, r.name)]
                        s.notify(r.key, "DELETED", new)
                    else:
                        s.put(r.key, new, "MODIFIED")
                    out, code = copy.deepcopy(new), 200
        self.send_json(code, out)

    def delete(self, r: Route):
        s = self.store
        with s.lock:
            old = s.objects.get(r.key, {}).get((r.namespace, r.name))
            if old is None:
                return self.fail(404, "NotFound", f'{r.plural} "{r.name}" not found')
            if old["metadata"].get("finalizers"):
                old["metadata"].setdefault("deletionTimestamp", now())
                s.put(r.key, old, "MODIFIED")
                out = copy.deepcopy(old)
            else:
                del s.objects[r.key][(r.namespace, r.name)]
                s.notify(r.key, "DELETED", old)
                out = status_body(200, "", "deleted")
        self.send_json(200, out)


STOP = threading.Event()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", required=True)
    ap.add_argument("--port-file", required=True)
    args = ap.parse_args()
    store = Store()
    with open(args.seed) as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                store.seed(doc)
    Handler.store = store
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True

    def stop(*_):
        STOP.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    import os

    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
