"""Serving benchmark for continuous batching: `specframe serve` against llama.cpp's own `llama-server`.

Every method is a server process this script starts, on the same GGUF file (default: the embedded
SmolLM2-135M Q4_1) and the same threads (default: every core this process may use), one at a time:

* ``specframe-batch``              ``specframe serve --policy bastion --max-batch C``
* ``specframe-batch-per-request``  the same with ``--set batch_budget=false`` (per-request tree budgets)
* ``specframe-serial``             ``specframe serve --policy bastion --max-batch 1`` (one request at a time)
* ``llama-server``                 ``llama-server -np C -c C*SLOT_CTX`` (continuous batching, its default)
* ``llama-server-ngram``           the same with its n-gram speculation (``plugins/llama_server.py``'s
                                   ``NGRAM_SPEC`` and settings)

C is the number of concurrent clients. For each C and each round r = 1..R, every method runs once, in an
order rotated by round: start its server, one short warm-up request (a prompt not measured), then the
round's requests — MT-Bench prompts with the chat template applied, sent as the same token ids to every
server, greedy, streamed, at most ``-n`` new tokens — from C client threads (a client sends its next
request when its last one ends), then stop the server. Only one server process exists at a time, and every
measurement starts from a fresh server (llama-server's n-gram pool and specframe's timing model learn from
earlier requests; a warm server would bring the round before into the next). Server start-up and warm-up
are outside the clock.

Clients: the `openai` client on ``/v1/completions`` (``prompt=[ids]``) for specframe; for llama-server its
native ``/completion`` with token ids, streamed with ``return_tokens`` (its ``/v1/completions`` takes token
ids and streams too, but its chunks carry text only, and the outputs are compared as token ids).

Per method and C (median over rounds of each round's value): time to first token p50 and p95 over the
round's requests, per-request tokens/s (median over requests; completion tokens / request time incl. TTFT),
total tokens/s (all completion tokens / wall time of the round), completion tokens, and the share of
requests whose token ids equal `specframe-serial`'s for the same prompt in the same round (greedy: the
batched numerics' divergence). The goals of the continuous-batching issue are checked at 4 clients.

    python scripts/bench_serve.py --clients 1,4,8 --num-prompts 8 -n 128 --rounds 3 --out docs/bench/serve

Writes DIR/results.json (every request, every round; rewritten after each measurement) and DIR/report.md.
Not a test: it takes a long time. Run it alone on the machine (/work/shared/FACTS.md: two cores; any other
CPU load distorts the timings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from specframe.backends import load_target
from specframe.datasets import Prompt, encode, load
from specframe.plugins.llama_server import NGRAM_SPEC, SPEC_ARGS, LlamaServerPeer
from specframe.serve import wait_until_ready
from specframe.tree import common_prefix

SPECFRAME_METHODS = {  # name -> `specframe serve` arguments ({clients}: the round's number of clients)
    "specframe-batch": ["{max_batch_flag}", "{clients}"],
    "specframe-batch-per-request": ["{max_batch_flag}", "{clients}", "--set", "batch_budget=false"],
    "specframe-serial": ["{max_batch_flag}", "1"],
}
LLAMA_METHODS = {"llama-server": None, "llama-server-ngram": NGRAM_SPEC}  # name -> --spec-type
METHODS = [*SPECFRAME_METHODS, *LLAMA_METHODS]
REFERENCE = "specframe-serial"  # outputs are compared with this method's
WARMUP_PROMPT = "Say hello in one short sentence."


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpecframeServer:
    def __init__(self, method: str, clients: int, args, log: Path):
        extra = [a.format(clients=clients, max_batch_flag=args.max_batch_flag) for a in SPECFRAME_METHODS[method]]
        if not args.max_batch_flag:  # servers before the flag existed: no max-batch argument at all
            extra = extra[2:]
        self.port = free_port()
        self.cmd = [sys.executable, "-c", "from specframe.cli import main; main()", "serve",
                    "--policy", args.policy, "--backend", "llama.cpp", "--backend-option", f"threads={args.threads}",
                    "--port", str(self.port), "--log-level", "warning", "--max-queue", "256",
                    *(["--target", args.target] if args.target else []), *extra, *shlex.split(args.serve_args)]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_until_ready(self.url, self.proc, 600, log)
        except RuntimeError as err:
            self.close()
            raise RuntimeError(" ".join(str(err).split())[-600:]) from None
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=3600)
        self.model = args.target or "smollm2-135m"

    def command(self) -> str:
        return shlex.join(["specframe", *self.cmd[3:]]).replace(str(self.port), "PORT")

    def request(self, ids: list[int], n: int) -> dict:
        start = time.perf_counter()
        first = None
        tokens, token_ids = 0, None
        stream = self.client.completions.create(model=self.model, prompt=ids, max_tokens=n, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                if chunk.choices[0].text and first is None:
                    first = time.perf_counter()
                extra = (chunk.model_extra or {}).get("specframe")
                if extra and "token_ids" in extra:
                    token_ids = [int(t) for t in extra["token_ids"]]
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return {"ttft_s": (first or end) - start, "total_s": end - start, "tokens": tokens, "token_ids": token_ids}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LlamaServer:
    def __init__(self, method: str, clients: int, args, gguf: Path):
        self.peer = LlamaServerPeer(gguf, args.threads, clients * args.slot_ctx, spec=LLAMA_METHODS[method],
                                    parallel=clients, extra_args=shlex.split(args.llama_args), fresh_per_request=False)

    def command(self) -> str:
        cmd = self.peer.command()
        return shlex.join(["llama-server", *cmd[1:]]).replace(str(self.peer.port), "PORT").replace(
            str(self.peer.gguf_path), Path(self.peer.gguf_path).name)

    def request(self, ids: list[int], n: int) -> dict:
        out = self.peer.stream(ids, n)
        t = out["timings"]
        return {"ttft_s": out["ttft_s"], "total_s": out["total_s"], "tokens": len(out["token_ids"]),
                "token_ids": out["token_ids"], "draft_n": t.get("draft_n", 0), "draft_n_accepted": t.get("draft_n_accepted", 0)}

    def close(self) -> None:
        self.peer.close()


def start(method: str, clients: int, args, gguf: Path, out: Path):
    if method in SPECFRAME_METHODS:
        return SpecframeServer(method, clients, args, out / f"server-{method}-c{clients}.log")
    return LlamaServer(method, clients, args, gguf)


# --------------------------------------------------------------------------- measurement
def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(method: str, clients: int, rnd: int, prompts: list[list[int]], warmup: list[int], args, gguf: Path,
            out: Path) -> dict:
    row = {"method": method, "clients": clients, "round": rnd}
    t0 = time.perf_counter()
    try:
        server = start(method, clients, args, gguf, out)
    except Exception as err:  # noqa: BLE001 - a server that does not start is a result, not the end of the run
        return {**row, "error": f"start: {type(err).__name__}: {err}"}
    try:
        row["command"] = server.command()
        row["startup_s"] = time.perf_counter() - t0
        for _ in range(args.warmup):
            server.request(warmup, args.warmup_tokens)
        start_t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            requests = list(pool.map(lambda ids: server.request(ids, args.max_new_tokens), prompts))
        row["wall_s"] = time.perf_counter() - start_t
    except Exception as err:  # noqa: BLE001
        return {**row, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:600]}"}
    finally:
        server.close()
    for i, r in enumerate(requests):
        r["prompt"] = i
        r["tok_per_s"] = r["tokens"] / r["total_s"] if r["total_s"] > 0 else 0.0
    tokens = sum(r["tokens"] for r in requests)
    ttfts = [r["ttft_s"] for r in requests]
    row.update(requests=requests, completion_tokens=tokens, total_tok_per_s=tokens / row["wall_s"],
               ttft_p50_s=quantile(ttfts, 0.5), ttft_p95_s=quantile(ttfts, 0.95),
               req_tok_per_s_median=statistics.median(r["tok_per_s"] for r in requests))
    return row


def compare_outputs(rows: list[dict]) -> None:
    """Each row gets ``match``: the share of its requests whose token ids equal the reference method's for the
    same prompt, client count and round (None without a reference), and ``first_divergence`` per request."""
    ref = {(r["clients"], r["round"]): r for r in rows if r["method"] == REFERENCE and "requests" in r}
    for row in rows:
        base = ref.get((row["clients"], row["round"]))
        if "requests" not in row or base is None:
            row["match"] = None
            continue
        same = 0
        for mine, theirs in zip(row["requests"], base["requests"]):
            a, b = mine.get("token_ids"), theirs.get("token_ids")
            if a is None or b is None:
                mine["first_divergence"] = None
                continue
            k = common_prefix(a, b)
            mine["first_divergence"] = None if a == b else k
            same += a == b
        have = sum(1 for m, t in zip(row["requests"], base["requests"]) if m.get("token_ids") is not None
                   and t.get("token_ids") is not None)
        row["match"] = same / have if have else None


# --------------------------------------------------------------------------- summary and report
KEYS = ("ttft_p50_s", "ttft_p95_s", "req_tok_per_s_median", "total_tok_per_s", "completion_tokens", "match")


def summarize(rows: list[dict], methods: list[str], levels: list[int]) -> dict:
    """{clients: {method: {key: median over rounds, 'rounds': n, 'errors': [...]}}}."""
    out: dict = {}
    for c in levels:
        out[c] = {}
        for m in methods:
            mine = [r for r in rows if r["clients"] == c and r["method"] == m]
            ok = [r for r in mine if "error" not in r]
            s = {"rounds": len(ok), "errors": [r["error"] for r in mine if "error" in r]}
            for key in KEYS:
                vals = [r[key] for r in ok if r.get(key) is not None]
                s[key] = statistics.median(vals) if vals else None
            drafted = [q.get("draft_n", 0) for r in ok for q in r["requests"]]
            if any(drafted):
                s["draft_acceptance"] = sum(q.get("draft_n_accepted", 0) for r in ok for q in r["requests"]) / sum(drafted)
            out[c][m] = s
    return out


def paired_ratio(rows: list[dict], clients: int, a: str, b: str, key: str = "total_tok_per_s") -> float | None:
    """Median over rounds of a's value / b's value in the same round (paired: the rounds interleave)."""
    by = {(r["method"], r["round"]): r for r in rows if r["clients"] == clients and "error" not in r}
    ratios = [by[(a, k)][key] / by[(b, k)][key] for (m, k) in by if m == a and (b, k) in by and by[(b, k)][key]]
    return statistics.median(ratios) if ratios else None


def goals(rows: list[dict], summary: dict, clients: int) -> list[tuple[str, str, str]]:
    """(goal, measured, PASS/FAIL/n/a) at ``clients`` clients, for specframe-batch."""
    batch = summary.get(clients, {}).get("specframe-batch", {})
    out = []
    ttft = batch.get("ttft_p50_s")
    out.append(("p50 time to first token ≤ 1 s", "n/a" if ttft is None else f"{ttft:.3f} s",
                "n/a" if ttft is None else ("PASS" if ttft <= 1.0 else "FAIL")))
    for other, need, what in (("specframe-serial", 1.3, "total tokens/s ≥ 1.3 × specframe-serial"),
                              ("llama-server", 1.0, "total tokens/s ≥ llama-server (plain)"),
                              ("specframe-batch-per-request", 1.0, "batch budget: total tokens/s ≥ per-request budgets")):
        ratio = paired_ratio(rows, clients, "specframe-batch", other)
        out.append((what, "n/a" if ratio is None else f"{ratio:.2f}×",
                    "n/a" if ratio is None else ("PASS" if ratio >= need else "FAIL")))
    return out


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "cores_usable": len(os.sched_getaffinity(0)), "cpus": os.cpu_count(),
            "python": platform.python_version(), "host": platform.node()}


def report(data: dict) -> str:
    args, rows, summary = data["args"], data["rows"], data["summary"]
    levels, methods = data["clients"], data["methods"]
    m = data["machine"]
    lines = [f"# Serving benchmark: continuous batching ({args['dataset']}, {args['max_new_tokens']} new tokens, greedy, streamed)",
             "",
             f"- Date: {data['date']}",
             f"- Machine: {m['cpu']}, {m['cores_usable']} usable cores; {args['threads']} threads per server",
             f"- Command: `{data['command']}`",
             f"- Model: `{Path(data['gguf']).name}` on llama.cpp (every server), {data['requests_per_round']} "
             f"requests per round and client count ({data['prompt_tokens']} prompt tokens in all), "
             f"{args['rounds']} rounds, methods in an order rotated per round, a fresh server for each measurement "
             f"(start-up and one warm-up request outside the clock), one server process at a time.",
             f"- Values are medians over rounds of each round's value. TTFT: time from sending a request to its first "
             f"streamed token, p50/p95 over the round's requests. Per-request tok/s: completion tokens / request time "
             f"(incl. TTFT), median over requests. Total tok/s: all completion tokens / wall time of the round. "
             f"Same output: requests whose token ids equal `{REFERENCE}`'s for the same prompt in the same round.",
             ""]
    for c in levels:
        lines += [f"## {c} client{'s' if c > 1 else ''}", "",
                  "| method | TTFT p50 (s) | TTFT p95 (s) | tok/s per request | total tok/s | completion tokens | same output as serial | rounds |",
                  "|---|---|---|---|---|---|---|---|"]
        for meth in methods:
            s = summary[c][meth]
            note = f" (failed: {s['errors'][0][:200]})" if s["errors"] else ""
            acc = f"; drafts accepted {s['draft_acceptance']:.0%}" if s.get("draft_acceptance") is not None else ""
            lines.append(f"| `{meth}`{acc} | {fmt(s['ttft_p50_s'], '.3f')} | {fmt(s['ttft_p95_s'], '.3f')} | "
                         f"{fmt(s['req_tok_per_s_median'], '.1f')} | {fmt(s['total_tok_per_s'], '.1f')} | "
                         f"{fmt(s['completion_tokens'], '.0f')} | {fmt(s['match'], '.0%')} | {s['rounds']}{note} |")
        ratios = [(o, paired_ratio(rows, c, "specframe-batch", o)) for o in methods if o != "specframe-batch"]
        ratios = [(o, r) for o, r in ratios if r is not None]
        if ratios:
            lines += ["", "`specframe-batch` total tok/s over (paired by round): " +
                      ", ".join(f"`{o}` {r:.2f}×" for o, r in ratios)]
        lines.append("")
    g = data["goal_clients"]
    lines += [f"## Goals (`specframe-batch` at {g} clients)", "", "| goal | measured | result |", "|---|---|---|"]
    lines += [f"| {what} | {val} | **{res}** |" for what, val, res in data["goals"]]
    lines += ["", "## Server commands", ""]
    seen = set()
    for r in rows:
        key = (r["method"], r["clients"])
        if r.get("command") and key not in seen:
            seen.add(key)
            lines.append(f"- `{r['method']}`, {r['clients']} client{'s' if r['clients'] > 1 else ''}: `{r['command']}`")
    lines += ["", "## Notes", "",
              f"- llama-server: `-np C` slots with `-c C × {args['slot_ctx']}` (an explicit `-np` leaves its unified KV "
              "cache off, so `-c` is split evenly: each slot has its own context; `--llama-args -kvu` turns it on), "
              "continuous batching (its default), `-t`/`-tb` = the threads, flash attention on and 512-token "
              "batches as specframe's llama.cpp backend has them, `--cache-ram 0` and `cache_prompt: false` per request "
              "(no prompt reuse across requests or rounds, as specframe has none). Its client is plain HTTP on the "
              "native `/completion` (token ids in, `return_tokens` out); specframe's is the `openai` client.",
              "- llama-server receives each prompt in one request, so its last prompt token is decoded as a row of the "
              "prompt batch (specframe decodes it on its own): at near-ties its greedy output may differ from "
              "specframe's for that reason alone (see plugins/llama_server.py).",
              f"- `llama-server-ngram`: `--spec-type {NGRAM_SPEC} {' '.join(SPEC_ARGS[NGRAM_SPEC])}`; its hash pool "
              "is shared by the server's slots and learns within a round (a fresh server each round)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clients", default="1,4,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--num-prompts", type=int, default=8, help="requests per round (distinct prompts)")
    parser.add_argument("--requests-per-client", type=int, default=0,
                        help="if > 0: each round sends clients × this many distinct prompts instead of --num-prompts")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--dataset", default="mt-bench")
    parser.add_argument("--target", default=None, help="a GGUF file or known model (default: the embedded SmolLM2)")
    parser.add_argument("--policy", default="bastion", help="specframe methods' --policy")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="every server's threads")
    parser.add_argument("--slot-ctx", type=int, default=1024, help="llama-server context per slot (-c clients × this)")
    parser.add_argument("--serve-args", default="", help="extra `specframe serve` arguments for every specframe method")
    parser.add_argument("--llama-args", default="", help="extra llama-server arguments for every llama-server method")
    parser.add_argument("--max-batch-flag", default="--max-batch",
                        help="specframe serve's flag for the batch size ('' passes none: servers without the flag)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up requests per fresh server (not measured)")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--goal-clients", type=int, default=4, help="client count at which the goals are checked")
    parser.add_argument("--out", default="docs/bench/serve")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    levels = [int(c) for c in args.clients.split(",")]
    target = load_target(args.target, "llama.cpp", options={"threads": args.threads})
    gguf = Path(target.path)
    wanted = max(args.requests_per_client * c if args.requests_per_client > 0 else args.num_prompts for c in levels)
    pool = [encode(p, target) for p in load(args.dataset, wanted)]
    warmup = encode(Prompt(id="warmup", dataset="bench_serve", text=WARMUP_PROMPT), target)  # not a measured prompt
    if len(pool) < wanted:
        raise SystemExit(f"{args.dataset} has {len(pool)} prompts; {wanted} needed")
    too_long = max(len(p) for p in pool) + args.max_new_tokens
    if too_long > args.slot_ctx:
        raise SystemExit(f"a prompt + {args.max_new_tokens} tokens needs {too_long} > --slot-ctx {args.slot_ctx}")
    del target

    def prompts_for(c: int) -> list[list[int]]:
        return pool[:args.requests_per_client * c] if args.requests_per_client > 0 else pool[:args.num_prompts]

    data = {"args": vars(args), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "gguf": str(gguf), "clients": levels, "methods": methods,
            "requests_per_round": args.num_prompts if args.requests_per_client <= 0 else
            f"{args.requests_per_client} × clients",
            "prompt_tokens": sum(len(p) for p in prompts_for(levels[0])) if args.requests_per_client <= 0 else "varies",
            "rows": []}
    rows = data["rows"]
    for c in levels:
        prompts = prompts_for(c)
        for rnd in range(1, args.rounds + 1):
            k = (rnd - 1) % len(methods)
            for method in methods[k:] + methods[:k]:
                row = measure(method, c, rnd, prompts, warmup, args, gguf, out)
                rows.append(row)
                if "error" in row:
                    print(f"[{c} clients, round {rnd}] {method}: FAILED {row['error'][:300]}", flush=True)
                else:
                    print(f"[{c} clients, round {rnd}] {method}: TTFT p50 {row['ttft_p50_s']:.3f} s, "
                          f"p95 {row['ttft_p95_s']:.3f} s, {row['req_tok_per_s_median']:.1f} tok/s per request, "
                          f"{row['total_tok_per_s']:.1f} tok/s total, {row['completion_tokens']} tokens "
                          f"(server start {row['startup_s']:.1f} s)", flush=True)
                (out / "results.json").write_text(json.dumps(data, indent=1))
    compare_outputs(rows)
    summary = summarize(rows, methods, levels)
    goal_clients = args.goal_clients if args.goal_clients in levels else max(levels)
    data.update(summary={str(c): v for c, v in summary.items()}, goal_clients=goal_clients,
                goals=goals(rows, summary, goal_clients))
    (out / "results.json").write_text(json.dumps(data, indent=1))
    text = report({**data, "summary": summary})
    (out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
