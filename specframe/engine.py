"""The decoding loop: draft → expand → verify → commit, with per-step records.

:class:`SpecGenerator` is built once (target loaded once, components resolved once) and reused for any
number of :meth:`SpecGenerator.generate` calls. The output is exactly what plain decoding of the target
would produce (greedy: token for token; sampling: in distribution) whatever the policy.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .components import (
    AcceptanceSurrogate,
    component_name,
    Draft,
    CostModel,
    EmptyDraft,
    Drafter,
    ExpansionContext,
    ExpansionPolicy,
    RunStats,
    Sampler,
    SamplingParams,
    StepRecord,
    Verifier,
)
from .backends import capabilities
from .clock import Clock, real_clock
from .errors import InvalidTreeError, PluginError, SpecframeError
from .fit import StepCosts
from .gate import DraftGate
from .registry import COMPONENT_KINDS, PolicySpec, Registry
from .target import Target
from .tree import Tree, validate_tree

log = logging.getLogger("specframe")
DEFAULT_POLICY = "bastion"
COMPONENT_ALIASES = {"cost-model": "cost_model", "costmodel": "cost_model", "expansion-policy": "expansion"}


@dataclass
class Generation:
    """Result of one :meth:`SpecGenerator.generate` call."""

    token_ids: list[int]  # new tokens only
    text: str
    prompt_ids: list[int]
    stats: RunStats
    components: dict | None = None  # what ran: names, details, and why ``auto`` chose what it chose

    def to_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.summary()}
        if self.components is not None:
            out["components"] = self.components
        return out


@dataclass
class Components:
    """The resolved components of one policy, plus the names they were resolved from."""

    policy: PolicySpec
    drafter: Drafter
    surrogate: AcceptanceSurrogate
    cost_model: CostModel
    expansion: ExpansionPolicy
    names: dict[str, str]
    notes: dict[str, str]  # component -> why ``auto`` chose it (only for components resolved by ``auto``)

    def describe(self) -> dict:
        """Names as resolved, each component's own description where it gives one (a drafter's checkpoint
        path, a hybrid's sources), and the ``auto`` choices' reasons — for ``--json`` output and logs."""
        details = {}
        for comp in ("drafter", "surrogate", "cost_model", "expansion"):
            describe = getattr(getattr(self, comp), "describe", None)
            if callable(describe):
                details[comp] = str(describe())
        return {"policy": self.policy.name, "names": dict(self.names), "details": details, "auto": dict(self.notes)}


def parse_value(text: str):
    """``--set`` values: Python literals where they parse (16, 0.5, True, 4,2,2), else the string."""
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"none", "null"}:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``["budget=16", "expansion.topology=2,2,1"]`` → ``{"budget": 16, "expansion.topology": (2, 2, 1)}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecframeError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = parse_value(value)
    return out


def resolve_components(
    registry: Registry,
    target: Target,
    policy: str = DEFAULT_POLICY,
    drafter: str | Drafter | None = None,
    overrides: Mapping[str, object] | None = None,
    strict: bool = True,
    clock: Clock = real_clock,
    **objects,
) -> Components:
    """Resolve a policy string (``name`` or ``name:VALUE``) plus overrides into component instances.

    ``overrides`` keys are ``component.param``, a bare ``param`` (routed to every component that accepts
    it), or a component name (``surrogate``, ``cost_model``, ...) to swap that component by name.
    ``objects`` may pass ready component instances (``surrogate=MySurrogate()``), used as they are.
    With ``strict=False`` overrides that no component of this policy takes are ignored (for applying one
    ``--set`` to several policies).
    """
    name, _, short = policy.partition(":")
    spec = registry.policy(name)
    chosen: dict[str, object] = dict(spec.components())
    defaults: dict[str, object] = dict(spec.params)
    user: dict[str, object] = {}
    if short:
        if not spec.shorthand:
            raise SpecframeError(f"policy '{name}' takes no ':VALUE' shorthand; use --set key=value")
        user[spec.shorthand] = parse_value(short)
    for key, value in (overrides or {}).items():
        key = COMPONENT_ALIASES.get(key, key)
        if key in COMPONENT_KINDS:
            chosen[key] = value
        else:
            user[key] = value
    if drafter is not None:
        chosen["drafter"] = drafter
    for key, obj in objects.items():
        key = COMPONENT_ALIASES.get(key, key)
        if key not in COMPONENT_KINDS or key == "verifier":
            raise SpecframeError(f"unknown component '{key}'; pass one of drafter, surrogate, cost_model, expansion")
        if obj is not None:
            chosen[key] = obj
    notes: dict[str, str] = {}
    if chosen["drafter"] in ("auto", "auto-hybrid"):
        chosen["drafter"], notes["drafter"] = choose_drafter(registry, target, composite=chosen["drafter"] == "auto-hybrid")

    built: dict[str, object] = {}
    names: dict[str, str] = {}
    params = _route_params(registry, chosen, defaults, user, strict)
    for comp in ("drafter", "surrogate", "cost_model", "expansion"):
        value = chosen[comp]
        if not isinstance(value, str):
            built[comp], names[comp] = value, component_name(value)
            continue
        base, _, arg = value.partition(":")
        kwargs = dict(params.get(comp, {}))
        if arg:
            kwargs["path"] = arg
        built[comp] = registry.build(COMPONENT_KINDS[comp], base, kwargs, target=target, registry=registry,
                                     clock=clock)
        names[comp] = value
    names["verifier"] = str(chosen["verifier"])
    return Components(spec, built["drafter"], built["surrogate"], built["cost_model"], built["expansion"], names,
                      notes)


def default_drafter(registry: Registry, target: Target, composite: bool = False) -> str:
    """The drafter ``auto`` resolves to (see :func:`choose_drafter`)."""
    return choose_drafter(registry, target, composite)[0]


def choose_drafter(registry: Registry, target: Target, composite: bool = False) -> tuple[str, str]:
    """The drafter ``auto`` resolves to, and why: among registered drafters whose factory says
    ``available_for(target)``, the one with the highest ``auto_priority``; else ``ngram``. Composite
    drafters (``composite = True``, e.g. ``hybrid``) only count for ``auto-hybrid``. A factory may
    explain its answer with ``availability(target) -> (ok, reason)`` instead of ``available_for``; the
    reason of the winner (or of the best refused candidate, when ``ngram`` is the fallback) comes back."""
    best, best_priority, why = "ngram", float("-inf"), ""
    refused: list[tuple[float, str, str]] = []
    for name in registry.names("drafter"):
        factory = registry.get("drafter", name).factory
        if getattr(factory, "composite", False) and not composite:
            continue
        priority = getattr(factory, "auto_priority", 0)
        if priority <= best_priority:
            continue
        verdict = _availability(name, factory, target)
        if verdict is None:
            continue
        ok, reason = verdict
        if ok:
            best, best_priority, why = name, priority, reason
        else:
            refused.append((priority, name, reason))
    if best == "ngram" and not why:
        if refused:
            _, name, reason = max(refused)
            why = f"'{name}' is not available ({reason}); prompt lookup needs no model"
        else:
            why = "no drafter that needs a model is registered for this target; prompt lookup needs no model"
    return best, why


def _availability(name: str, factory, target: Target) -> tuple[bool, str] | None:
    """``(ok, reason)`` from a drafter factory's ``availability`` / ``available_for``, or None if it has neither."""
    explain, check = getattr(factory, "availability", None), getattr(factory, "available_for", None)
    try:
        if explain is not None:
            ok, reason = explain(target)
            return bool(ok), str(reason)
        if check is not None:
            ok = bool(check(target))
            return ok, f"'{name}' says it is {'available' if ok else 'not available'} for this target"
    except SpecframeError:
        raise
    except Exception as err:  # noqa: BLE001
        method = "availability" if explain is not None else "available_for"
        raise PluginError(f"drafter '{name}' failed in {method}: {type(err).__name__}: {err}") from err
    return None


