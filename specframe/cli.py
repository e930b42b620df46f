"""The ``specframe`` command line: ``run``, ``plugins``, ``policies`` (and commands plugins add)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import SpecframeError, plural
from .registry import COMPONENT_KINDS, KIND_HOOKS, Registry, kind_label, make_plugin_set, warn_problems

DEMO_PROMPT = "Explain in a few sentences why the sky is blue."


class _Group(click.Group):
    """Turns :class:`SpecframeError` into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpecframeError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


def _registry(ctx: click.Context) -> Registry:
    obj = ctx.ensure_object(dict)
    if "registry" not in obj:
        obj["registry"] = Registry(obj.get("plugin_set") or make_plugin_set())
    return obj["registry"]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specframe")
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice). On a busy machine fewer can be faster.")
def cli(threads):
    """Lossless tree speculative decoding for Hugging Face causal LMs."""
    if threads is not None:
        if threads <= 0:
            raise SpecframeError(f"--threads must be positive, got {threads}")
        import torch

        torch.set_num_threads(threads)


def generator_options(command):
    """The options that choose and build a generator (``run``, ``serve``): policy, target, drafter, --set,
    dtype, device."""
    options = [
        click.option("--policy", "-p", default=None, help="Policy bundle, optionally NAME:VALUE (e.g. best-first:32). See `specframe policies`."),
        click.option("--target", "-m", default=None, help="Hub id, local directory, .gguf file, or smollm2-135m (the embedded default)."),
        click.option("--backend", default=None, help="Runtime of the target: auto (default: llama.cpp for GGUF files and the embedded default on a CPU when llama-cpp-python is installed, else hf), hf, llama.cpp. See `specframe components`."),
        click.option("--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE", help="Backend setting (repeatable), e.g. --backend-option mode=fast for llama.cpp."),
        click.option("--drafter", default=None, help="Drafter name, or NAME:PATH for drafters that load a checkpoint."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a policy parameter (repeatable), e.g. --set budget=32 or --set surrogate=NAME."),
        click.option("--dtype", default="float32", show_default=True),
        click.option("--device", default="cpu", show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_generator_options(ctx, policy, drafter, overrides, backend=None) -> tuple:
    """Fail fast on unknown names, before loading a model: (registry, policy, parsed --set params)."""
    from .resolve import DEFAULT_POLICY, parse_overrides

    registry = _registry(ctx)
    policy = policy or DEFAULT_POLICY
    registry.policy(policy.partition(":")[0])
    if drafter is not None:
        registry.get("drafter", drafter.partition(":")[0])
    check_backend(registry, backend)
    return registry, policy, parse_overrides(list(overrides))


def check_backend(registry, backend) -> None:
    if backend not in (None, "auto"):
        registry.get("backend", backend)


def load_backend_target(registry, target, backend, backend_options, dtype="float32", device="cpu"):
    """Load ``target`` on ``backend`` (``auto``/None: :func:`specframe.backends.choose_backend`)."""
    from .backends import load_target
    from .resolve import parse_value
    from .backends import quiet_backends

    options = {}
    for pair in backend_options or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecframeError(f"--backend-option expects key=value, got '{pair}'")
        options[key.strip()] = parse_value(value)
    quiet_backends(registry)
    return load_target(target, backend, registry=registry, dtype=dtype, device=device, options=options)


def load_generator(registry, policy, target, drafter, params, dtype, device, backend=None, backend_options=()):
    """Load the target (on ``backend``) and build its generator, as ``run`` does."""
    from .engine import SpecGenerator

    tgt = load_backend_target(registry, target, backend, backend_options, dtype, device)
    return SpecGenerator(tgt, policy, drafter=drafter, params=params, registry=registry)


@cli.command()
@generator_options
@click.option("--prompt", default=None, help="Prompt text (default: a short demo question).")
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True), default=None, help="Read the prompt from a file ('-' = stdin).")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None)
@click.option("--chat/--no-chat", default=None, help="Wrap the prompt in the model's chat template (default: when it has one).")
@click.option("--json", "as_json", is_flag=True, help="Print {text, token_ids, stats, components} as JSON instead of streaming.")
@click.pass_context
def run(ctx, policy, target, backend, backend_options, drafter, prompt, prompt_file, max_new_tokens, temperature, top_p,
        top_k, seed, chat, overrides, dtype, device, as_json):
    """Generate text with speculative decoding and print a one-line stats summary."""
    from .components import SamplingParams

    registry, policy, params = check_generator_options(ctx, policy, drafter, overrides, backend)
    if max_new_tokens <= 0:
        raise SpecframeError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # validates
    if prompt is not None and prompt_file is not None:
        raise SpecframeError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        prompt = sys.stdin.read() if prompt_file == "-" else _read(prompt_file)
    prompt = DEMO_PROMPT if prompt is None else prompt

    gen = load_generator(registry, policy, target, drafter, params, dtype, device, backend, backend_options)
    tgt = gen.target
    if as_json:
        out = gen.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=chat)
        click.echo(json.dumps(out.to_dict()))
        say_auto_fallbacks(gen)
        return
    printer = _StreamPrinter(tgt)
    out = gen.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                       chat=chat, stream=printer)
    printer.finish()
    say_auto_fallbacks(gen)  # after the run, so that a bad input still ends in one line
    s = out.stats
    names = gen.components.names
    drafted = sum(r.drafted for r in s.records)
    skipped = f" · drafted {drafted}/{s.steps} steps" if drafted < s.steps else ""
    click.echo(
        f"[{gen.policy_name} · backend {getattr(tgt, 'backend', '?')} · drafter {names['drafter']} · {s.new_tokens} tokens in {s.wall_s:.2f} s · "
        f"{s.tokens_per_s:.1f} tok/s · τ {s.tau:.2f} · {s.steps} steps · mean tree {s.mean_tree_size:.1f} nodes{skipped}]",
        err=True,
    )


