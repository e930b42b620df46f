"""The five kinds of pluggable component and the data they exchange.

Every decision point of the decoding loop is one of these; plugins register factories for them (see
:mod:`specframe.hookspecs`). They are plain classes: the engine resolves each one once per run and then
calls their methods directly in the hot loop.

* :class:`Drafter` proposes a :class:`Draft` (a lazily expandable candidate tree) from the context.
* :class:`AcceptanceSurrogate` turns draft scores into acceptance probabilities P(v).
* :class:`CostModel` predicts the seconds of verifying n tree tokens at context length c.
* :class:`ExpansionPolicy` picks the :class:`~specframe.tree.Tree` to verify from the draft.
* :class:`Verifier` walks the verified tree against the target's logits and returns the accepted path.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from .tree import Tree


class Candidate(NamedTuple):
    """One proposed child: its token, the drafter's log-prob for it, and an opaque handle that
    :meth:`Draft.children` accepts to expand it further."""

    token: int
    logq: float
    handle: object
    source: int = 0
    rank: int = -1  # its place among its siblings, best first (set by the expansion policy; -1: not known)


class Draft:
    """A candidate tree that expansion policies explore lazily, best children first.

    Subclasses implement :meth:`children`. ``max_depth`` bounds how deep the draft goes.

    Most drafts know every node's children up front (prompt lookup, a block drafter's marginals). A draft
    model does not: a node's children cost a draft forward. Such a draft sets ``lazy = True`` and answers
    :meth:`expanded`, :meth:`expand` (the children of several nodes of one depth in ONE call) and
    :meth:`expansion_seconds` (what that call is predicted to cost), so a policy can weigh going deeper or
    wider against its price; :meth:`children` of a node not yet expanded expands it alone.
    ``spent_seconds`` is what the draft's expansions during the policy's call took (the engine books it
    as drafting time).
    """

    max_depth: int = 0
    ROOT: object = None
    lazy: bool = False
    spent_seconds: float = 0.0
    #: Drafting ahead (see :meth:`Drafter.speculate`): seconds the drafter's own thread worked for this draft
    #: while the target verified the previous tree, and of those how many the proposal waited for.
    ahead_seconds: float = 0.0
    ahead_wait_seconds: float = 0.0
    ahead_hit: bool = False  # this draft's root had been drafted ahead

    def children(self, handle: object, depth: int) -> list[Candidate]:
        """Children of the node at ``handle`` (which is at ``depth``), sorted by ``logq`` descending."""
        return []

    def expanded(self, handle: object) -> bool:
        """Whether the children of ``handle`` are known without further draft work."""
        return True

    def expand(self, handles: list, depth: int) -> None:
        """Work out the children of ``handles`` (nodes at ``depth``) together, in one draft call."""

    def expansion_seconds(self, count: int = 1) -> float:
        """Predicted seconds of one :meth:`expand` call over ``count`` nodes (0 for an eager draft)."""
        return 0.0

    def ahead_expansion_seconds(self, count: int = 1) -> float | None:
        """Predicted seconds of one :meth:`expand` call made ahead, while the target verifies (the draft's
        share of the cores); None when this draft is not drafted ahead."""
        return None

    def expected_child_logq(self, handle: object, depth: int) -> float:
        """The drafter's guess of the log-prob of the best child of an unexpanded ``handle`` (policies
        rank the expansion by it before paying for it)."""
        return 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if a candidate token is outside ``[0, vocab_size)`` or a log-prob is not finite."""

    def parts(self) -> list["Draft"]:
        """The drafts of each source that a composite draft merges, in source order (a trace records them
        one by one, so a replay can run the composite with any subset of its sources); ``[]`` otherwise."""
        return []


class EmptyDraft(Draft):
    """No guesses: the tree is the root alone (plain autoregressive decoding)."""


class MarginalDraft(Draft):
    """Per-position marginals of a block drafter: every node at depth d has the same ranked children,
    the top-K tokens of q_{d+1}.

    ``topk_tokens`` and ``topk_logq`` are ``(D, K)``; row d holds the candidates for depth d + 1.
    """

    ROOT = 0

    def __init__(self, topk_tokens: torch.Tensor, topk_logq: torch.Tensor, source: int = 0):
        order = topk_logq.argsort(dim=-1, descending=True)
        tokens = topk_tokens.gather(-1, order).tolist()
        logq = topk_logq.gather(-1, order).float().tolist()
        self.max_depth = len(tokens)
        self._rows = [
            [Candidate(int(t), float(q), d + 1, source) for t, q in zip(tokens[d], logq[d])]
            for d in range(self.max_depth)
        ]

    def children(self, handle: object, depth: int) -> list[Candidate]:
        return self._rows[depth] if depth < self.max_depth else []

    def validate(self, vocab_size: int) -> None:
        _check_candidates((c for row in self._rows for c in row), vocab_size)


