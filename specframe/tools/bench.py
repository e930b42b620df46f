"""``specframe bench``: compared methods side by side in one process, interleaved per prompt.

The model (and drafters) load once; after a warm-up, every prompt runs each method in turn (A B C A B C…)
so machine drift hits all alike. Besides specframe's policies a run holds the target backend's *peers*:
the runtime's own generation loops (``hf``/``hf-lookup`` for transformers, ``llama-cpp``/``llama-cpp-lookup``
for llama.cpp), from the target's ``peer_names`` and ``peer(name)``. The draft-model peers (the target's
``draft_peers``: ``hf-assisted``, ``llama-server-draft``) get ``--draft-model`` as ``peer(name, draft=SPEC)``
(methods with drafter ``model`` get it as ``model:SPEC``), and the report's notes say what each of them
drafted with (a peer's ``run.description``). Greedy runs check that every method's
output equals that backend's own ``ar`` token for token and count any difference as a failure. Outputs: ``results.jsonl`` (one row per prompt × method ×
repeat), ``summary.json``, ``report.md`` and PNG plots.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import datasets
from ..components import SamplingParams
from ..engine import SpecGenerator
from ..errors import SpecframeError
from ..registry import Registry



@dataclass
class Method:
    label: str
    generator: SpecGenerator | None = None  # None for a peer
    run: Callable | None = None  # a peer's run(ids, max_new_tokens, temperature, top_k, top_p, seed)
    note: str | None = None  # what a draft-model peer (or a method with drafter `model`) drafts with

    @property
    def peer(self) -> bool:
        return self.generator is None


def known_peers(registry: Registry) -> set[str]:
    """Peer names any registered backend offers (its loader's ``peer_names``)."""
    return {name for b in registry.names("backend") for name in getattr(registry.get("backend", b).factory, "peer_names", ())}


def peers_of(target) -> tuple[str, ...]:
    """The peer names ``target``'s backend offers (none for a target that declares none)."""
    return tuple(getattr(target, "peer_names", ()))


def baseline_peers(target) -> tuple[str, ...]:
    """The peers every method's speedup is also given against: the runtime's plain decoding loops
    (``baseline_peers`` where the target names them, e.g. llama-cpp-python's loop and ``llama-server``),
    else its first peer."""
    return tuple(getattr(target, "baseline_peers", ()) or peers_of(target)[:1])


def split_methods(spec: str) -> list[str]:
    """``"ar,static-tree:2,2,1,bastion"`` → ``["ar", "static-tree:2,2,1", "bastion"]`` (pure numbers
    continue the previous item's value; commas inside a method's ``{...}`` settings stay in it)."""
    out: list[str] = []
    depth = 0
    for part in spec.split(","):
        if depth:  # inside a method's {settings}
            out[-1] += "," + part
        else:
            part = part.strip()
            if not part:
                continue
            if out and part.replace(".", "").isdigit() and ":" in out[-1]:
                out[-1] += "," + part
            else:
                out.append(part)
        depth += part.count("{") - part.count("}")
    if depth:
        raise SpecframeError(f"unbalanced braces in --policies {spec!r}; settings look like bastion{{max_nodes=32}}")
    if not out:
        raise SpecframeError("no methods given; e.g. --policies ar,best-first:16,bastion")
    return out


@dataclass(frozen=True)
class MethodSpec:
    """A method label ``POLICY[:VALUE][@DRAFTER][+VERIFIER][{KEY=VALUE;...}]``: the policy, the drafter and
    the verifier it runs with, and settings of its own (as ``--set`` gives every method)."""

    policy: str
    drafter: str | None
    verifier: str | None
    settings: dict


def parse_method(label: str) -> MethodSpec:
    from ..resolve import parse_overrides

    rest, settings = label, {}
    if label.endswith("}") and "{" in label:
        rest, _, inner = label[:-1].partition("{")
        pairs = [p for p in inner.split(";") if p.strip()]
        if not pairs:
            raise SpecframeError(f"method '{label}' has empty settings; e.g. bastion{{max_nodes=32}}")
        settings = parse_overrides(pairs)
    elif "{" in label or "}" in label:
        raise SpecframeError(f"method '{label}': settings go last, in braces, e.g. bastion@dflash{{max_nodes=32}}")
    rest, _, verifier = rest.partition("+")
    policy, _, drafter = rest.partition("@")
    return MethodSpec(policy, drafter or None, verifier or None, settings)


def check_methods(labels: list[str], registry: Registry) -> None:
    """Fail fast (before loading a model) on unknown names. A method is ``POLICY[:VALUE][@DRAFTER][+VERIFIER]``
    or a backend's peer (checked against the loaded target in :func:`build_methods`)."""
    peers = known_peers(registry)
    for label in labels:
        if label not in peers:
            spec = parse_method(label)
            registry.policy(spec.policy.partition(":")[0])
            if spec.drafter:
                registry.get("drafter", spec.drafter.partition(":")[0])
            if spec.verifier:
                registry.get("verifier", spec.verifier)
            _check_settings(label, spec, registry)


def _check_settings(label: str, spec: MethodSpec, registry: Registry) -> None:
    """A method's own settings must each reach one of its components (unlike ``--set``, which is applied to
    every method that takes it): a misspelt key is an error, not a silent no-op."""
    from ..registry import COMPONENT_KINDS

    chosen = dict(registry.policy(spec.policy.partition(":")[0]).components())
    if spec.drafter:
        chosen["drafter"] = spec.drafter
    takes: dict[str, set[str] | None] = {}
    for comp, name in chosen.items():
        if comp == "verifier":
            takes[comp] = set()  # verifiers take no settings
        elif not isinstance(name, str):
            takes[comp] = None
        elif name.startswith("auto"):  # resolved only with the target: whatever some drafter takes
            takes[comp] = {p for d in registry.names(comp) for p in registry.parameters(comp, d)}
        else:
            takes[comp] = set(registry.parameters(comp, name.partition(":")[0]))
    for key in spec.settings:
        if key in COMPONENT_KINDS:
            continue  # swaps a component by name
        comp, dot, param = key.partition(".")
        if dot:
            ok = comp in takes and (takes[comp] is None or param in takes[comp])
        else:
            ok = any(ps is None or key in ps for ps in takes.values())
        if not ok:
            raise SpecframeError(f"method '{label}': no component of policy '{spec.policy}' takes the setting "
                                 f"'{key}' (see `specframe components`)")


def peer_takes_draft(target, name: str) -> bool:
    """Whether ``target.peer(name, draft=...)`` takes a draft model: ``name`` is one of the target's
    ``draft_peers`` where it declares them, else its ``peer`` has a ``draft`` parameter."""
    declared = getattr(target, "draft_peers", None)
    if declared is not None:
        return name in declared
    try:
        return "draft" in inspect.signature(target.peer).parameters
    except (TypeError, ValueError):
        return False


def with_draft_model(drafter, draft_model: str | None):
    """Drafter ``model`` (no spec of its own) becomes ``model:SPEC`` with ``--draft-model SPEC``."""
    if draft_model and isinstance(drafter, str) and drafter in ("model", "model-ahead"):
        return f"model:{draft_model}"
    return drafter


def build_methods(labels: list[str], target, registry: Registry, drafter=None, params=None,
                  draft_model: str | None = None) -> list[Method]:
    methods, uses_draft = [], False
    own, peers = peers_of(target), known_peers(registry)
    for label in labels:
        if label in peers or label in own:
            if label not in own:
                backend = getattr(target, "backend", "?")
                raise SpecframeError(f"peer '{label}' does not run on backend '{backend}'; its peers: "
                                     f"{', '.join(own) or '(none)'} (choose the backend with --backend)")
            takes = peer_takes_draft(target, label)
            uses_draft |= takes
            run = target.peer(label, draft=draft_model) if takes else target.peer(label)
            methods.append(Method(label, run=run, note=getattr(run, "description", None)))
        else:
            spec = parse_method(label)  # its own drafter, verifier and settings, if it names them
            if spec.policy == "ar" and label == "ar":  # the baseline stays plain: no drafter, no overrides
                methods.append(Method(label, SpecGenerator(target, "ar", registry=registry)))
                continue
            chosen = with_draft_model(spec.drafter or drafter, draft_model)
            method_params = {**(params or {}), **spec.settings}
            if spec.verifier:
                method_params["verifier"] = spec.verifier
            gen = SpecGenerator(target, spec.policy, drafter=chosen, params=method_params, registry=registry,
                                strict_params=False)
            note = None
            if str(gen.components.names.get("drafter", "")).partition(":")[0] in ("model", "model-ahead"):
                uses_draft = True
                note = gen.described.get("details", {}).get("drafter") or f"drafter {chosen}"
            methods.append(Method(label, gen, note=note))
    if draft_model and not uses_draft:
        raise SpecframeError(f"--draft-model {draft_model} is used by the draft-model peers "
                             f"({', '.join(getattr(target, 'draft_peers', ())) or 'none on this backend'}) and by "
                             f"methods with drafter 'model' (e.g. bastion@model); none of the methods given uses it")
    if "ar" not in labels:
        methods.insert(0, Method("ar", SpecGenerator(target, "ar", registry=registry)))
    return methods


def machine_description(target) -> str:
    import torch

    backend = getattr(target, "backend", "hf")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = str(target.device)
    if dev.startswith("cuda"):
        dev = torch.cuda.get_device_name(target.device)
    where = f"{dev if dev != 'cpu' else cpu} · {os.cpu_count()} cores"
    if backend != "hf":
        describe = getattr(target, "describe", None)
        return f"{where} · backend {describe() if callable(describe) else backend} · {platform.system()}"
    return (f"{where} · torch {torch.__version__} ({torch.get_num_threads()} threads) · {target.dtype} · "
            f"{platform.system()}")


def run_one(method: Method, target, prompt: datasets.Prompt, max_new: int, sampling: SamplingParams,
            seed: int | None) -> dict:
    ids = datasets.encode(prompt, target)
    if method.peer:
        prepare = getattr(method.run, "prepare", None)  # e.g. a fresh server: not generation time
        if callable(prepare):
            prepare()
        start = time.perf_counter()
        try:
            out = method.run(ids, max_new, sampling.temperature, sampling.top_k, sampling.top_p, seed)
        except SpecframeError:
            raise
        except Exception as err:  # noqa: BLE001 - another program's failure is its row's error, not the run's end
            first = (str(err).strip().splitlines() or [""])[0]
            raise SpecframeError(f"peer '{method.label}' failed: {type(err).__name__}: {first}") from err
        wall = time.perf_counter() - start
        row = {"token_ids": out, "new_tokens": len(out), "wall_time": wall}
        timings = getattr(method.run, "last_timings", None)  # a server peer's own account of the request
        if timings:
            row["peer_timings"] = dict(timings)
        return row
    gen = method.generator.generate(ids, max_new, temperature=sampling.temperature, top_k=sampling.top_k,
                                    top_p=sampling.top_p, seed=seed)
    s, recs = gen.stats, gen.stats.records
    return {
        "token_ids": gen.token_ids,
        "new_tokens": s.new_tokens,
        "wall_time": s.wall_s,
        "prefill_time": s.prefill_s,
        "decoding_steps": s.steps,
        "accept_lengths": [r.accepted + 1 for r in recs],
        "tree_sizes": [r.tree_size for r in recs],
        "tree_depths": [r.tree_depth for r in recs],
        "drafted": [r.drafted for r in recs],
        "verify_s": [round(r.verify_s, 6) for r in recs],
        "predicted_verify_s": [round(r.predicted_verify_s, 6) for r in recs],
        "context_lens": [r.context_len for r in recs],
        "draft_s": round(sum(r.draft_s for r in recs), 6),
        "overhead_s": round(sum(r.overhead_s for r in recs), 6),
        "ahead_s": round(sum(r.ahead_s for r in recs), 6),  # drafting ahead on the drafter's thread
        "hidden_draft_s": round(sum(r.hidden_draft_s for r in recs), 6),  # of it, behind a verification
        "ahead_hits": sum(r.ahead_hit for r in recs),  # steps whose root had been drafted ahead
        "tau": s.tau,
    }


def run_bench(target, labels: list[str], dataset_names: list[str], out_dir: str | Path, *,
              num_prompts: int = 10, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, repeats: int = 1, seed: int = 0, drafter=None, params=None,
              registry: Registry | None = None, progress: bool = True, plots: bool = True,
              draft_model: str | None = None) -> dict:
    """``draft_model``: the draft of the draft-model peers and of methods with drafter ``model`` (a model
    spec, as for a target; see :func:`build_methods`)."""
    if num_prompts <= 0 or max_new_tokens <= 0 or repeats <= 0:
        raise SpecframeError("--num-prompts, --max-new-tokens and --repeats must be positive")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    registry = registry or Registry()
    check_methods(labels, registry)
    prompts = [p for name in dataset_names for p in datasets.load(name, num_prompts)]
    methods = build_methods(labels, target, registry, drafter, params, draft_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    for m in methods:  # warm-up: caches, allocator, start-up calibration
        try:
            run_one(m, target, prompts[0], min(16, max_new_tokens), sampling, seed)
        except SpecframeError:
            pass
    rows = []
    total = len(prompts) * repeats * len(methods)
    with _progress(progress, total) as advance, open(out / "results.jsonl", "w") as fh:
        for prompt in prompts:
            for rep in range(repeats):
                reference = None
                for m in methods:
                    row = {"dataset": prompt.dataset, "prompt_id": prompt.id, "method": m.label, "repeat": rep}
                    try:
                        row.update(run_one(m, target, prompt, max_new_tokens, sampling, seed + rep))
                        row["error"] = None
                    except SpecframeError as err:
                        row.update(error=str(err), token_ids=None, new_tokens=0, wall_time=None)
                    if m.label == "ar":
                        reference = row.get("token_ids")
                    if sampling.greedy and reference is not None and row["token_ids"] is not None:
                        row["matches_ar"] = row["token_ids"] == reference
                    rows.append(row)
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    advance(f"{prompt.dataset} {prompt.id} {m.label}")
    summary = summarize(rows, [m.label for m in methods], sampling, baseline_peers(target),
                        [m.label for m in methods if m.peer])
    summary["machine"] = machine_description(target)
    summary["target"] = target.name
    summary["backend"] = getattr(target, "backend", "hf")
    summary["settings"] = {"datasets": dataset_names, "num_prompts": num_prompts, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "top_k": top_k, "top_p": top_p, "repeats": repeats,
                           "drafter": drafter, "draft_model": draft_model, "params": params or {}}
    summary["notes"] = {m.label: m.note for m in methods if m.note}  # what each draft-model method drafts with
    summary["components"] = {m.label: dict(m.generator.components.names) for m in methods if not m.peer}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    figures = make_plots(rows, summary, out) if plots else []
    (out / "report.md").write_text(render_report(summary, figures))
    return summary


def summarize(rows: list[dict], labels: list[str], sampling: SamplingParams, peers: tuple[str, ...] = ("hf",),
              peer_labels: list[str] = ()) -> dict:
    """Per dataset and method: τ, tokens/s, TPOT, speedup vs ar and vs the backend's plain peers (``hf``;
    ``llama-cpp`` and ``llama-server``; median ± half the range over repeats). A specframe method whose
    greedy output differs from ``ar`` is a failure; a peer's (another program's numerics, e.g. llama.cpp's
    batched verification) is a divergence, reported with its first differing token."""
    bases = ["ar"] + [p for p in peers if p in labels]
    result: dict = {"datasets": {}, "failures": [], "divergences": [], "baselines": bases}
    reference = {(r["dataset"], r["prompt_id"], r["repeat"]): r.get("token_ids") for r in rows if r["method"] == "ar"}
    for row in rows:
        where = {k: row[k] for k in ("dataset", "prompt_id", "method")}
        if row.get("error"):
            result["failures"].append({**where, "error": row["error"]})
        elif row.get("matches_ar") is False and row["method"] in peer_labels:
            ref = reference.get((row["dataset"], row["prompt_id"], row["repeat"])) or []
            first = next((i for i, (a, b) in enumerate(zip(row["token_ids"], ref)) if a != b), min(len(ref), len(row["token_ids"])))
            result["divergences"].append({**where, "repeat": row["repeat"], "first_token": first})
        elif row.get("matches_ar") is False:
            result["failures"].append({**where, "error": "greedy output differs from ar"})
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        table = {}
        ok = [r for r in rows if r["dataset"] == ds and not r.get("error")]
        repeats = sorted({r["repeat"] for r in ok})
        per_rep = {lab: {rep: _rate(ok, lab, rep) for rep in repeats} for lab in labels}
        for lab in labels:
            mine = [r for r in ok if r["method"] == lab]
            if not mine:
                continue
            tokens = sum(r["new_tokens"] for r in mine)
            wall = sum(r["wall_time"] for r in mine)
            entry = {"prompts": len({r["prompt_id"] for r in mine}), "new_tokens": tokens,
                     "tokens_per_s": tokens / wall if wall else 0.0, "tpot_ms": 1000 * wall / tokens if tokens else 0.0}
            steps = sum(r.get("decoding_steps", 0) for r in mine)
            if steps:
                entry["tau"] = sum(sum(r["accept_lengths"]) for r in mine) / steps
                entry["mean_tree_size"] = sum(sum(r["tree_sizes"]) for r in mine) / steps
                entry["acceptance_by_position"] = acceptance_by_position(mine)
                if all("drafted" in r for r in mine):  # share of steps the draft gate let the drafter run
                    entry["drafted_share"] = sum(sum(r["drafted"]) for r in mine) / steps
            for base in bases:
                ratios = [per_rep[lab][rep] / per_rep[base][rep] for rep in repeats
                          if base in per_rep and per_rep[base].get(rep) and per_rep[lab].get(rep)]
                if ratios:
                    entry[f"speedup_vs_{base}"] = statistics.median(ratios)  # median over repeats
                    entry[f"speedup_vs_{base}_spread"] = (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else 0.0
            served = [r["peer_timings"] for r in mine if r.get("peer_timings")]
            if served:  # what the server itself reports: decode-only tokens/s and its own draft acceptance
                rates = [t["predicted_per_second"] for t in served if t.get("predicted_per_second")]
                if rates:
                    entry["server_decode_tokens_per_s"] = statistics.median(rates)
                drafted = sum(t.get("draft_n") or 0 for t in served)
                if drafted:
                    entry["server_draft_acceptance"] = sum(t.get("draft_n_accepted") or 0 for t in served) / drafted
            if steps and all("verify_s" in r for r in mine):
                verify = sum(sum(r["verify_s"]) for r in mine)
                draft, host = sum(r["draft_s"] for r in mine), sum(r["overhead_s"] for r in mine)
                entry["host_share"] = host / (verify + draft + host) if verify + draft + host else 0.0
                entry["step_ms"] = 1000 * (verify + draft + host) / steps
                entry["draft_ms"], entry["verify_ms"] = 1000 * draft / steps, 1000 * verify / steps
                ahead = sum(r.get("ahead_s", 0.0) for r in mine)
                if ahead:  # drafting while the target verifies: what was hidden, and who waited for whom
                    hidden = sum(r.get("hidden_draft_s", 0.0) for r in mine)
                    entry["hidden_draft_ms"] = 1000 * hidden / steps
                    entry["target_idle_ms"] = 1000 * draft / steps  # the target waits while the draft drafts
                    entry["draft_idle_ms"] = 1000 * max(verify - hidden, 0.0) / steps  # the draft waits for the target
                    entry["ahead_hit_share"] = sum(r.get("ahead_hits", 0) for r in mine) / steps
            table[lab] = entry
        t1 = _mean_verify(ok, "ar", 1)
        for lab, entry in table.items():  # what the drafts' measured acceptance allows: τ·T(1)/(D + T(n))
            if t1 and entry.get("tau") and entry.get("step_ms"):
                entry["step_limit"] = entry["tau"] * t1 * 1000 / (entry["draft_ms"] + entry["verify_ms"])
        result["datasets"][ds] = table
    result["verify_curve"] = verify_curve(rows)
    result["greedy"] = sampling.greedy
    return result


def _mean_verify(rows: list[dict], label: str, size: int) -> float | None:
    """The mean verification seconds of ``label``'s steps of ``size`` nodes (the mean, as the step time it
    is compared with is a mean: ``ar``'s own step limit is then exactly 1)."""
    times = [v for r in rows if r["method"] == label for n, v in zip(r.get("tree_sizes", []), r.get("verify_s", [])) if n == size]
    return statistics.fmean(times) if times else None


def verify_curve(rows: list[dict], min_samples: int = 5) -> dict[int, dict]:
    """Measured verification time by tree size over every step of the run: n → {ms (median), ratio to
    n = 1, samples}, for sizes seen at least ``min_samples`` times."""
    by_n: dict[int, list[float]] = {}
    for r in rows:
        for n, v in zip(r.get("tree_sizes", []), r.get("verify_s", [])):
            by_n.setdefault(int(n), []).append(v)
    t1 = statistics.median(by_n[1]) if by_n.get(1) else None
    out = {}
    for n in sorted(by_n):
        if len(by_n[n]) >= min_samples:
            ms = statistics.median(by_n[n]) * 1000
            out[n] = {"ms": round(ms, 3), "ratio": round(ms / (t1 * 1000), 3) if t1 else None, "samples": len(by_n[n])}
    return out


def acceptance_by_position(rows: list[dict]) -> list[float]:
    """For k = 1, 2, …: the share of steps whose tree reached depth k that accepted at least k tokens."""
    pairs = [(a - 1, d) for r in rows for a, d in zip(r.get("accept_lengths", []), r.get("tree_depths", []))]
    depth = max((d for _, d in pairs), default=0)
    out = []
    for k in range(1, depth + 1):
        reach = [acc for acc, d in pairs if d >= k]
        out.append(round(sum(acc >= k for acc in reach) / len(reach), 4) if reach else 0.0)
    return out


def _rate(rows: list[dict], label: str, rep: int) -> float | None:
    mine = [r for r in rows if r["method"] == label and r["repeat"] == rep]
    wall = sum(r["wall_time"] for r in mine)
    return sum(r["new_tokens"] for r in mine) / wall if mine and wall else None


def render_report(summary: dict, figures: list[str]) -> str:
    s = summary["settings"]
    lines = [
        "# specframe bench report",
        "",
        f"- target: {summary['target']}",
        f"- machine: {summary['machine']}",
        f"- datasets: {', '.join(s['datasets'])} · {s['num_prompts']} prompts each · {s['max_new_tokens']} new tokens · "
        f"temperature {s['temperature']} · {s['repeats']} repeat(s)",
        f"- backend: {summary.get('backend', 'hf')}",
        "- methods ran interleaved per prompt in one process after a warm-up; speedup = tokens/s ÷ the baseline's "
        "tokens/s on the same prompts (wall time including prefill), the median over repeats ± half the range. Step limit: the speedup over `ar` that the "
        "measured acceptance τ, draft time D and verification time T(n) allow before host work (T(1) = `ar`'s median "
        "verification); host share: tree building and bookkeeping as a share of a step.",
        "",
    ]
    bases = summary.get("baselines", ["ar", "hf"])
    for ds, table in summary["datasets"].items():
        head = " | ".join(f"speedup vs {b}" for b in bases)
        lines += [f"## {ds}", "", f"| method | τ (accepted + bonus per step) | mean tree size | tokens/s | TPOT ms | {head} "
                  f"| draft / verify ms per step | step limit τ·T(1)/(D+T(n)) | host share of a step |",
                  "|---|---|---|---|---|" + "---|" * len(bases) + "---|---|---|"]
        for lab, e in table.items():
            fmt = lambda key: f"{e[key]:.2f}" if key in e else "–"  # noqa: E731
            sp = lambda base: (f"{e[f'speedup_vs_{base}']:.2f}×" + (f" ± {e[f'speedup_vs_{base}_spread']:.2f}" if e.get(f"speedup_vs_{base}_spread") else "")) if f"speedup_vs_{base}" in e else "–"  # noqa: E731
            share = f"{e['host_share']:.1%}" if "host_share" in e else "–"
            split = f"{e['draft_ms']:.1f} / {e['verify_ms']:.1f}" if "draft_ms" in e else "–"
            lines.append(f"| {lab} | {fmt('tau')} | {fmt('mean_tree_size')} | {e['tokens_per_s']:.2f} | {e['tpot_ms']:.1f} | "
                         + " | ".join(sp(b) for b in bases) + f" | {split} | {fmt('step_limit')} | {share} |")
        lines.append("")
        acc = {lab: e["acceptance_by_position"] for lab, e in table.items() if e.get("acceptance_by_position")}
        if acc:
            lines += ["Acceptance by position k (share of steps whose tree reached depth k that accepted ≥ k tokens):", ""]
            lines += [f"- {lab}: " + " · ".join(f"{a:.2f}" for a in vals[:10]) for lab, vals in acc.items()]
            lines.append("")
        served = {lab: e for lab, e in table.items() if "server_decode_tokens_per_s" in e}
        if served:
            lines += ["What the server peers report themselves (their `timings`; decode only, no prefill or HTTP): "
                      + ", ".join(f"{lab} {e['server_decode_tokens_per_s']:.1f} tokens/s"
                                  + (f" (its drafts accepted {e['server_draft_acceptance']:.0%})"
                                     if "server_draft_acceptance" in e else "") for lab, e in served.items()), ""]
        ahead = {lab: e for lab, e in table.items() if "hidden_draft_ms" in e}
        if ahead:
            lines += ["Drafting while the target verifies, per step: draft time hidden behind the verification · the "
                      "target idle (waiting for drafts: the draft time not hidden) · the draft idle (verification time "
                      "with nothing to draft) · steps whose root had been drafted ahead:", ""]
            lines += [f"- {lab}: hidden {e['hidden_draft_ms']:.1f} ms · target idle {e['target_idle_ms']:.1f} ms · "
                      f"draft idle {e['draft_idle_ms']:.1f} ms · {e['ahead_hit_share']:.0%} of roots drafted ahead"
                      for lab, e in ahead.items()]
            lines.append("")
        gated = {lab: e["drafted_share"] for lab, e in table.items() if e.get("drafted_share", 1.0) < 1.0}
        if gated:
            lines += ["Share of steps that ran the drafter (the draft gate skipped it on the rest): "
                      + ", ".join(f"{lab} {v:.0%}" for lab, v in gated.items()), ""]
    curve = summary.get("verify_curve") or {}
    if curve:
        lines += ["## Verification time by tree size (median over the run's steps)", "",
                  "| n | " + " | ".join(str(n) for n in curve) + " |", "|---|" + "---|" * len(curve),
                  "| ms | " + " | ".join(f"{c['ms']:.1f}" for c in curve.values()) + " |",
                  "| T(n)/T(1) | " + " | ".join(f"{c['ratio']:.2f}" if c["ratio"] else "–" for c in curve.values()) + " |",
                  "| steps | " + " | ".join(str(c["samples"]) for c in curve.values()) + " |", ""]
    notes = summary.get("notes") or {}
    if notes:
        lines += ["## Notes", "", "What the draft-model methods drafted with"
                  + (f" (--draft-model {s['draft_model']})" if s.get("draft_model") else "") + ":", ""]
        lines += [f"- {lab}: {note}" for lab, note in notes.items()]
        lines.append("")
    fails = summary["failures"]
    lines += ["## Failures", "", f"{len(fails)} failure(s)." if fails else "None: every greedy output matched `ar` token for token." if summary["greedy"] else "None.", ""]
    lines += [f"- {f['dataset']} {f['prompt_id']} {f['method']}: {f['error']}" for f in fails[:50]]
    diverged = summary.get("divergences") or []
    if diverged:
        per = {}
        for d in diverged:
            per.setdefault(d["method"], []).append(d)
        lines += ["", "## Peers whose greedy output differs from `ar`", "",
                  "Another program's numerics (e.g. llama.cpp's batched speculative verification) can resolve a "
                  "near-tie differently; counted per prompt × repeat, with the first differing token:", ""]
        lines += [f"- {m}: {len(ds)} run(s); first difference at token "
                  + ", ".join(f"{d['first_token']} ({d['dataset']} {d['prompt_id']})" for d in ds[:12]) for m, ds in per.items()]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def make_plots(rows: list[dict], summary: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    ds_names = list(summary["datasets"])
    labels = list(dict.fromkeys(lab for t in summary["datasets"].values() for lab in t))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(ds_names)), 4))
    width = 0.8 / max(len(ds_names), 1)
    for i, ds in enumerate(ds_names):
        vals = [summary["datasets"][ds].get(lab, {}).get("speedup_vs_ar", 0) for lab in labels]
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=ds)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([x + width * (len(ds_names) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right")
    ax.set_ylabel("speedup vs ar")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    plt.close(fig)
    names.append("speedup.png")

    spec_rows = [r for r in rows if r.get("tree_sizes")]
    spec_labels = [lab for lab in labels if any(r["method"] == lab for r in spec_rows) and lab != "ar"]
    if spec_labels:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for lab in spec_labels:
            sizes = [s for r in spec_rows if r["method"] == lab for s in r["tree_sizes"]]
            acc = [a for r in spec_rows if r["method"] == lab for a in r["accept_lengths"]]
            axes[0].hist(sizes, bins=30, histtype="step", label=lab)
            axes[1].hist(acc, bins=range(1, max(acc) + 2), histtype="step", label=lab)
        axes[0].set_xlabel("tree size (nodes verified)")
        axes[1].set_xlabel("accepted length incl. bonus")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "trees.png", dpi=110)
        plt.close(fig)
        names.append("trees.png")

    pred = [(p, v, lab) for r in spec_rows for p, v, lab in zip(r["predicted_verify_s"], r["verify_s"], [r["method"]] * len(r["verify_s"]))
            if r["method"].startswith("bastion")]
    if pred:
        fig, ax = plt.subplots(figsize=(5, 5))
        xs, ys = [1000 * p for p, _, _ in pred], [1000 * v for _, v, _ in pred]
        ax.scatter(xs, ys, s=6, alpha=0.5)
        hi = max(xs + ys)
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("cost model prediction (ms)")
        ax.set_ylabel("measured verify time (ms)")
        ax.set_title("BASTION cost model vs measurement")
        fig.tight_layout()
        fig.savefig(out / "cost_model.png", dpi=110)
        plt.close(fig)
        names.append("cost_model.png")
    return names


class _progress:
    """A rich progress bar (or nothing), as a context manager yielding ``advance(description)``."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda desc: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bar.__enter__()
        task = self.bar.add_task("bench", total=self.total)
        return lambda desc: self.bar.update(task, advance=1, description=desc)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