def say_auto_fallbacks(gen) -> None:
    """One line on stderr for what ``--backend auto`` chose when it chose another runtime than the default
    or fell back from one (and why), and one when the drafter's ``auto`` fell back to a lesser drafter."""
    note = getattr(gen.target, "backend_note", "")
    if note:
        click.echo(f"specframe: backend auto -> {gen.target.backend}: {note}", err=True)
    why = gen.components.notes.get("drafter")
    chosen = gen.components.names["drafter"]
    if why and chosen in ("ngram", "model"):
        click.echo(f"specframe: drafter auto -> {chosen}: {why}", err=True)
    draft_note = getattr(gen.components.drafter, "auto_note", "")  # e.g. the runtime a draft model runs on
    if draft_note:
        click.echo(f"specframe: {draft_note}", err=True)


@cli.command()
@generator_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="SPECFRAME_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ (also $SPECFRAME_API_KEY).")
@click.option("--served-model-name", default=None, help="The model name clients send (default: --target, or smollm2-135m).")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Requests decoded together (continuous batching: one target call verifies all their trees); 1 serves one at a time. On llama.cpp a request also needs room in the KV cache (--backend-option n_ctx=N).")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Requests that may wait for a place in the batch; beyond that, 503.")
@click.option("--default-max-tokens", type=int, default=256, show_default=True, help="Chat completion length when a request sets none.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_context
def serve(ctx, policy, target, backend, backend_options, drafter, overrides, dtype, device, host, port, api_key, served_model_name, max_batch,
          max_queue, default_max_tokens, log_level):
    """Serve the generator over an OpenAI-compatible HTTP API (chat, completions, models, metrics)."""
    from .target import DEFAULT_TARGET

    if max_queue <= 0 or default_max_tokens <= 0 or max_batch <= 0:
        raise SpecframeError("--max-batch, --max-queue and --default-max-tokens must be positive")
    if not 0 <= port <= 65535:
        raise SpecframeError(f"--port must be in 0..65535, got {port}")
    registry, policy, params = check_generator_options(ctx, policy, drafter, overrides, backend)
    from .serve import create_app, serve as run_server  # after the checks: FastAPI loads in about a second

    backend_options = batch_backend_options(registry, target, backend, backend_options, device, dtype, max_batch)
    gen = load_generator(registry, policy, target, drafter, params, dtype, device, backend, backend_options)
    say_auto_fallbacks(gen)
    name = served_model_name or target or DEFAULT_TARGET
    app = create_app(gen, model_name=name, max_queue=max_queue, api_key=api_key, default_max_tokens=default_max_tokens,
                     max_batch=max_batch)
    click.echo(f"specframe: batching {app.state.worker.batch.describe()}", err=True)
    click.echo(f"specframe: serving '{name}' with policy {gen.policy_name} on http://{host}:{port}/v1", err=True)
    run_server(app, host=host, port=port, log_level=log_level)


def batch_backend_options(registry, target, backend, backend_options, device, dtype, max_batch) -> tuple:
    """A server batching on llama.cpp runs its mode ``fast`` unless the user chose a mode: only that mode
    verifies every request's tree in one ``llama_decode`` (said in one line, with what it changes)."""
    options = tuple(backend_options or ())
    if max_batch <= 1 or any(o.partition("=")[0].strip() == "mode" for o in options):
        return options
    from .backends import AUTO, choose_backend

    chosen = backend if backend not in (None, AUTO) else choose_backend(target, device, registry, dtype)[0]
    if chosen != "llama.cpp":
        return options
    click.echo("specframe: llama.cpp mode fast, so one llama_decode verifies the whole batch: each output is the "
               "greedy decoding (or the sample) of the batched call's logits, where a near-tie may resolve "
               "differently from plain decoding; --backend-option mode=exact keeps every output token for token "
               "plain decoding's (requests then verified one after another)", err=True)
    return options + ("mode=fast",)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise SpecframeError(f"cannot read prompt file '{path}': {err.strerror}") from err


class _StreamPrinter:
    """Prints newly decoded text as tokens are committed (decoding the whole output keeps multi-byte
    characters intact)."""

    def __init__(self, target):
        self.target, self.ids, self.shown = target, [], ""

    def __call__(self, new_ids: list[int]) -> None:
        self.ids += new_ids
        text = self.target.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        click.echo(text[len(self.shown):], nl=False)
        sys.stdout.flush()
        self.shown = text

    def finish(self) -> None:
        text = self.target.decode(self.ids)
        click.echo(text[len(self.shown):])


@cli.command()
@click.option("--policies", "methods", default="ar,chain,best-first:16,static-tree,bastion", show_default=True,
              help="Comma-separated methods: POLICY[:VALUE][@DRAFTER] (e.g. best-first:32@ngram) and the backend's peers: hf, hf-lookup, hf-assisted (transformers) or llama-cpp, llama-cpp-lookup, llama-server, llama-server-ngram, llama-server-draft (llama.cpp).")
@click.option("--dataset", default="mt-bench,humaneval", show_default=True,
              help="Comma-separated: mt-bench, mt-bench-2, humaneval, sharegpt (held-out), or .jsonl files.")
@click.option("--num-prompts", type=int, default=10, show_default=True)
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--target", "-m", default=None, help="As for `run` (default: the embedded SmolLM2).")
@click.option("--backend", default=None, help="As for `run` (default: auto).")
@click.option("--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE", help="As for `run`.")
@click.option("--drafter", default=None, help="Drafter for every policy that drafts (default: each policy's own).")
@click.option("--draft-model", default=None, metavar="SPEC",
              help="The draft model (hub id, directory, .gguf file or alias) of the draft-model peers (hf-assisted, "
                   "llama-server-draft) and of methods with drafter `model` (bastion@model runs as model:SPEC). "
                   "Default: each one's own (hf-assisted: an int8 copy of the target; llama-server-draft: the target's own GGUF).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Parameter override applied to every policy that takes it.")
@click.option("--out", "out_dir", default="runs/bench", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-plots", is_flag=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.pass_context
def bench(ctx, methods, dataset, num_prompts, max_new_tokens, temperature, top_p, top_k, repeats, seed, target,
          backend, backend_options, drafter, draft_model, overrides, out_dir, no_plots, dtype, device):
    """Benchmark policies side by side in one process; writes results.jsonl, summary.json, report.md, plots."""
    from .tools.bench import check_methods, run_bench, split_methods
    from .components import SamplingParams
    from .datasets import load
    from .resolve import parse_overrides

    registry = _registry(ctx)
    labels = split_methods(methods)
    check_methods(labels, registry)
    check_backend(registry, backend)
    names = [d.strip() for d in dataset.split(",") if d.strip()]
    for name in names:
        load(name, 1)  # fail fast on unknown or empty datasets
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if num_prompts <= 0 or max_new_tokens <= 0 or repeats <= 0:
        raise SpecframeError("--num-prompts, --max-new-tokens and --repeats must be positive")
    params = parse_overrides(list(overrides))
    tgt = load_backend_target(registry, target, backend, backend_options, dtype, device)
    summary = run_bench(tgt, labels, names, out_dir, num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, repeats=repeats, seed=seed,
                        drafter=drafter, params=params, registry=registry, plots=not no_plots, draft_model=draft_model)
    click.echo((Path(out_dir) / "report.md").read_text())
    if summary["failures"]:
        click.echo(f"error: {len(summary['failures'])} failure(s); see {out_dir}/results.jsonl", err=True)
        ctx.exit(1)


@cli.command()
@click.option("--dataset", default="mt-bench,humaneval", show_default=True)
@click.option("--num-prompts", type=int, default=10, show_default=True)
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--target", "-m", default=None)
@click.option("--backend", default=None, help="As for `run` (default: auto).")
@click.option("--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE", help="As for `run`.")
@click.option("--drafter", default=None, help="Drafter to record (default: what bastion would use).")
@click.option("--out", "out_file", default="runs/trace.jsonl", show_default=True, type=click.Path(dir_okay=False))
@click.pass_context
def trace(ctx, dataset, num_prompts, max_new_tokens, target, backend, backend_options, drafter, out_file):
    """Record a greedy acceptance trace (the drafter's proposal at every position) for `simulate`."""
    from .datasets import load
    from .tools.trace import record_trace

    registry = _registry(ctx)
    check_backend(registry, backend)
    if drafter is not None:
        registry.get("drafter", drafter.partition(":")[0])
    if num_prompts <= 0 or max_new_tokens <= 0:
        raise SpecframeError("--num-prompts and --max-new-tokens must be positive")
    prompts = [p for name in dataset.split(",") if name.strip() for p in load(name.strip(), num_prompts)]
    tgt = load_backend_target(registry, target, backend, backend_options)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    record_trace(tgt, drafter, prompts, max_new_tokens, Path(out_file), registry, log=lambda m: click.echo(m, err=True))
    click.echo(f"trace written to {out_file}")


@cli.command()
@click.option("--trace", "trace_file", required=True, type=click.Path(dir_okay=False), help="From `specframe trace`.")
@click.option("--profile", "profile_file", required=True, type=click.Path(dir_okay=False),
              help="Latency table {points: [{n, c, ms_median}]} of the device to simulate.")
@click.option("--policies", "methods", default="ar,chain,best-first:16,static-tree,bastion", show_default=True)
@click.option("--target", "-m", default=None, help="The traced target (its config shapes the roofline).")
@click.option("--overhead-ms", type=float, default=None, help="Host overhead per step at n = 1 (default: the trace's median); bigger trees add the profile's per-node host time.")
@click.option("--host-ms-per-node", "node_ms", type=float, default=None, help="Host time per tree node beyond one on the simulated machine (default: the profile's host_ms_median column, else 0).")
@click.option("--draft-ms", type=float, default=None, help="Per-step draft time on the simulated device (default: as measured while tracing); for a hybrid trace, the time of a step where every source runs, split in the traced proportions.")
@click.option("--compare", "compare_dir", default=None, type=click.Path(file_okay=False),
              help="A `specframe bench` directory from the profiled machine: report simulated vs measured τ and speedup on the traced prompts.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="Serve each dataset's traced prompts as this many concurrent requests (continuous batching: one simulated forward per step for all their trees).")
@click.option("--out", "out_dir", default="runs/simulate", show_default=True, type=click.Path(file_okay=False))
@click.pass_context
def simulate(ctx, trace_file, profile_file, methods, target, overhead_ms, node_ms, draft_ms, compare_dir, batch, out_dir):
    """Run policies through the engine over a trace, on a device's latency profile (a labelled simulation)."""
    from .tools.bench import check_methods, split_methods
    from .tools.simulate import simulate as run_simulation
    from .backends import load_target, quiet_backends

    registry = _registry(ctx)
    labels = split_methods(methods)
    check_methods(labels, registry)
    for f in (trace_file, profile_file):
        if not Path(f).is_file():
            raise SpecframeError(f"file not found: {f}")
    if any(ms is not None and not ms >= 0 for ms in (overhead_ms, node_ms, draft_ms)):
        raise SpecframeError("--overhead-ms, --host-ms-per-node and --draft-ms must be >= 0")
    if batch <= 0:
        raise SpecframeError(f"--batch must be positive, got {batch}")
    if batch > 1 and compare_dir is not None:
        raise SpecframeError("--compare checks single-request runs; leave out --batch")
    if compare_dir is not None and not (Path(compare_dir) / "results.jsonl").is_file():
        raise SpecframeError(f"--compare needs a `specframe bench` directory; {Path(compare_dir) / 'results.jsonl'} is missing")
    quiet_backends(registry)
    tgt = load_target(target, "hf", registry=registry)
    run_simulation(Path(trace_file), labels, profile_file, Path(out_dir), tgt, registry,
                   None if overhead_ms is None else overhead_ms / 1000, None if draft_ms is None else draft_ms / 1000,
                   None if compare_dir is None else Path(compare_dir), None if node_ms is None else node_ms / 1000,
                   batch)
    click.echo((Path(out_dir) / "report.md").read_text())


@cli.command()
@click.option("--ns", default="1,2,4,8,16,32,64,128,256", show_default=True)
@click.option("--contexts", default="256,1024", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Rounds over all points (after one warm-up round).")
@click.option("--target", "-m", default=None)
@click.option("--backend", default=None, help="As for `run` (default: auto).")
@click.option("--backend-option", "backend_options", multiple=True, metavar="KEY=VALUE", help="As for `run`.")
@click.option("--out", "out_file", default="runs/profile.json", show_default=True, type=click.Path(dir_okay=False))
@click.pass_context
def profile(ctx, ns, contexts, repeats, target, backend, backend_options, out_file):
    """Measure this machine's verify latency table (n tree tokens × context) for `simulate`."""
    from .tools.profile import measure_profile

    try:
        n_list = [int(x) for x in ns.split(",")]
        c_list = [int(x) for x in contexts.split(",")]
    except ValueError as err:
        raise SpecframeError(f"--ns and --contexts take comma-separated integers: {err}") from err
    if min(n_list + c_list) <= 0 or repeats <= 0:
        raise SpecframeError("--ns, --contexts and --repeats must be positive")
    registry = _registry(ctx)
    check_backend(registry, backend)
    tgt = load_backend_target(registry, target, backend, backend_options)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    click.echo(f"profile written to {measure_profile(tgt, n_list, c_list, repeats, Path(out_file))}")


@cli.command("train-drafter")
@click.option("--target", "-m", default=None, help="As for `run` (default: the embedded SmolLM2).")
@click.option("--data", "data_files", default=None, help="Comma-separated self-distillation JSONL files ({prompt_ids, response_ids}); default: generate them.")
@click.option("--num-prompts", type=int, default=2000, show_default=True, help="Prompts to generate answers for when --data is not given.")
@click.option("--prompts", "prompt_sources", default="sharegpt", show_default=True,
              help="Comma-separated prompt sources for generated data: sharegpt (its training split), python-stdlib "
                   "(HumanEval-shaped code stubs from the standard library), python-stdlib-methods (the same for class "
                   "methods), or a .jsonl file; interleaved.")
@click.option("--features", "feature_dirs", default=None,
              help="Comma-separated feature caches to train on, in order (default: WORK/features); add another "
                   "work dir's cache to train on more data, e.g. another domain.")
@click.option("--work", "work_dir", default="runs/drafter", show_default=True, type=click.Path(file_okay=False), help="Work directory (data, feature cache, checkpoint, log); reruns resume.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Export the trained drafter here (published layout, bf16).")
@click.option("--stage", type=click.Choice(["all", "data", "features", "train", "export"]), default="all", show_default=True)
@click.option("--max-rows", type=int, default=None, help="Use at most this many training sequences.")
@click.option("--max-response", type=int, default=128, show_default=True, help="Response tokens kept per row (the first ones).")
@click.option("--block-size", type=int, default=8, show_default=True)
@click.option("--layers", "num_layers", type=int, default=2, show_default=True, help="Draft decoder layers.")
@click.option("--target-layers", default=None, help="Comma-separated target layer ids to read (default: 3 spread over depth).")
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--anchors", type=int, default=4, show_default=True, help="Anchor positions per sequence.")
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--draft-vocab", type=int, default=0, show_default=True, help="Read out only the K most frequent answer tokens (a CPU draft step is mostly the LM head); 0: the whole vocabulary. Fixed by the first training run.")
@click.option("--init-from", default=None, type=click.Path(file_okay=False), help="Start from this drafter's weights (a checkpoint or an exported drafter) with a fresh optimizer and schedule; its held-out rows stay held out.")
@click.option("--time-budget", type=float, default=None, help="Minutes this invocation may run; it stops cleanly and a rerun resumes.")
@click.pass_context
def train_drafter(ctx, target, data_files, num_prompts, prompt_sources, feature_dirs, work_dir, out_dir, stage, max_rows, max_response, block_size,
                  num_layers, target_layers, steps, batch_size, anchors, lr, draft_vocab, init_from, time_budget):
    """Train a DFlash block-diffusion drafter for a target by self-distillation (resumable)."""
    import time as _time

    from .backends import load_target, quiet_backends

    trainer = _registry(ctx).get("drafter", "dflash").factory.trainer()  # DFlash training lives beside its plugin
    FeatureStore, TrainConfig, train, export = trainer.FeatureStore, trainer.TrainConfig, trainer.train, trainer.export
    default_layer_ids, generate_data, read_rows = trainer.default_layer_ids, trainer.generate_data, trainer.read_rows

    if min(block_size, num_layers, steps, batch_size, anchors, max_response) <= 0 or block_size < 2:
        raise SpecframeError("--block-size (>= 2), --layers, --steps, --batch-size, --anchors and --max-response must be positive")
    if init_from is not None and not (Path(init_from) / "model.safetensors").is_file():
        raise SpecframeError(f"--init-from needs a drafter directory with model.safetensors; {init_from} has none")
    if draft_vocab < 0:
        raise SpecframeError(f"--draft-vocab must be 0 (whole vocabulary) or a positive token count, got {draft_vocab}")
    work = Path(work_dir)
    caches = [Path(d) for d in feature_dirs.split(",") if d] if feature_dirs else [work / "features"]
    if feature_dirs and stage in ("all", "train"):  # WORK/features itself is made by stage all
        made = work / "features" if stage == "all" else None
        missing = [str(d) for d in caches if not (d / "meta.json").is_file() and d != made]
        if missing:
            raise SpecframeError(f"no feature cache at {', '.join(missing)} (run --stage features there first)")
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{_time.strftime('%H:%M:%S')} {msg}"
        click.echo(line, err=True)
        log_file.write(line + "\n")
        log_file.flush()

    deadline = _time.time() + 60 * time_budget if time_budget else None
    registry = _registry(ctx)
    quiet_backends(registry)
    tgt = load_target(target, "hf", registry=registry)
    layers = [int(x) for x in target_layers.split(",")] if target_layers else default_layer_ids(tgt.num_layers)
    cfg = TrainConfig(block_size=block_size, num_layers=num_layers, target_layer_ids=layers, steps=steps,
                      batch_size=batch_size, anchors_per_seq=anchors, lr=lr, draft_vocab=draft_vocab, init_from=init_from)
    log(f"train-drafter: target {tgt.name}, work {work}, stage {stage}, config {cfg}")
    files = [f for f in (data_files or "").split(",") if f]
    if stage in ("all", "data") and not files:
        sources = tuple(x for x in prompt_sources.split(",") if x)
        files = [str(generate_data(tgt, work / "data.jsonl", num_prompts, max_response, log, sources=sources,
                                   deadline=deadline))]
    if stage in ("all", "features"):
        if not files:
            files = [str(work / "data.jsonl")]
        rows = read_rows(files, max_response, max_rows)
        log(f"features: {len(rows)} usable rows from {', '.join(files)}")
        FeatureStore(work / "features").extract(tgt, rows, tuple(layers), log=log, deadline=deadline)
    if stage in ("all", "train"):
        ckpt = train(tgt, [FeatureStore(d) for d in caches], work, cfg, log=log, deadline=deadline)
        log(f"train: checkpoint at {ckpt}")
    if stage in ("all", "export") and out_dir:
        log(f"export: {export(work / 'checkpoint', Path(out_dir))}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plugins(ctx, as_json):
    """List installed plugins, the hooks each implements, and the components they register."""
    registry = _registry(ctx)
    provided: dict[str, list[str]] = {}
    for kind, table in registry.components.items():
        for name, reg in table.items():
            provided.setdefault(reg.plugin, []).append(f"{kind}:{name}")
    for name, (_, plugin) in registry.policies.items():
        provided.setdefault(plugin, []).append(f"policy:{name}")
    rows = [
        {"name": p.name, "distribution": p.distribution, "version": p.version, "builtin": p.builtin,
         "hooks": p.hooks, "provides": sorted(provided.get(p.name, []))}
        for p in registry.plugin_set.plugins
    ]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "problems": registry.plugin_set.problems}, indent=2))
        return
    for row in rows:
        tag = "built-in" if row["builtin"] else f"{row['distribution']} {row['version']}".strip()
        click.echo(f"{row['name']}  ({tag})")
        click.echo(f"    hooks:    {', '.join(row['hooks']) or '-'}")
        click.echo(f"    provides: {', '.join(row['provides']) or '-'}")
    for problem in registry.plugin_set.problems:
        click.echo(f"problem: {problem}")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--target", "-m", default=None,
              help="Also resolve each policy against this target (as for `run`; 'smollm2-135m' = the embedded "
                   "default): which drafter `auto` picks and why.")
@click.option("--backend", default=None, help="With --target: the runtime to load it on, as for `run` (default: auto).")
@click.pass_context
def policies(ctx, as_json, target, backend):
    """List policy bundles and their components."""
    registry = _registry(ctx)
    check_backend(registry, backend)
    tgt = None
    if target is not None:
        tgt = load_backend_target(registry, target, backend, ())
    rows = []
    for name in registry.names("policy"):
        spec, plugin = registry.policies[name]
        row = {"name": name, "plugin": plugin, "description": spec.description, **spec.components(),
               "params": spec.params, "shorthand": spec.shorthand}
        if tgt is not None:
            from .engine import SpecGenerator

            row["resolved"] = {"target": tgt.name, "backend": getattr(tgt, "backend", "?"),
                               **SpecGenerator(tgt, name, registry=registry).described}
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        click.echo(f"{row['name']}: {row['description']}")
        comps = " · ".join(f"{k.replace('_', '-')} {row[k]}" for k in COMPONENT_KINDS)
        click.echo(f"    {comps}")
        if "resolved" in row:
            res = row["resolved"]
            shown = res["details"].get("drafter", res["names"]["drafter"])
            why = f" ({res['auto']['drafter']})" if "drafter" in res["auto"] else ""
            click.echo(f"    on {res['target']}: drafter {shown}{why}")
        if row["params"]:
            click.echo(f"    defaults: {', '.join(f'{k}={v}' for k, v in row['params'].items())}")
        if row["shorthand"]:
            click.echo(f"    {row['name']}:VALUE sets {row['shorthand']}")


@cli.command()
@click.pass_context
def components(ctx):
    """List every registered component by kind, with its parameters."""
    registry = _registry(ctx)
    for kind in KIND_HOOKS:
        click.echo(f"{plural(kind_label(kind))}:")
        for name in registry.names(kind):
            params = registry.parameters(kind, name)
            shown = ", ".join(
                f"{k}={p.default!r}" if p.default is not p.empty else k for k, p in params.items()
            )
            click.echo(f"    {name}({shown})  [{registry.components[kind][name].plugin}]")


def build_cli(plugin_set=None) -> click.Group:
    """The CLI with plugin commands added (``register_commands``). Problems are warned about once."""
    plugin_set = plugin_set or make_plugin_set()
    warn_problems(plugin_set)
    for impl in plugin_set.pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=cli)
        except Exception as err:  # noqa: BLE001
            click.echo(f"specframe: warning: plugin '{impl.plugin_name}' failed in register_commands: {err}", err=True)
    return cli


def main(argv=None) -> None:
    plugin_set = make_plugin_set()
    build_cli(plugin_set).main(args=argv, obj={"plugin_set": plugin_set}, prog_name="specframe")


if __name__ == "__main__":
    main()