class TrieDraft(Draft):
    """An explicit candidate tree (e.g. prompt-lookup continuations). Node 0 is the root; handles are
    node indices; ``logq[i]`` is the log-prob of node i given its parent."""

    ROOT = 0

    def __init__(self, tokens: list[int], parents: list[int], logq: list[float], source: int = 0):
        kids: list[list[Candidate]] = [[] for _ in tokens]
        depth = [0] * len(tokens)
        for i in range(1, len(tokens)):
            depth[i] = depth[parents[i]] + 1
            kids[parents[i]].append(Candidate(tokens[i], logq[i], i, source))
        for row in kids:
            row.sort(key=lambda c: -c.logq)
        self._kids = kids
        self.max_depth = max(depth, default=0)

    def children(self, handle: object, depth: int) -> list[Candidate]:
        return self._kids[handle]  # type: ignore[index]

    def validate(self, vocab_size: int) -> None:
        _check_candidates((c for row in self._kids for c in row), vocab_size)


def _check_candidates(cands, vocab_size: int) -> None:
    for c in cands:
        if not 0 <= c.token < vocab_size:
            raise ValueError(f"draft token {c.token} is outside the vocabulary [0, {vocab_size})")
        if not math.isfinite(c.logq):
            raise ValueError(f"draft log-probability {c.logq} for token {c.token} is not finite")


class Gating(Enum):
    """Who may skip draft work on a step, declared by drafters and expansion policies (``gating``).

    An expansion policy that sizes its tree by cost declares ``DRAFT``: the engine's
    :class:`~specframe.gate.DraftGate` then runs the drafter only while drafting pays for its time. A
    composite drafter that gates each of its sources itself declares ``SOURCES``; the engine's gate then
    leaves it alone, so one decision has one gate. ``NONE``: every step drafts."""

    NONE = "none"
    DRAFT = "draft"
    SOURCES = "sources"


class Drafter:
    """Proposes drafts. One instance serves one run; :meth:`start` begins each request.

    ``feature_layers`` names target decoder layers whose hidden states the drafter reads; the engine then
    passes their features for every token that enters the target's cache.
    """

    name = "drafter"
    feature_layers: tuple[int, ...] = ()
    max_depth: int = 8
    #: Whether the log-probs of its candidates are a real distribution (a model's softmax) that children can
    #: be drawn from at temperature > 0 (a verifier that draws children, ``multi-draft``, needs one); prompt
    #: lookup's scores are not.
    sampling_q: bool = False
    #: ``Gating.SOURCES`` when the drafter itself decides per step which of its sources to run.
    gating: Gating = Gating.NONE
    #: A composite drafter's draft seconds per source in its last proposal (0 for a skipped one); else None.
    source_seconds: list[float] | None = None

    def start(self, prompt_ids: list[int], features: torch.Tensor | None) -> None:
        """A new request: ``prompt_ids`` are all prompt tokens; ``features`` those of all but the last."""

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        """A draft continuing ``context_ids`` (committed tokens, root last), at most ``max_depth`` deep."""
        raise NotImplementedError

    def commit(self, tokens: list[int], features: torch.Tensor | None) -> None:
        """``tokens`` (root and accepted nodes) entered the target cache, with their ``features``."""

    def speculate(self, verifying: "Verifying") -> None:
        """The target starts verifying ``verifying.tree`` now. A drafter may draft ahead on a thread of its
        own for the likely outcomes, and use what matches in the next :meth:`propose` (which must then give
        exactly the draft it would have given without drafting ahead, whatever the timing). Default: nothing."""

    def finish(self) -> None:
        """The request ended (done, stopped early or failed): stop and join any work of the drafter's own
        thread. Must not raise."""

    def fork(self) -> "Drafter":
        """A drafter for another request drafted alongside this one (continuous batching in ``specframe
        serve``): it shares what is read-only (weights, settings, what it learned), and owns its own
        per-request state. Default: a shallow copy, which is right for a drafter whose :meth:`start` rebinds
        every per-request attribute; a drafter with other per-request state (an index, a cache, a thread)
        overrides it."""
        return copy.copy(self)


class AcceptanceSurrogate:
    """Maps draft scores to the probability that the target accepts a node."""

    name = "surrogate"

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        """P(child) given P(parent) and the child candidate at ``depth`` (the child's depth)."""
        raise NotImplementedError

    def observe(self, tree: Tree, accepted: list[int], scores: list[float]) -> None:
        """Learn from one verification: ``accepted`` node indices, ``scores`` the P(v) used."""


