"""Measure `specframe serve` through HTTP against in-process generation (what `specframe run` does).

For each policy: build the generator in this process and time ``generate`` on each prompt (time to first
token, tokens/s); then start ``specframe serve`` with the same policy in a subprocess and send the same
token ids to ``/v1/completions`` with the ``openai`` client, streaming, with 1 client and then with C
concurrent clients. Greedy, so both sides produce the same tokens. Reports the server's overhead per
request and per token (HTTP at 1 client minus in-process, same prompts) and the throughput under load.

    python scripts/bench_serve.py --policies ar,bastion --num-prompts 4 -n 64 --out runs/bench-serve

Not a test: it takes minutes. Run it alone on the machine (see /work/shared/FACTS.md: two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from specframe import SpecGenerator, Target
from specframe.datasets import encode, load
from specframe.serve import wait_until_ready


def in_process(gen: SpecGenerator, prompts: list[list[int]], n: int) -> list[dict]:
    """Time each prompt the way `specframe run` generates (stream callback, one request at a time)."""
    rows = []
    for ids in prompts:
        first: list[float] = []
        start = time.perf_counter()
        out = gen.generate(ids, n, stream=lambda _ids: first or first.append(time.perf_counter()))
        end = time.perf_counter()
        rows.append({"ttft_s": first[0] - start, "total_s": end - start, "tokens": len(out.token_ids),
                     "tau": out.stats.tau})
    return rows


def one_request(client: openai.OpenAI, model: str, ids: list[int], n: int) -> dict:
    """One streamed completion; time to the first text and to the end."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "total_s": end - start, "tokens": tokens}


def through_http(url: str, model: str, prompts: list[list[int]], n: int, clients: int) -> dict:
    """Every prompt once per client, ``clients`` at a time; per-request rows plus the wall time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    jobs = [ids for _ in range(clients) for ids in prompts]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = list(pool.map(lambda ids: one_request(client, model, ids, n), jobs))
    return {"rows": rows, "wall_s": time.perf_counter() - start}


def start_server(policy: str, target: str | None, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from specframe.cli import main; main()", "serve", "--policy", policy,
           "--port", str(port), "--log-level", "warning", "--max-queue", "256"]
    if target:
        cmd += ["--target", target]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, 600, log)
    except RuntimeError as err:
        proc.kill()
        raise SystemExit(str(err)) from None
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def summarize(policy: str, local: list[dict], http: dict[int, dict]) -> dict:
    tokens = sum(r["tokens"] for r in local)
    out = {
        "policy": policy,
        "in_process": {"ttft_s": mean(local, "ttft_s"), "tok_per_s": tokens / sum(r["total_s"] for r in local),
                       "total_s": mean(local, "total_s"), "tau": mean(local, "tau")},
    }
    for clients, run in http.items():
        rows = run["rows"]
        out[f"http_{clients}"] = {
            "ttft_s": mean(rows, "ttft_s"),
            "total_s": mean(rows, "total_s"),
            "tok_per_s_per_request": sum(r["tokens"] for r in rows) / sum(r["total_s"] for r in rows),
            "tok_per_s_aggregate": sum(r["tokens"] for r in rows) / run["wall_s"],
        }
    one = http[min(http)]["rows"]
    extra = [h["total_s"] - p["total_s"] for h, p in zip(one, local)]
    out["overhead_per_request_s"] = statistics.fmean(extra)
    out["overhead_per_token_ms"] = 1000 * sum(extra) / tokens
    out["ttft_overhead_s"] = mean(one, "ttft_s") - mean(local, "ttft_s")
    return out


def report(results: list[dict], args) -> str:
    lines = [f"# `specframe serve` through HTTP vs in-process ({args.num_prompts} {args.dataset} prompts, "
             f"{args.max_new_tokens} new tokens, greedy)", "",
             "| policy | where | clients | TTFT (s) | tok/s per request | tok/s aggregate |", "|---|---|---|---|---|---|"]
    for r in results:
        p = r["in_process"]
        lines.append(f"| `{r['policy']}` | in-process (`run`) | 1 | {p['ttft_s']:.3f} | {p['tok_per_s']:.2f} | "
                     f"{p['tok_per_s']:.2f} |")
        for key in sorted(k for k in r if k.startswith("http_")):
            h = r[key]
            lines.append(f"| `{r['policy']}` | HTTP | {key[5:]} | {h['ttft_s']:.3f} | {h['tok_per_s_per_request']:.2f} | "
                         f"{h['tok_per_s_aggregate']:.2f} |")
    lines += ["", "| policy | server overhead per request (s) | per token (ms) | TTFT overhead (s) | "
              "HTTP/in-process tok/s (1 client) |", "|---|---|---|---|---|"]
    for r in results:
        ratio = r["http_1"]["tok_per_s_per_request"] / r["in_process"]["tok_per_s"] if "http_1" in r else float("nan")
        lines.append(f"| `{r['policy']}` | {r['overhead_per_request_s']:.3f} | {r['overhead_per_token_ms']:.2f} | "
                     f"{r['ttft_overhead_s']:.3f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="ar,bastion")
    parser.add_argument("--dataset", default="mt-bench")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--target", default=None, help="as for `specframe serve` (default: the embedded SmolLM2)")
    parser.add_argument("--out", default="runs/bench-serve")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    target = Target.load(args.target)
    prompts = [encode(p, target) for p in load(args.dataset, args.num_prompts)]
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    for policy in args.policies.split(","):
        gen = SpecGenerator(target, policy)
        gen.generate(prompts[0], 8)  # warm-up and calibration, as the server's first request does
        local = in_process(gen, prompts, args.max_new_tokens)
        port = free_port()
        proc = start_server(policy, args.target, port, out / f"server-{policy}.log")
        try:
            url = f"http://127.0.0.1:{port}"
            through_http(url, args.target or "smollm2-135m", prompts[:1], 8, 1)  # warm-up
            http = {c: through_http(url, args.target or "smollm2-135m", prompts, args.max_new_tokens, c) for c in levels}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        results.append(summarize(policy, local, http))
        print(json.dumps(results[-1]), flush=True)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    text = report(results, args)
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