def _route_params(registry: Registry, chosen: dict, defaults: dict, user: dict, strict: bool = True) -> dict[str, dict]:
    """Assign parameters to components. User parameters must fit; defaults are dropped where a swapped-in
    component does not take them."""
    accepts: dict[str, set[str]] = {}
    for comp, value in chosen.items():
        if isinstance(value, str) and comp != "verifier":
            accepts[comp] = set(registry.parameters(COMPONENT_KINDS[comp], value.partition(":")[0]))
        else:
            accepts[comp] = set()
    out: dict[str, dict] = {comp: {} for comp in chosen}
    for source, must_fit in ((defaults, False), (user, strict)):
        for key, value in source.items():
            comp, dot, param = key.partition(".")
            comp = COMPONENT_ALIASES.get(comp, comp)
            if dot:
                if comp not in COMPONENT_KINDS:
                    raise SpecframeError(f"unknown component '{comp}' in --set {key}; use one of {', '.join(COMPONENT_KINDS)}")
                targets = [comp] if param in accepts[comp] else []
            else:
                param = key
                targets = [c for c, ps in accepts.items() if param in ps]
            if not targets:
                if not must_fit:
                    continue
                known = sorted(f"{c}.{p}" for c, ps in accepts.items() for p in ps)
                raise SpecframeError(
                    f"no component of this policy takes the parameter '{key}'; settable: {', '.join(known) or '(none)'}"
                )
            for comp_name in targets:
                out[comp_name][param] = value
    return out