class CostModel:
    """Predicts verification latency in seconds."""

    name = "cost-model"
    #: The n from which the predicted cost is convex in n (C(n+1) − C(n) never decreases), or None when
    #: unknown (a measured table can have bumps). Expansion policies that stop at the first n where one
    #: more node stops paying can trust that stop from here on instead of looking further.
    convex_from: int | None = None

    def predict(self, n: int, context: int) -> float:
        """Seconds to verify ``n`` tree tokens on top of ``context`` cached tokens."""
        raise NotImplementedError

    def observe(self, n: int, context: int, seconds: float) -> None:
        """A measured verification."""

    def calibrate(self, measure, context: int) -> None:
        """Optional start-up calibration, called once per generator before the first step:
        ``measure(n) -> seconds`` times a real verification of n tokens at ``context``."""


@dataclass
class ExpansionContext:
    """What an expansion policy may use to size the tree this step."""

    root_token: int
    context_len: int  # tokens in the target's cache (excluding the root)
    max_nodes: int  # hard bound on non-root nodes
    max_depth: int  # hard bound on depth
    surrogate: AcceptanceSurrogate
    cost_model: CostModel
    draft_seconds: float = 0.0  # predicted seconds of a drafted step besides the forward that do not grow with the tree
    node_seconds: float = 0.0  # predicted host seconds per tree node (building, verifying and keeping it)
    # in a batch (continuous batching): the context the cost model prices the whole call at, from the backend's
    # batch room (llama.cpp's unified KV view: every request's cells; transformers: the longest padded prefix)
    batch_context: int | None = None

    def score(self, parent_p: float, depth: int, cand: Candidate) -> float:
        """The surrogate's P(child), checked to lie in [0, 1] (a broken surrogate is named, not hidden)."""
        p = self.surrogate.score(parent_p, depth, cand)
        if not 0.0 <= p <= 1.0:  # NaN fails too
            from .errors import PluginError

            raise PluginError(f"surrogate '{component_name(self.surrogate)}' gave acceptance probability {p!r}; it must be in [0, 1]")
        return p


class ExpansionPolicy:
    """Turns a :class:`Draft` into the :class:`Tree` to verify."""

    name = "expansion"
    #: ``Gating.DRAFT`` lets the engine skip drafting on steps where, measured, drafting has not been
    #: paying (a :class:`~specframe.gate.DraftGate`); the tree is then the root alone. Fixed budgets keep NONE.
    gating: Gating = Gating.NONE

    def expand(self, draft: Draft, ctx: ExpansionContext) -> "BuiltTree":
        raise NotImplementedError


@dataclass
class BuiltTree:
    """A tree plus the surrogate scores P(v) the policy used for each node (root: 1.0)."""

    tree: Tree
    scores: list[float]


@dataclass
class Verifying:
    """What the engine hands :meth:`Drafter.speculate` as the target starts verifying a tree."""

    built: BuiltTree  # the tree and the P(v) of each node
    ctx: ExpansionContext  # the step's context (bounds, surrogate, cost model, D)
    policy: ExpansionPolicy  # the policy that built the tree (a drafter may run it on a predicted next root)
    seconds: float  # the cost model's predicted verification time: what drafting ahead can hide

    @property
    def tree(self) -> Tree:
        return self.built.tree


class TreeBuilder:
    """Accumulates nodes in topological order; used by expansion policies."""

    def __init__(self, root_token: int):
        self.tokens = [root_token]
        self.parents = [-1]
        self.logq = [0.0]
        self.source = [0]
        self.scores = [1.0]

    def __len__(self) -> int:
        """Nodes so far, the root included."""
        return len(self.tokens)

    @property
    def drafted(self) -> int:
        """Non-root nodes so far (what ``ExpansionContext.max_nodes`` bounds)."""
        return len(self.tokens) - 1

    def add(self, parent: int, cand: Candidate, score: float) -> int:
        self.tokens.append(cand.token)
        self.parents.append(parent)
        self.logq.append(cand.logq)
        self.source.append(cand.source)
        self.scores.append(score)
        return len(self.tokens) - 1

    def build(self) -> BuiltTree:
        return BuiltTree(Tree.from_lists(self.tokens, self.parents, self.logq, self.source), self.scores)


def component_name(obj: object) -> str:
    """A component's ``name`` if its class sets one, else its class name."""
    own = obj.__dict__.get("name") if hasattr(obj, "__dict__") else None
    if own:
        return str(own)
    for klass in type(obj).__mro__:
        if "name" in klass.__dict__ and klass.__module__ != __name__:
            return str(klass.__dict__["name"])
    return type(obj).__name__


