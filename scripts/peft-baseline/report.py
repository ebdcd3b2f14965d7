#!/usr/bin/env python3
"""Figures for scripts/bench-vs-peft.sh, from `loraplane-bench serving`'s outputs (stdlib only).

  report.py rounds OUT N       per-round output tok/s and p99 TTFT of loraplane and PEFT, their
                               ratios and medians (OUT/round{i}-{loraplane,peft}/serving.json);
                               also written to OUT/summary.md and OUT/summary.json
  report.py compare A B        greedy outputs (`loraplane-bench serving --save-outputs`, JSON
                               lines) equal
                               token for token; exit status 1 when they are not
"""

import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def rounds(out, n):
    rows = []
    for i in range(1, n + 1):
        ours = load(f"{out}/round{i}-loraplane/serving.json")["data"]
        peft = load(f"{out}/round{i}-peft/serving.json")["data"]
        rows.append({
            "round": i,
            "loraplane_tok_s": ours["output_tok_s"],
            "peft_tok_s": peft["output_tok_s"],
            "ratio": ours["output_tok_s"] / peft["output_tok_s"],
            "loraplane_ttft_p99_s": ours["ttft_p99_s"],
            "peft_ttft_p99_s": peft["ttft_p99_s"],
            "roofline_tok_s": ours["roofline_tok_s"],
            "loraplane_of_roofline": ours["roofline_fraction"],
        })
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "round"}
    lines = [
        "| round | loraplane tok/s | PEFT tok/s | ratio | p99 TTFT loraplane / PEFT (ms) "
        "| roofline tok/s | loraplane of roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows + [dict(med, round="median")]:
        lines.append(
            f"| {r['round']} | {r['loraplane_tok_s']:.1f} | {r['peft_tok_s']:.1f} | "
            f"**{r['ratio']:.2f}** | {r['loraplane_ttft_p99_s'] * 1e3:.0f} / "
            f"{r['peft_ttft_p99_s'] * 1e3:.0f} | {r['roofline_tok_s']:.0f} | "
            f"{r['loraplane_of_roofline'] * 100:.0f} % |")
    table = "\n".join(lines)
    print(table)
    print(f"\nmedian loraplane / PEFT output tok/s: {med['ratio']:.2f} "
          f"(target ≥ 2.5); p99 TTFT {med['loraplane_ttft_p99_s'] * 1e3:.0f} ms vs "
          f"{med['peft_ttft_p99_s'] * 1e3:.0f} ms; {med['loraplane_of_roofline'] * 100:.0f} % "
          f"of the workload's roofline (target ≥ 50 %)")
    with open(f"{out}/summary.md", "w") as f:
        f.write(f"# loraplane against HF PEFT, {n} interleaved rounds\n\n{table}\n")
    with open(f"{out}/summary.json", "w") as f:
        json.dump({"rounds": rows, "median": med}, f, indent=2)


def read_outputs(path):
    with open(path) as f:
        return {r["index"]: r for r in map(json.loads, f) if r}


def compare(a_path, b_path):
    a, b = read_outputs(a_path), read_outputs(b_path)
    problems, tokens, worst = [], 0, 0.0
    if a.keys() != b.keys():
        problems.append(f"different requests: {len(a)} against {len(b)}")
    for i in sorted(a.keys() & b.keys()):
        x, y = a[i], b[i]
        for side, r in (("A", x), ("B", y)):
            if r.get("error"):
                problems.append(f"request {i}: {side} failed: {r['error']}")
        if x.get("error") or y.get("error"):
            continue
        if x["completion_tokens"] != y["completion_tokens"]:
            problems.append(f"request {i}: {x['completion_tokens']} tokens against "
                            f"{y['completion_tokens']}")
        if x["tokens"] or y["tokens"]:
            if x["tokens"] != y["tokens"]:
                at = next((k for k, (p, q) in enumerate(zip(x["tokens"], y["tokens"])) if p != q),
                          min(len(x["tokens"]), len(y["tokens"])))
                problems.append(f"request {i} ({x['model']}): tokens differ from position {at}")
            for p, q in zip(x["token_logprobs"], y["token_logprobs"]):
                if p is not None and q is not None:
                    worst = max(worst, abs(p - q))
        if x["text"] != y["text"]:
            problems.append(f"request {i} ({x['model']}): texts differ")
        tokens += x["completion_tokens"]
    for p in problems[:20]:
        print("  " + p)
    if problems:
        print(f"greedy outputs DIFFER: {len(problems)} problems over {len(a)} requests")
        return 1
    with_tokens = all(r["tokens"] for r in a.values())
    print(f"greedy outputs identical: {len(a)} requests, {tokens} tokens"
          + (f" compared token for token; max |Δ logprob| = {worst:.2e}" if with_tokens
             else " (texts and token counts; no per-token output was saved)"))
    return 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "rounds":
        rounds(sys.argv[2], int(sys.argv[3]))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
