"""The decoding loop: draft → expand → verify → commit, with per-step records.

:class:`SpecGenerator` is built once (target loaded once, components resolved once) and reused for any
number of :meth:`SpecGenerator.generate` calls. The output is exactly what plain decoding of the target
would produce (greedy: token for token; sampling: in distribution) whatever the policy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .backends import capabilities, describe_backend
from .clock import Clock, real_clock
from .components import (
    Draft,
    Drafter,
    EmptyDraft,
    ExpansionContext,
    RunStats,
    Sampler,
    SamplingParams,
    StepRecord,
    TokenLogprob,
    Verifier,
    Verifying,
    token_logprobs,
)
from .errors import InvalidTreeError, PluginError, SpecframeError
from .learning import StepLearning
from .registry import Registry
from .resolve import DEFAULT_POLICY, resolve_components
from .tree import Tree, validate_tree

log = logging.getLogger("specframe")


@dataclass
class Generation:
    """Result of one :meth:`SpecGenerator.generate` call."""

    token_ids: list[int]  # new tokens only
    text: str
    prompt_ids: list[int]
    stats: RunStats
    components: dict | None = None  # what ran: names, details, and why ``auto`` chose what it chose
    logprobs: list[TokenLogprob] | None = None  # per new token, when generate() was asked for them

    def to_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.summary()}
        if self.components is not None:
            out["components"] = self.components
        return out


class SpecGenerator:
    """Speculative generation with one target and one policy. Build once, call :meth:`generate` often.

    >>> gen = SpecGenerator.from_pretrained(policy="best-first")          # doctest: +SKIP
    >>> out = gen.generate("Write a haiku about trees.", max_new_tokens=32)  # doctest: +SKIP
    >>> out.text, out.stats.tau                                              # doctest: +SKIP
    """

    def __init__(
        self,
        target,
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
        self.described = {**self.components.describe(), "backend": describe_backend(target)}
        for comp, why in self.components.notes.items():
            log.info("%s auto -> %s: %s", comp, self.components.names[comp], why)
        self.max_tree_nodes = max_tree_nodes
        self._verifiers: dict[SamplingParams, Verifier] = {}
        self.observers = Observers(self.registry.pm)
        # the draft gate, the stopping rule's step costs, calibration: learned across this generator's steps
        self.learning = StepLearning.for_components(self.components.expansion, self.components.drafter, clock)

    @property
    def gate(self):
        """The engine's draft gate, or None when the policy does not gate drafting (or the drafter gates itself)."""
        return self.learning.gate

    @classmethod
    def from_pretrained(cls, target: str | None = None, policy: str = DEFAULT_POLICY, *, dtype="float32",
                        device="cpu", backend: str = "hf", backend_options: dict | None = None,
                        **kwargs) -> "SpecGenerator":
        """Load ``target`` (hub id, local path, ``.gguf`` file, or ``None`` for the embedded SmolLM2) on
        ``backend`` (``"hf"``: transformers; ``"llama.cpp"``; ``"auto"``: as the CLI chooses, the reason
        in ``target.backend_note``) and build a generator."""
        from .backends import load_target

        registry = kwargs.get("registry")
        tgt = load_target(target, backend, registry=registry, dtype=dtype, device=device, options=backend_options)
        return cls(tgt, policy, **kwargs)

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

    def check_request(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, logprobs: int | None = None, chat: bool | None = None):
        """A request checked before it runs: (prompt ids, sampling, verifier name, verifier); bad input is one
        :class:`SpecframeError` line."""
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise SpecframeError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
            raise SpecframeError(f"logprobs must be an integer >= 0 (how many alternatives per token), got {logprobs!r}")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        ids = self.prepare_prompt(prompt, chat)
        limit, what = self.target.max_context, "the context"
        window = getattr(self.target, "sliding_window", None)  # a backend that cannot go past its window
        if window is not None and window < limit:  # the cache holds window - 1; the last token is never cached
            limit, what = window, f"what specframe can run of a model with sliding-window layers (window {window})"
        if len(ids) + max_new_tokens > limit:
            raise SpecframeError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds {what} of "
                f"target '{self.target.name}' ({limit} tokens); shorten the prompt or lower max_new_tokens"
            )
        verifier_name, verifier = self.verifier_for(sampling)
        if getattr(verifier, "draws_children", False) and not getattr(self.components.drafter, "sampling_q", False):
            raise SpecframeError(
                f"verifier '{verifier_name}' draws children from the draft's distribution, and drafter "
                f"'{self.components.names['drafter']}' has none (its scores are not probabilities); use the "
                "'sample' verifier with it, or a drafter with a real q (dflash, model)")
        return ids, sampling, verifier_name, verifier

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
        stream: Callable[..., bool | None] | None = None,
        logprobs: int | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` after ``prompt`` (text, or token ids used as they are).

        Stops after an EOS token (included) exactly as plain decoding would. ``stream`` receives each
        step's committed tokens; when it returns ``True`` the generation ends after that step, with the
        tokens and stats so far (as a server does for a stop string or a client that went away).

        ``logprobs=k`` (k >= 0) also returns each new token's log-probability under the target and its k
        likeliest alternatives (:class:`~specframe.components.TokenLogprob`), read from the verification's
        logits: the target's own distribution at that token, the same whatever the policy; ``stream`` is
        then called with ``(tokens, logprobs)``.
        """
        ids, _, verifier_name, verifier = self.check_request(prompt, max_new_tokens, temperature, top_k, top_p,
                                                             logprobs, chat)
        return _Run(self, ids, max_new_tokens, verifier_name, verifier, Sampler(seed), stream, logprobs).execute()


class _Run:
    """One generation's loop state (kept off the generator so generate() is re-entrant per call)."""

    def __init__(self, gen: SpecGenerator, ids, max_new, verifier_name, verifier, sampler, stream, logprobs=None,
                 components=None):
        self.gen, self.t, self.learning = gen, gen.target, gen.learning
        self.c = components or gen.components  # a batch's request: the generator's, with a drafter of its own
        self.ids, self.max_new = ids, max_new
        self.verifier_name, self.verifier, self.sampler, self.stream = verifier_name, verifier, sampler, stream
        self.eos = set(self.t.eos_token_ids)
        self.clock = gen.clock
        self.stats = RunStats()
        self.top_logprobs = logprobs  # None: not asked for
        self.logprobs: list[TokenLogprob] = []  # of every committed token so far, when asked
        self.step_logprobs: list[TokenLogprob] = []  # of the last step's tokens

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
        if not self.learning.calibrated:  # once per generator; not counted as decoding time
            self.learning.calibrated = True
            started = clock()
            self._call(f"cost model '{names['cost_model']}'", c.cost_model.calibrate, self._timer(session), session.past)
            t0 += clock() - started
        context, out = list(self.ids), []
        try:
            while len(out) < self.max_new:
                committed = self.step(session, context, self.max_new - len(out))
                out += committed
                context += committed
                if committed[-1] in self.eos:
                    self.emit(committed)
                    break
                if self.emit(committed):
                    break  # the caller asked to stop (a stop string, a client gone)
        finally:
            c.drafter.finish()  # a drafter drafting ahead on its own thread stops and joins it
        self.stats.new_tokens = len(out)
        self.stats.wall_s = clock() - t0
        self.gen.observers.run_end(self.stats)
        return Generation(out, self.t.decode(out), list(self.ids), self.stats, self.gen.described,
                          None if self.top_logprobs is None else self.logprobs)

    def emit(self, committed: list[int]):
        """Hand a step's tokens (and their log-probs, when asked) to the stream callback; its answer."""
        if self.stream is None:
            return None
        if self.top_logprobs is None:
            return self.stream(committed)
        return self.stream(committed, self.step_logprobs)

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
        built = self._call(f"expansion policy '{self.c.names['expansion']}'", self.c.expansion.expand, draft, ctx)
        return self.check_tree(built, draft, ctx)

    def check_tree(self, built, draft: Draft, ctx: ExpansionContext):
        """A policy's tree checked against the tree invariants and this step's bounds; with a verifier that
        draws children (multi-draft sampling), the drawn tree."""
        names = self.c.names
        tree = built.tree
        who = f"drafter '{names['drafter']}' with expansion policy '{names['expansion']}'"
        validate_tree(tree, self.t.vocab_size, who)
        if tree.token_list[0] != ctx.root_token or tree.size - 1 > ctx.max_nodes or tree.max_depth > ctx.max_depth:
            raise InvalidTreeError(
                f"{who} produced a tree outside its bounds (root must be the last token, "
                f"≤ {ctx.max_nodes} nodes, depth ≤ {ctx.max_depth}; got {tree.size - 1} nodes, depth {tree.max_depth})"
            )
        self.check_scores(built.scores, tree.size)
        if not getattr(self.verifier, "draws_children", False):
            return built
        # children drawn from the draft's q in the policy's shape (multi-draft sampling): checked like any tree
        drawn = self._call(f"verifier '{self.verifier_name}'", self.verifier.draw, built, draft, self.sampler)
        validate_tree(drawn.tree, self.t.vocab_size, f"verifier '{self.verifier_name}'")
        self.check_scores(drawn.scores, drawn.tree.size)
        return drawn

    def predict_cost(self, n: int, past: int) -> float:
        name = self.c.names["cost_model"]
        predicted = self._call(f"cost model '{name}'", self.c.cost_model.predict, n, past)
        if not (isinstance(predicted, (int, float)) and math.isfinite(predicted) and predicted >= 0):
            raise PluginError(f"cost model '{name}' predicted {predicted!r} seconds (must be finite and >= 0)")
        return float(predicted)

    def step(self, session, context: list[int], remaining: int) -> list[int]:
        """One draft → expand → verify → commit step; returns the committed tokens."""
        c, names, learning, clock = self.c, self.c.names, self.learning, self.clock
        past = session.past
        max_nodes, max_depth = self.bounds(past, remaining)
        drafting = learning.begin_step()
        t0 = clock()
        draft = self.propose(context, max_depth) if drafting else EmptyDraft()
        t1 = clock()
        ctx = ExpansionContext(context[-1], past, max_nodes, max_depth, c.surrogate, c.cost_model,
                               learning.draft_seconds, learning.node_seconds)
        built = self.expand(draft, ctx)
        tree = built.tree
        lazy_s = draft.spent_seconds  # a draft model drafts depth by depth inside the policy's call
        predicted = self.predict_cost(tree.size, past)
        self._call(f"drafter '{names['drafter']}'", c.drafter.speculate, Verifying(built, ctx, c.expansion, predicted))
        t2 = clock()
        fwd = session.verify(tree)
        self.t.synchronize()  # so verify_s is the forward's time, not its launch time, on a GPU
        t3 = clock()
        path, committed = self.settle(session, built, fwd, remaining)
        self._call(f"cost model '{names['cost_model']}'", c.cost_model.observe, tree.size, past, t3 - t2)
        t4 = clock()
        record = StepRecord(
            tree_size=tree.size,
            accepted=len(path) - 1,
            tree_depth=tree.max_depth,
            committed=len(committed),
            context_len=past,
            draft_s=t1 - t0 + lazy_s,
            overhead_s=(t2 - t1 - lazy_s) + (t4 - t3),
            verify_s=t3 - t2,
            expected_accepted=sum(built.scores[1:]),
            predicted_verify_s=float(predicted),
            drafted=drafting,
            expand_draft_s=lazy_s,
            ahead_s=draft.ahead_seconds,
            ahead_wait_s=draft.ahead_wait_seconds,
            ahead_hit=draft.ahead_hit,
        )
        learning.end_step(record)
        self.stats.records.append(record)
        self.stats.steps += 1
        self.gen.observers.step_end(record, self.stats.steps - 1)
        return committed

    def settle(self, session, built, fwd, remaining: int) -> tuple[list[int], list[int]]:
        """After a verification: the verifier's verdict, the accepted path kept in the cache, the drafter and
        the surrogate told. Returns (accepted path, committed tokens: the path's tokens and the bonus, cut
        after an EOS or at ``remaining``)."""
        c, names, tree = self.c, self.c.names, built.tree
        path, bonus = self._call(f"verifier '{self.verifier_name}'", self.verifier.verify, tree, fwd.logits, self.sampler)
        session.keep(path, tree.size)
        tokens = tree.token_list
        committed = []
        for tok in [tokens[i] for i in path[1:]] + [bonus]:
            committed.append(tok)
            if tok in self.eos or len(committed) == remaining:
                break
        if self.top_logprobs is not None:  # token j of the step was predicted by the row of path node j
            self.step_logprobs = token_logprobs(fwd.logits, path, committed, self.top_logprobs)
            self.logprobs += self.step_logprobs
        feats = None if fwd.features is None else fwd.features[torch.tensor(path)]
        self._call(f"drafter '{names['drafter']}'", c.drafter.commit, [tokens[i] for i in path], feats)
        self._call(f"surrogate '{names['surrogate']}'", c.surrogate.observe, tree, path, built.scores)
        return path, committed


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