class SpecGenerator:
    """Speculative generation with one target and one policy. Build once, call :meth:`generate` often.

    >>> gen = SpecGenerator.from_pretrained(policy="best-first")          # doctest: +SKIP
    >>> out = gen.generate("Write a haiku about trees.", max_new_tokens=32)  # doctest: +SKIP
    >>> out.text, out.stats.tau                                              # doctest: +SKIP
    """

    def __init__(
        self,
        target: Target,
        policy: str = DEFAULT_POLICY,
        *,
        drafter: str | Drafter | None = None,
        params: Mapping[str, object] | None = None,
        registry: Registry | None = None,
        max_tree_nodes: int = 512,
        strict_params: bool = True,
        clock: Clock = real_clock,
        **objects,
    ):
        if max_tree_nodes <= 0:
            raise SpecframeError(f"max_tree_nodes must be positive, got {max_tree_nodes}")
        self.target = target
        self.registry = registry or Registry()
        self.clock = clock  # every timing of the loop, the gates and calibration reads this one clock
        self.components = resolve_components(self.registry, target, policy, drafter, params, strict_params,
                                             clock=clock, **objects)
        self.described = self.components.describe()
        for comp, why in self.components.notes.items():
            log.info("%s auto -> %s: %s", comp, self.components.names[comp], why)
        self.max_tree_nodes = max_tree_nodes
        self._verifiers: dict[SamplingParams, Verifier] = {}
        self.observers = Observers(self.registry.pm)
        self.costs = StepCosts()  # a step's seconds besides the forward: D and the host's per-node part
        self.calibrated = False  # the cost model is calibrated once per generator, on its first prompt
        gated = getattr(self.components.expansion, "gates_drafting", False)
        self.gate = DraftGate() if gated and not getattr(self.components.drafter, "gates_sources", False) else None

    @classmethod
    def from_pretrained(cls, target: str | None = None, policy: str = DEFAULT_POLICY, *, dtype="float32",
                        device="cpu", **kwargs) -> "SpecGenerator":
        """Load ``target`` (hub id, local path, or ``None`` for the embedded SmolLM2) and build a generator."""
        return cls(Target.load(target, dtype=dtype, device=device), policy, **kwargs)

    @property
    def auto_notes(self) -> dict[str, str]:
        """Why ``auto`` chose each component it chose (e.g. ``{"drafter": "..."}``)."""
        return dict(self.components.notes)

    @property
    def policy_name(self) -> str:
        return self.components.policy.name

    def verifier_for(self, sampling: SamplingParams) -> tuple[str, Verifier]:
        name = self.components.names["verifier"]
        if name == "auto":
            name = "greedy" if sampling.greedy else "sample"
        key = (name, sampling)
        if key not in self._verifiers:
            self._verifiers[key] = self.registry.build("verifier", name, {}, target=self.target, sampling=sampling)
        return name, self._verifiers[key]

    # ------------------------------------------------------------------ generation
    def prepare_prompt(self, prompt: str | list[int], chat: bool | None = None) -> list[int]:
        if isinstance(prompt, str):
            ids = self.target.encode(prompt, chat=chat)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise SpecframeError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise SpecframeError(f"prompt token {bad[0]} is outside the vocabulary [0, {self.target.vocab_size})")
        return ids

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool | None = None,
        stream: Callable[[list[int]], None] | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` after ``prompt`` (text, or token ids used as they are).

        Stops after an EOS token (included) exactly as plain decoding would. ``stream`` receives each
        step's committed tokens; when it returns ``True`` the generation ends after that step, with the
        tokens and stats so far (as a server does for a stop string or a client that went away).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise SpecframeError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        ids = self.prepare_prompt(prompt, chat)
        limit = self.target.max_context
        if len(ids) + max_new_tokens > limit:
            raise SpecframeError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                f"target '{self.target.name}' ({limit} tokens); shorten the prompt or lower max_new_tokens"
            )
        verifier_name, verifier = self.verifier_for(sampling)
        return _Run(self, ids, max_new_tokens, verifier_name, verifier, Sampler(seed), stream).execute()


class _Run:
    """One generation's loop state (kept off the generator so generate() is re-entrant per call)."""

    def __init__(self, gen: SpecGenerator, ids, max_new, verifier_name, verifier, sampler, stream):
        self.gen, self.c, self.t = gen, gen.components, gen.target
        self.ids, self.max_new = ids, max_new
        self.verifier_name, self.verifier, self.sampler, self.stream = verifier_name, verifier, sampler, stream
        self.eos = set(self.t.eos_token_ids)
        self.clock = gen.clock
        self.stats = RunStats()

    def _call(self, who: str, fn, *args):
        """Call a plugin method; a failure names the plugin."""
        try:
            return fn(*args)
        except SpecframeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise PluginError(f"{who} failed: {type(err).__name__}: {err}") from err

    def execute(self) -> Generation:
        c, names = self.c, self.c.names
        clock = self.clock
        t0 = clock()
        session = self.t.start(c.drafter.feature_layers)
        feats = session.prefill(self.ids[:-1])
        self._call(f"drafter '{names['drafter']}'", c.drafter.start, list(self.ids), feats)
        self.stats.prefill_s = clock() - t0
        if not self.gen.calibrated:  # once per generator; not counted as decoding time
            self.gen.calibrated = True
            started = clock()
            self._call(f"cost model '{names['cost_model']}'", c.cost_model.calibrate, self._timer(session), session.past)
            t0 += clock() - started
        context, out = list(self.ids), []
        while len(out) < self.max_new:
            committed = self.step(session, context, self.max_new - len(out))
            out += committed
            context += committed
            if committed[-1] in self.eos:
                if self.stream is not None:
                    self.stream(committed)
                break
            if self.stream is not None and self.stream(committed):
                break  # the caller asked to stop (a stop string, a client gone)
        self.stats.new_tokens = len(out)
        self.stats.wall_s = clock() - t0
        self.gen.observers.run_end(self.stats)
        return Generation(out, self.t.decode(out), list(self.ids), self.stats, self.gen.described)

    def _timer(self, session):
        """``measure(n)``: seconds of one real verification of an n-token chain at the current context."""
        root = self.ids[-1]

        room, _ = self.bounds(session.past, self.t.max_context)  # same limits as real steps

        def measure(n: int) -> float:
            n = max(1, min(n, room + 1, self.t.max_context - session.past - 1))
            tree = Tree.from_lists([root] * n, list(range(-1, n - 1)))
            session.verify(tree)  # warm-up (allocations, kernel selection)
            session.rollback(n)
            self.t.synchronize()
            start = self.clock()
            session.verify(tree)
            self.t.synchronize()
            seconds = self.clock() - start
            session.rollback(n)
            return seconds

        return measure

    def bounds(self, past: int, remaining: int) -> tuple[int, int]:
        """(max non-root nodes, max depth) this step may verify."""
        max_depth = min(remaining - 1, self.t.max_context - past - 1)
        max_nodes = self.gen.max_tree_nodes
        cap = getattr(self.c.cost_model, "max_tokens", None)  # e.g. a measured table's largest n
        if cap:
            max_nodes = min(max_nodes, int(cap) - 1)
        most = capabilities(self.t).max_tree_tokens  # the backend's own limit on one verification
        if most:
            max_nodes = min(max_nodes, most - 1)
        if self.t.sliding_window is not None:
            max_nodes = min(max_nodes, self.t.sliding_window - 2 - past)
        return max(max_nodes, 0), max(min(max_depth, max_nodes), 0)

    def check_scores(self, scores: list[float], size: int) -> None:
        if len(scores) != size or not all(0.0 <= p <= 1.0 for p in scores):  # NaN fails both comparisons
            bad = next((p for p in scores if not 0.0 <= p <= 1.0), f"{len(scores)} scores for {size} nodes")
            raise PluginError(
                f"surrogate '{self.c.names['surrogate']}' (via expansion policy '{self.c.names['expansion']}') "
                f"gave acceptance probability {bad!r}; it must be in [0, 1]"
            )

    def propose(self, context: list[int], max_depth: int) -> Draft:
        """Ask the drafter for candidates; anything but a valid Draft is an error naming it."""
        who = f"drafter '{self.c.names['drafter']}'"
        draft = self._call(who, self.c.drafter.propose, context, max_depth)
        if not isinstance(draft, Draft):
            raise PluginError(f"{who} returned {type(draft).__name__}, not a specframe Draft")
        try:
            draft.validate(self.t.vocab_size)
        except ValueError as err:
            raise InvalidTreeError(f"{who} produced an invalid draft: {err}") from err
        return draft

    def expand(self, draft: Draft, ctx: ExpansionContext):
        """Let the expansion policy pick the tree; check it against the tree invariants and bounds."""
        names = self.c.names
        built = self._call(f"expansion policy '{names['expansion']}'", self.c.expansion.expand, draft, ctx)
        tree = built.tree
        who = f"drafter '{names['drafter']}' with expansion policy '{names['expansion']}'"
        validate_tree(tree, self.t.vocab_size, who)
        if int(tree.tokens[0]) != ctx.root_token or tree.size - 1 > ctx.max_nodes or tree.max_depth > ctx.max_depth:
            raise InvalidTreeError(
                f"{who} produced a tree outside its bounds (root must be the last token, "
                f"≤ {ctx.max_nodes} nodes, depth ≤ {ctx.max_depth}; got {tree.size - 1} nodes, depth {tree.max_depth})"
            )
        self.check_scores(built.scores, tree.size)
        return built

    def predict_cost(self, n: int, past: int) -> float:
        name = self.c.names["cost_model"]
        predicted = self._call(f"cost model '{name}'", self.c.cost_model.predict, n, past)
        if not (isinstance(predicted, (int, float)) and math.isfinite(predicted) and predicted >= 0):
            raise PluginError(f"cost model '{name}' predicted {predicted!r} seconds (must be finite and >= 0)")
        return float(predicted)

    def step(self, session, context: list[int], remaining: int) -> list[int]:
        """One draft → expand → verify → commit step; returns the committed tokens."""
        c, names, gate, clock = self.c, self.c.names, self.gen.gate, self.clock
        past = session.past
        max_nodes, max_depth = self.bounds(past, remaining)
        drafting = gate is None or gate.want()
        t0 = clock()
        draft = self.propose(context, max_depth) if drafting else EmptyDraft()
        t1 = clock()
        costs = self.gen.costs
        ctx = ExpansionContext(context[-1], past, max_nodes, max_depth, c.surrogate, c.cost_model,
                               costs.fixed_seconds, costs.per_node)
        built = self.expand(draft, ctx)
        tree = built.tree
        predicted = self.predict_cost(tree.size, past)
        t2 = clock()
        fwd = session.verify(tree)
        self.t.synchronize()  # so verify_s is the forward's time, not its launch time, on a GPU
        t3 = clock()
        path, bonus = self._call(f"verifier '{self.verifier_name}'", self.verifier.verify, tree, fwd.logits, self.sampler)
        session.keep(path, tree.size)
        accepted = tree.tokens[path[1:]].tolist()
        committed = []
        for tok in accepted + [bonus]:
            committed.append(tok)
            if tok in self.eos or len(committed) == remaining:
                break
        feats = None if fwd.features is None else fwd.features[torch.tensor(path)]
        self._call(f"drafter '{names['drafter']}'", c.drafter.commit, tree.tokens[path].tolist(), feats)
        self._call(f"surrogate '{names['surrogate']}'", c.surrogate.observe, tree, path, built.scores)
        self._call(f"cost model '{names['cost_model']}'", c.cost_model.observe, tree.size, past, t3 - t2)
        t4 = clock()
        record = StepRecord(
            tree_size=tree.size,
            accepted=len(path) - 1,
            tree_depth=tree.max_depth,
            committed=len(committed),
            context_len=past,
            draft_s=t1 - t0,
            overhead_s=(t2 - t1) + (t4 - t3),
            verify_s=t3 - t2,
            expected_accepted=sum(built.scores[1:]),
            predicted_verify_s=float(predicted),
            drafted=drafting,
        )
        if drafting:  # the stopping rule's D and per-node host time: what a step costs besides the forward
            costs.observe(tree.size, record.draft_s, record.overhead_s)
        if gate is not None:
            gate.record(drafting, len(committed), t4 - t0, record.draft_s)
        self.stats.records.append(record)
        self.stats.steps += 1
        self.gen.observers.step_end(record, self.stats.steps - 1)
        return committed


class Observers:
    """The observer hooks ``on_step_end`` / ``on_run_end``, called through pluggy's own hook callers (so
    ``tryfirst``/``trylast``, ``wrapper=True`` and ``hookwrapper=True`` implementations behave as pluggy
    documents), resolved once per generator. With no implementation a step pays one attribute test.
    An observer that raises is named in the error."""

    def __init__(self, pm):
        self.pm = pm
        self._step, self._run = pm.hook.on_step_end, pm.hook.on_run_end
        self.watching_steps = bool(self._step.get_hookimpls())
        self.watching_runs = bool(self._run.get_hookimpls())

    def step_end(self, record: StepRecord, step: int) -> None:
        if self.watching_steps:
            self._call(self._step, record=record, step=step)

    def run_end(self, stats: RunStats) -> None:
        if self.watching_runs:
            self._call(self._run, stats=stats)

    def _call(self, caller, **kwargs) -> None:
        try:
            caller(**kwargs)
        except SpecframeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise PluginError(f"plugin '{_raiser(caller, err)}' in {caller.name} failed: "
                              f"{type(err).__name__}: {err}") from err


def _raiser(caller, err: BaseException) -> str:
    """The name of the plugin whose hook implementation raised ``err`` (its innermost frame wins)."""
    codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()
             if hasattr(impl.function, "__code__")}
    name, tb = "?", err.__traceback__
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code, name)
        tb = tb.tb_next
    return name
