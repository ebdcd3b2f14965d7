#!/usr/bin/env python3
"""The HF PEFT baseline as an OpenAI-compatible server, so `loraplane-bench serving`
drives it exactly as it drives loraplane.

It loads a checkpoint directory with transformers (eager PyTorch, float32), every PEFT adapter
directory under --adapters (named after the directory, as `loraplane-agent serve --adapters`
names them), and serves `POST /v1/completions` (streaming SSE or not) and `GET /v1/models`.
Requests wait in one queue; a single worker takes up to --max-batch of them at a time (while
they keep arriving) and runs
PEFT's mixed-adapter batched generation, `model.generate(..., adapter_names=[...])`, greedy,
streaming each row's tokens as they are produced. This is static batching: a batch runs to the
longest `max_tokens` in it before the next one starts, as `generate` does.

Supported request fields: `model` (an adapter name, or the served base-model name), `prompt`
(token ids, a string, or a one-element list of either), `max_tokens`, `temperature` (0 only:
the baseline is greedy), `stream`, `stream_options.include_usage`, `logprobs` (0: the sampled
token's log-probability), `ignore_eos`. Others are ignored, as OpenAI's API ignores unknown
fields.

On start it prints one line on stdout, `{"event": "listening", "http": "HOST:PORT"}`, like
`loraplane-agent serve`; logs go to stderr.
"""

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList


def log(*args):
    print("[peft-baseline]", *args, file=sys.stderr, flush=True)


class BadRequest(Exception):
    pass


class Job:
    """One request: its input, and the queue its events go to."""

    def __init__(self, model, ids, max_tokens, ignore_eos, logprobs):
        self.model = model
        self.ids = ids
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.logprobs = logprobs
        self.events = queue.Queue()
        self.generated = 0
        self.done = False


class LogprobTap(LogitsProcessor):
    """Keeps each step's log-softmax of the scores greedy search picks from."""

    def __init__(self):
        self.last = None

    def __call__(self, input_ids, scores):
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class BatchStreamer:
    """`generate`'s streamer for a batch: routes each row's new token to its request."""

    def __init__(self, jobs, eos_ids, tap):
        self.jobs = jobs
        self.eos_ids = eos_ids
        self.tap = tap
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            # The first call carries the prompts.
            self.prompt_seen = True
            return
        tokens = value.tolist()
        for row, (job, tok) in enumerate(zip(self.jobs, tokens)):
            if job.done:
                continue
            lp = None
            if job.logprobs and self.tap is not None and self.tap.last is not None:
                lp = float(self.tap.last[row, tok])
            job.generated += 1
            if not job.ignore_eos and tok in self.eos_ids:
                job.done = True
                job.events.put(("finish", "stop"))
                continue
            job.events.put(("token", tok, lp))
            if job.generated >= job.max_tokens:
                job.done = True
                job.events.put(("finish", "length"))

    def end(self):
        for job in self.jobs:
            if not job.done:
                job.done = True
                job.events.put(("finish", "length"))


class Engine:
    def __init__(self, model_dir, adapters_dir, served_name, max_batch, batch_wait):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        base.eval()
        names = []
        if adapters_dir:
            for entry in sorted(os.listdir(adapters_dir)):
                path = os.path.join(adapters_dir, entry)
                if os.path.isfile(os.path.join(path, "adapter_config.json")):
                    names.append((entry, path))
        if names:
            first, path = names[0]
            model = PeftModel.from_pretrained(base, path, adapter_name=first)
            for name, path in names[1:]:
                model.load_adapter(path, adapter_name=name)
            model.eval()
        else:
            model = base
        self.model = model
        self.adapters = {n for n, _ in names}
        self.served_name = served_name
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        eos = set()
        for source in (base.config.eos_token_id, getattr(base.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.queue = queue.Queue()
        log(f"loaded {model_dir} and {len(names)} adapters; batches of up to {max_batch}")
        threading.Thread(target=self.run, daemon=True).start()

    def token_text(self, tok):
        return self.tokenizer.decode([tok], skip_special_tokens=True)

    def encode(self, prompt):
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
            ids = prompt
        else:
            raise BadRequest("prompt must be a string, token ids, or a one-element list of either")
        if not ids:
            raise BadRequest("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in ids):
            raise BadRequest(f"token ids must be below the vocabulary size {vocab}")
        return ids

    def run(self):
        while True:
            # Collect while requests keep coming (each within --batch-wait-ms of the previous
            # one), up to --max-batch: a burst forms full batches even when a loaded machine
            # takes longer than any fixed window to accept it.
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=self.batch_wait))
                except queue.Empty:
                    break
            try:
                self.generate(batch)
            except Exception as e:  # a failed batch fails its requests, never the server
                log(f"batch of {len(batch)} failed: {e!r}")
                for job in batch:
                    if not job.done:
                        job.done = True
                        job.events.put(("error", str(e)))

    @torch.inference_mode()
    def generate(self, jobs):
        width = max(len(j.ids) for j in jobs)
        # Left padding: every row's last prompt token sits in the same column.
        input_ids = torch.tensor([[self.pad_id] * (width - len(j.ids)) + j.ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs])
        tap = LogprobTap() if any(j.logprobs for j in jobs) else None
        kwargs = {}
        if self.adapters:
            kwargs["adapter_names"] = [j.model if j.model in self.adapters else "__base__" for j in jobs]
        self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(j.max_tokens for j in jobs),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            # Rows stop on their own (EOS, max_tokens) in the streamer; the batch runs to its
            # longest request, as static batching does.
            eos_token_id=None,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([tap]) if tap else None,
            streamer=BatchStreamer(jobs, self.eos_ids, tap),
            **kwargs,
        )