class Verdict(NamedTuple):
    path: list[int]  # accepted node indices, root first
    bonus: int  # the target's own token after the last accepted node


class Verifier:
    """Decides which path of a verified tree the target accepts. Must be exactly lossless."""

    name = "verifier"
    #: True when the verifier draws the tree's children from the draft's distribution (:meth:`draw`); the
    #: engine then refuses a drafter whose ``sampling_q`` is False.
    draws_children: bool = False

    def draw(self, built: BuiltTree, draft: Draft, rng: "Sampler") -> BuiltTree:
        """The tree to verify, given the one the expansion policy built from ``draft``. A verifier that
        verifies children *sampled* from the draft (SpecInfer's multi-draft sampling) keeps the policy's
        shape and draws each node's children with ``rng``, recording what they were drawn from in
        :attr:`Tree.proposals`. Default: the policy's tree as it is."""
        return built

    def verify(self, tree: Tree, logits: torch.Tensor, rng: "Sampler") -> Verdict:
        """``logits`` is ``(n, V)``: row i is the target's next-token logits after node i."""
        raise NotImplementedError


class Sampler:
    """The only source of randomness verifiers use (tests replace it to enumerate outcomes)."""

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # fresh entropy for this generator only; torch's global RNG is untouched
        else:
            self.generator.manual_seed(seed)

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 means greedy. ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        from .errors import SpecframeError

        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SpecframeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecframeError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpecframeError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution plain sampling draws from: temperature, then top-k, then top-p. ``(..., V)``."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class TokenLogprob(NamedTuple):
    """A committed token's log-probability under the target (its own distribution: before temperature,
    top-k and top-p, as plain decoding computes it) and the ``top`` most likely tokens there, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], top: int) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``tokens[j]`` read from row ``rows[j]`` of a verification's ``logits`` (the row of
    the node before it): the target's log-softmax there, and its ``top`` best tokens (0: none)."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits[torch.tensor(rows[: len(tokens)])].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    if top:
        values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        best = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        best = [()] * len(tokens)
    return [TokenLogprob(t, c, b) for t, c, b in zip(tokens, chosen, best)]


@dataclass
class StepRecord:
    """What happened in one draft→verify→commit step."""

    tree_size: int  # nodes verified, root included
    accepted: int  # draft tokens accepted (bonus excluded)
    committed: int  # tokens actually committed this step (after EOS / max_new_tokens truncation)
    context_len: int
    draft_s: float
    overhead_s: float
    verify_s: float
    tree_depth: int = 0  # depth of the deepest node
    expected_accepted: float = 0.0  # sum of P(v) over non-root nodes, as the surrogate predicted
    predicted_verify_s: float = 0.0  # the cost model's prediction for this tree
    drafted: bool = True  # False when the draft gate skipped the drafter this step
    expand_draft_s: float = 0.0  # of draft_s: what a lazy draft's expansions took inside the policy's call
    ahead_s: float = 0.0  # drafting for this step done on the drafter's thread during the last verification
    ahead_wait_s: float = 0.0  # of draft_s: the proposal waiting for that thread (the part of ahead_s not hidden)
    ahead_hit: bool = False  # the step's root had been drafted ahead (the prediction held)
    batch: int = 1  # requests verified in the same target call (continuous batching; verify_s is that call's)

    @property
    def hidden_draft_s(self) -> float:
        """Draft seconds hidden behind the previous verification."""
        return max(self.ahead_s - self.ahead_wait_s, 0.0)


@dataclass
class RunStats:
    """Summary of one generation. ``tau`` is the mean acceptance length including the bonus token."""

    new_tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    records: list[StepRecord] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return sum(r.accepted + 1 for r in self.records) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        decode = self.wall_s - self.prefill_s
        return self.new_tokens / decode if decode > 0 else 0.0

    @property
    def mean_tree_size(self) -> float:
        return sum(r.tree_size for r in self.records) / self.steps if self.steps else 0.0

    def summary(self) -> dict:
        total = lambda key: sum(getattr(r, key) for r in self.records)  # noqa: E731
        return {
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "tau": round(self.tau, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "mean_tree_size": round(self.mean_tree_size, 3),
            "wall_s": round(self.wall_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "draft_s": round(total("draft_s"), 4),
            "overhead_s": round(total("overhead_s"), 4),
            "verify_s": round(total("verify_s"), 4),
            "drafted_steps": sum(r.drafted for r in self.records),
            "hidden_draft_s": round(total("hidden_draft_s"), 4),
        }