def make_handler(engine):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status, message, kind="invalid_request_error"):
            self.reply(status, {"error": {"message": message, "type": kind}})

        def do_GET(self):
            if self.path in ("/health", "/healthz", "/readyz"):
                self.reply(200, {"status": "ok"})
            elif self.path == "/v1/models":
                names = [engine.served_name] + sorted(engine.adapters)
                self.reply(200, {"object": "list", "data": [
                    {"id": n, "object": "model", "owned_by": "peft-baseline"} for n in names]})
            else:
                self.error(404, f"no route {self.path}")

        def do_POST(self):
            if self.path != "/v1/completions":
                self.error(404, f"no route {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                req = json.loads(self.rfile.read(length))
                if not isinstance(req, dict):
                    raise BadRequest("the body must be a JSON object")
                model = req.get("model")
                if model != engine.served_name and model not in engine.adapters:
                    self.error(404, f"model {model!r} does not exist", "not_found_error")
                    return
                if float(req.get("temperature") or 0.0) != 0.0:
                    raise BadRequest("the PEFT baseline is greedy: temperature must be 0")
                max_tokens = int(req.get("max_tokens") or 16)
                if max_tokens < 1:
                    raise BadRequest("max_tokens must be at least 1")
                logprobs = req.get("logprobs")
                if logprobs not in (None, 0):
                    raise BadRequest("only logprobs=0 is supported")
                job = Job(model, engine.encode(req.get("prompt")), max_tokens,
                          bool(req.get("ignore_eos", False)), logprobs == 0)
            except (BadRequest, ValueError, TypeError) as e:
                self.error(400, str(e))
                return
            engine.queue.put(job)
            stream = bool(req.get("stream", False))
            usage = bool((req.get("stream_options") or {}).get("include_usage", False))
            if stream:
                self.stream(job, model, usage)
            else:
                self.collect(job, model)

        def events(self, job):
            """Yields (token id, logprob, text delta), then ("finish", reason)."""
            ids, sent = [], ""
            while True:
                ev = job.events.get()
                if ev[0] == "token":
                    ids.append(ev[1])
                    text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                    # Hold back an incomplete character until the next token completes it.
                    delta = "" if text.endswith("\ufffd") else text[len(sent):]
                    sent += delta
                    yield ev[1], ev[2], delta
                elif ev[0] == "finish":
                    text = engine.tokenizer.decode(ids, skip_special_tokens=True)
                    yield "finish", ev[1], text[len(sent):], len(ids)
                    return
                else:
                    raise RuntimeError(ev[1])

        def stream(self, job, model, include_usage):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

            def send(obj):
                data = obj if isinstance(obj, str) else json.dumps(obj)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()

            def chunk(text, finish, lp=None):
                c = {"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    c["usage"] = None
                return c

            try:
                for ev in self.events(job):
                    if ev[0] == "finish":
                        _, reason, tail, n = ev
                        send(chunk(tail, reason))
                        if include_usage:
                            send({"id": rid, "object": "text_completion", "created": created,
                                  "model": model, "choices": [], "usage": {
                                      "prompt_tokens": len(job.ids), "completion_tokens": n,
                                      "total_tokens": len(job.ids) + n}})
                        break
                    tok, lp, delta = ev
                    logprobs = None
                    if job.logprobs:
                        logprobs = {"tokens": [engine.token_text(tok)], "token_logprobs": [lp],
                                    "top_logprobs": None, "text_offset": [0]}
                    if delta or logprobs:
                        send(chunk(delta, None, logprobs))
            except RuntimeError as e:
                send({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
            except (BrokenPipeError, ConnectionResetError):
                return
            try:
                send("[DONE]")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

        def collect(self, job, model):
            text, tokens, lps = "", [], []
            try:
                for ev in self.events(job):
                    if ev[0] == "finish":
                        _, reason, tail, n = ev
                        text += tail
                        break
                    tok, lp, delta = ev
                    text += delta
                    tokens.append(engine.token_text(tok))
                    lps.append(lp)
            except RuntimeError as e:
                self.error(500, f"generation failed: {e}", "server_error")
                return
            logprobs = None
            if job.logprobs:
                logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None,
                            "text_offset": [0] * len(tokens)}
            self.reply(200, {
                "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                             "finish_reason": reason}],
                "usage": {"prompt_tokens": len(job.ids), "completion_tokens": n,
                          "total_tokens": len(job.ids) + n}})

    return Handler


class Server(ThreadingHTTPServer):
    # socketserver's default listen backlog (5) drops connections of a burst of 64 requests:
    # they time out, or arrive late and miss their batch.
    request_queue_size = 1024
    daemon_threads = True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--adapters", help="directory of PEFT adapter directories, each served under its name")
    p.add_argument("--served-model-name", default="model", help="the base model's name in requests")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (printed on stdout)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests per generate call")
    # A fixed window from the first request (5 ms, then 50 ms) split a 64-request burst into
    # five batches on a loaded 2-core machine; a gap bound keeps collecting while it arrives.
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="longest gap between two requests of one batch while it fills")
    args = p.parse_args()
    engine = Engine(args.model, args.adapters, args.served_model_name, args.max_batch,
                    args.batch_wait_ms / 1e3)
    server = Server((args.host, args.port), make_handler(engine))
    host, port = server.server_address[:2]
    print(json.dumps({"event": "listening", "http": f"{host}:{port}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
