"""Built-in drafter ``model``: a second causal LM drafts trees for the target (classic speculative decoding's
draft model, grown into trees).

``--drafter model:SPEC`` loads the draft ``SPEC`` through the same backend seam as a target: on
``--set drafter.backend=NAME`` (``hf``, ``llama.cpp``, any registered backend; default ``auto``, chosen as
for a target and said in one line). ``--drafter model`` alone drafts with a cheaper copy of the target
where one is known: for the embedded SmolLM2-135M-Instruct on transformers, its own 4-bit GGUF on llama.cpp.

* **One session, kept in step.** The draft keeps its own KV cache across steps and requests. Before each
  proposal it is brought in line with the committed context: the accepted part of its last tree stays
  (``keep``), the rest of that tree leaves (``rollback``), a context that went elsewhere (a new request,
  an EOS, a generation that stopped early) is cut back to the common prefix (``truncate``), and only the
  tokens the draft has not seen are prefilled. A step costs the new tokens only.
* **Trees depth by depth.** The draft's tree grows one depth per draft call: the frontier nodes worth
  expanding are verified by the draft session as a tree on top of what it has (``grow``), and each gets
  its ``top_k`` children with their log-probs. The draft is lazy (:class:`ModelDraft`): the policy asks
  for children, prices each call with :meth:`ModelDraft.expansion_seconds` (measured on this machine),
  and decides how deep and how wide to go — BASTION by its stopping rule, ``chain`` one node per depth,
  ``best-first:N`` within N nodes.
* **Other tokenizers.** A draft whose vocabulary is not the target's drafts through text
  (:mod:`specframe.plugins.token_bridge`). The verifier never reads q, so the output stays exact.
"""

from __future__ import annotations

import logging
import copy
from copy import deepcopy
from dataclasses import replace

import numpy as np
import torch

from specframe import hookimpl
from specframe.backends import AUTO, load_target
from specframe.clock import real_clock
from specframe.components import Candidate, Draft, Drafter, EmptyDraft, Verifying
from specframe.errors import SpecframeError
from specframe.overlap import AheadThread, CoreSplit, FrozenCost
from specframe.plugins.surrogates import Calibrated
from specframe.tree import Tree, common_prefix

log = logging.getLogger("specframe")
WINDOW = 64  # draft calls the per-call cost fit remembers
MAX_ROWS = 240  # rows of one draft tree in the draft session (llama.cpp: a sequence per row, 256 at most)
CONTINUE_ROWS = 160  # a tree drafted ahead keeps growing across steps while it holds at most this many rows


class CallCosts:
    """Seconds of one draft call over k nodes: a + b·k through the median time of each k seen in the last
    :data:`WINDOW` calls (medians: one call stalled by another process does not move the line)."""

    def __init__(self):
        self.calls: list[tuple[int, float]] = []
        self.a, self.b = 0.0, 0.0

    def observe(self, k: int, seconds: float) -> None:
        self.calls = self.calls[-WINDOW + 1:] + [(k, max(seconds, 0.0))]
        by_k: dict[int, list[float]] = {}
        for n, t in self.calls:
            by_k.setdefault(n, []).append(t)
        ks = np.array(sorted(by_k), dtype=float)
        ts = np.array([np.median(by_k[n]) for n in sorted(by_k)])
        weights = np.sqrt([len(by_k[n]) for n in sorted(by_k)])
        if len(ks) > 1:
            b, a = np.polyfit(ks, ts, 1, w=weights)
            self.a, self.b = max(float(a), 0.0), max(float(b), 0.0)
        else:
            self.a, self.b = 0.0, float(ts[0] / ks[0])

    def predict(self, k: int) -> float:
        return self.a + self.b * k if k > 0 else 0.0


class Nodes:
    """The draft's tree in its own token space: every node drafted since the draft cache was last brought
    in line with the committed context (node 0, its root, is the first uncommitted token). ``rows`` lists
    the nodes the draft session holds (forwarded, so their children are known), in its cache order."""

    def __init__(self, root: int):
        self.token, self.parent, self.depth, self.logq = [root], [-1], [0], [0.0]
        self.kids: list[list[Candidate] | None] = [None]
        self.row: list[int | None] = [None]
        self.rows: list[int] = []

    def add(self, parent: int, token: int, logq: float) -> int:
        self.token.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.logq.append(logq)
        self.kids.append(None)
        self.row.append(None)
        return len(self.token) - 1

    def child(self, node: int, token: int) -> int | None:
        return next((c.handle for c in self.kids[node] or () if c.token == token), None)


class Budget:
    """What a look-ahead job may spend: draft calls while their predicted seconds (the costs as they were when
    the job began, so its extent does not depend on how fast it runs) fit in ``seconds``."""

    def __init__(self, seconds: float, costs: "CallCosts", cancelled=None):
        self.left, self.a, self.b, self.cancelled = seconds, costs.a, costs.b, cancelled

    def take(self, k: int) -> bool:
        cost = self.a + self.b * k
        if (self.cancelled is not None and self.cancelled.is_set()) or cost > self.left:
            self.left = -1.0  # spent: later calls are refused too, so the job's extent is one prefix of its plan
            return False
        self.left -= cost
        return True


class ModelDraft(Draft):
    """One step's draft: the subtree of :class:`Nodes` below ``root`` (node 0 on a fresh tree; a node drafted
    ahead when the step's root was predicted), at most ``max_depth`` below it, grown lazily. Handles are node
    ids. A look-ahead view has a ``budget``: past it, unexpanded nodes stay leaves.

    A view shows exactly what drafting serially would have shown: a node whose children were drafted ahead
    counts as expanded only once this view asks for it (then at no cost), so a policy decides the same things
    in the same order whether or not the look-ahead ran — drafting ahead changes the time only."""

    lazy = True

    def __init__(self, drafter: "ModelDrafter", nodes: Nodes, root: int, max_depth: int, budget: Budget | None = None):
        self.drafter, self.nodes, self.ROOT, self.max_depth, self.budget = drafter, nodes, root, max_depth, budget
        self.base = nodes.depth[root]
        self.spent_seconds = 0.0
        self.seen: set[int] = set()  # nodes whose children this view has asked for (drafted now or ahead)

    # the store's lists, for code that walks the tree (the token bridge, tests)
    token = property(lambda self: self.nodes.token)
    parent = property(lambda self: self.nodes.parent)
    depth = property(lambda self: self.nodes.depth)
    kids = property(lambda self: self.nodes.kids)
    row = property(lambda self: self.nodes.row)
    rows = property(lambda self: self.nodes.rows)

    def _deep(self, handle) -> bool:
        return self.nodes.depth[handle] - self.base >= self.max_depth

    def expanded(self, handle) -> bool:
        return handle in self.seen or self._deep(handle) or (self.budget is not None and self.budget.left < 0)

    def children(self, handle, depth: int) -> list[Candidate]:
        if self._deep(handle):
            return []
        if handle not in self.seen:
            self.expand([handle], depth)
        return self.nodes.kids[handle] or []

    def expand(self, handles: list, depth: int) -> None:
        nodes = self.nodes
        todo = [h for h in dict.fromkeys(handles) if h not in self.seen and not self._deep(h)]
        missing = [h for h in todo if nodes.kids[h] is None][: max(MAX_ROWS - len(nodes.rows), 0)]
        if missing and (self.budget is None or self.budget.take(len(missing))):
            self.drafter.forward(self, missing)
        for h in todo:
            if nodes.kids[h] is not None:
                self.seen.add(h)
                if self.budget is None and nodes.kids[h]:  # what a policy learns of the draft: as if drafted now
                    self.drafter.top_logq = 0.9 * self.drafter.top_logq + 0.1 * nodes.kids[h][0].logq

    def expansion_seconds(self, count: int = 1) -> float:
        return self.drafter.costs.predict(count)

    def ahead_expansion_seconds(self, count: int = 1) -> float | None:
        d = self.drafter
        return d.ahead_costs.predict(count) if d.overlap and d.ahead_costs.calls else None

    def expected_child_logq(self, handle, depth: int) -> float:
        return self.drafter.top_logq

    def path(self, handle) -> list[int]:
        """Draft tokens from below the root to ``handle``."""
        out = []
        while handle != self.ROOT and handle > 0:
            out.append(self.nodes.token[handle])
            handle = self.nodes.parent[handle]
        return out[::-1]

    def validate(self, vocab_size: int) -> None:
        for row in self.nodes.kids:
            for c in row or ():
                if not 0 <= c.token < vocab_size:
                    raise ValueError(f"draft token {c.token} is outside the vocabulary [0, {vocab_size})")


class ModelDrafter(Drafter):
    """Drafts with a second model (see the module's description). Parameters: ``path`` (the draft model
    spec; default: a known cheaper copy of the target), ``backend`` (the draft's runtime, ``auto`` as for
    targets), ``top_k`` (children per expanded node), ``max_depth`` (the deepest a draft may go),
    ``options`` (the draft backend's options, e.g. ``{"threads": 2}``); in Python, ``model`` takes a draft
    already loaded (any object a backend's ``load`` returns).

    Drafting while the target verifies (``overlap=true``): as the target starts verifying a tree, the draft
    runs the step's expansion policy, on a thread of its own, on the ``branches`` likeliest outcomes of that
    verification (the end of the accepted path by P(v), the next root being the draft's best child there that
    is not in the tree), within the verification's predicted time. The next proposal waits for that thread
    and, when the committed context landed on a node drafted ahead, starts from it: its drafting is then
    already done. While they overlap, the target and the draft get ``draft_threads`` and the rest of the
    cores. ``ahead_timeout``: seconds after which a look-ahead that does not finish ends the generation.
    ``overlap`` defaults to false here and to true for ``model-ahead``."""

    name = "model"
    OVERLAP = False  # ``overlap``'s default
    sampling_q = True  # the candidates' log-probs are the draft model's softmax

    def __init__(self, target, registry=None, clock=real_clock, path: str | None = None, backend: str = AUTO,
                 top_k: int = 4, max_depth: int = 32, options: dict | None = None, model=None,
                 overlap: bool | None = None, branches: int = 1, draft_threads: int = 1, ahead_timeout: float = 60.0):
        if not isinstance(top_k, int) or top_k <= 0 or not isinstance(max_depth, int) or max_depth <= 0:
            raise SpecframeError(f"drafter 'model': top_k and max_depth must be positive integers, got {top_k}, {max_depth}")
        if not isinstance(branches, int) or branches <= 0 or not isinstance(draft_threads, int) or draft_threads <= 0:
            raise SpecframeError(f"drafter 'model': branches and draft_threads must be positive integers, "
                                 f"got {branches}, {draft_threads}")
        if not (isinstance(ahead_timeout, (int, float)) and ahead_timeout > 0):
            raise SpecframeError(f"drafter 'model': ahead_timeout must be a positive number of seconds, got {ahead_timeout!r}")
        self.target, self.clock = target, clock
        self.top_k, self.max_depth = top_k, max_depth
        if model is not None:  # a draft already loaded (Python API, tests)
            self.draft, why = model, ""
        else:
            spec, why = (path, "") if path else default_draft(target, self.name)
            self.draft = load_draft(spec, backend, target, registry, options)
        self.note = "; ".join(x for x in (why, getattr(self.draft, "backend_note", "")) if x)
        self.auto_note = getattr(self.draft, "backend_note", "")  # what auto chose for the draft, for one CLI line
        self.bridge = None
        if not same_vocabulary(target, self.draft):
            from specframe.plugins.token_bridge import TokenBridge

            self.bridge = TokenBridge(target, self.draft)
        check_context(target, self.draft)
        self.overlap, self.branches = bool(self.OVERLAP if overlap is None else overlap), branches
        if self.overlap and self.bridge is not None:
            raise SpecframeError("drafter 'model': overlap=true needs a draft with the target's tokenizer (this one "
                                 "drafts through text); draft serially with overlap=false")
        self.session = self.draft.start(())  # one draft session for every request: a shared prefix stays
        self.grows = hasattr(self.session, "grow")  # a session that cannot grow re-verifies the tree per depth
        self.cached: list[int] = []  # draft tokens committed in the draft session
        self.nodes: Nodes | None = None  # the tree drafted since the last sync, whose rows are in the session
        self.current: ModelDraft | None = None  # this step's proposal, until the target verifies it
        self.costs = CallCosts()  # draft calls made on the caller's thread (what a policy pays for)
        self.ahead_costs = CallCosts()  # draft calls made drafting ahead (with the draft's share of the cores)
        self.top_logq = float(np.log(0.8))  # running mean of an expansion's best child log-prob
        self.ahead = AheadThread("drafter 'model'", ahead_timeout, clock)
        self.split = CoreSplit(target, self.draft, draft_threads)
        self.fresh = True  # the next proposal starts a fresh tree (a new request)
        self.judge = Calibrated()  # where verifications end, learned from this drafter's own trees
        self.predicted: tuple[Tree, list[float]] | None = None  # the tree being verified and its P(v)

    def describe(self) -> str:
        how = "through text (other tokenizer)" if self.bridge else "same tokenizer"
        if not self.grows:
            how += "; its backend cannot grow a tree, so each depth re-verifies the whole tree"
        if self.overlap:
            share = self.split.want
            how += (f"; drafts ahead while the target verifies ({self.branches} outcome(s), {share['target']} target / "
                    f"{share['draft']} draft thread(s) meanwhile")
            how += f"; cannot set threads of {', '.join(self.split.missing)})" if self.split.missing else ")"
        return (f"model:{self.draft.name} on {getattr(self.draft, 'backend', '?')} ({how}; top_k {self.top_k}, "
                f"max_depth {self.max_depth})" + (f" — {self.note}" if self.note else ""))

    # ------------------------------------------------------------------ requests and steps
    def start(self, prompt_ids: list[int], features) -> None:
        """A new request: the draft reads the prompt now (prefill time, not drafting time), keeping the
        prefix it shares with what it held."""
        self.finish()
        ids = self.bridge.draft_context(prompt_ids) if self.bridge else list(prompt_ids)
        if 1 < len(ids) <= self._room():
            self._sync(ids[:-1])

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        running, waited_from = self.ahead.running, self.clock()
        ahead_s = self.ahead.wait()  # the look-ahead drafting started as the target began verifying
        waited = self.clock() - waited_from if running else 0.0
        self.split.leave()
        ids = self.bridge.draft_context(context_ids) if self.bridge else list(context_ids)
        if not ids:
            return EmptyDraft()
        depth = min(max_depth, self.max_depth, self._room() - len(ids))
        if depth <= 0:  # the draft's context is full: the target goes on alone
            return EmptyDraft()
        node = self._drafted_ahead(ids) if self.overlap and not self.fresh else None
        self.fresh = False
        if node is None:
            self._sync(ids[:-1])
            self.nodes = Nodes(ids[-1])
            node = 0
        draft = ModelDraft(self, self.nodes, node, depth)
        draft.expand([node], 0)  # the root's children (drafted ahead, or now: part of the proposal's own time)
        draft.spent_seconds = 0.0
        draft.ahead_seconds, draft.ahead_wait_seconds = ahead_s, min(waited, ahead_s)
        draft.ahead_hit = node != 0
        self.current = draft
        return self.bridge.wrap(draft, context_ids, ids) if self.bridge else draft

    def commit(self, tokens: list[int], features) -> None:
        """The next proposal keeps what of this tree the target accepted (``_sync``); drafting ahead, the
        outcome also teaches the drafter's own acceptance model, which predicts where the next one ends."""
        if self.predicted is not None:
            tree, scores = self.predicted
            self.predicted = None
            path, parents, toks = [0], tree.parent_list, tree.token_list
            for tok in tokens[1:]:
                nxt = next((i for i in range(path[-1] + 1, tree.size) if parents[i] == path[-1] and toks[i] == tok), None)
                if nxt is None:
                    break
                path.append(nxt)
            self.judge.observe(tree, path, scores)

    def speculate(self, verifying: Verifying) -> None:
        """Draft ahead for the likeliest outcomes of the verification starting now (``overlap=true`` only)."""
        draft, self.current = self.current, None
        if not self.overlap or draft is None or draft.nodes is not self.nodes:
            return
        handles = _handles(draft, verifying.tree)
        if handles is None:  # not this proposal's tree (a policy that built its own): nothing to predict
            return
        scores = self._judge_scores(verifying.tree)  # the drafter's own calibrated P(v), whatever the policy's surrogate
        self.predicted = (verifying.tree, scores)
        outcomes = likeliest_outcomes(verifying.tree, scores, handles)
        live = verifying.ctx  # the job must not read what the step goes on updating: a copy, and frozen costs
        ctx = replace(live, surrogate=deepcopy(live.surrogate),
                      cost_model=FrozenCost(live.cost_model, live.context_len,
                                                min(live.max_nodes, 2 * verifying.tree.size + 16) + 1))
        budget = Budget(verifying.seconds, self.ahead_costs)
        policy, nodes, depth = verifying.policy, self.nodes, draft.max_depth

        def job(cancelled):
            budget.cancelled = cancelled
            self._draft_ahead(nodes, outcomes, ctx, policy, depth, budget)

        self.split.enter()
        self.ahead.start(job)

    def fork(self) -> "ModelDrafter":
        """The same draft model (weights loaded once) with a draft session of its own for another request.
        A fork drafts serially: drafting ahead moves the cores between target and draft, which requests
        drafted side by side would fight over."""
        twin = copy.copy(self)
        twin.session = self.draft.start(())
        twin.cached, twin.nodes, twin.current, twin.predicted, twin.fresh = [], None, None, None, True
        twin.overlap = False
        twin.ahead = AheadThread("drafter 'model'", self.ahead.timeout, self.clock)
        return twin

    def finish(self) -> None:
        """The request is over: stop drafting ahead; the next request starts from a fresh tree."""
        self.ahead.cancel()
        self.split.leave()
        self.current, self.fresh = None, True

    # ------------------------------------------------------------------ drafting ahead
    def _judge_scores(self, tree: Tree) -> list[float]:
        """P(v) of every node of ``tree`` by the drafter's acceptance model (calibrated on its own verified trees)."""
        parents, depths, logq, toks = tree.parent_list, tree.depth_list, tree.logq_list, tree.token_list
        best: dict[int, int] = {}
        for i in range(1, tree.size):
            if parents[i] not in best or logq[i] > logq[best[parents[i]]]:
                best[parents[i]] = i
        p = [1.0] * tree.size
        for i in range(1, tree.size):
            first = 0 if best[parents[i]] == i else 1
            p[i] = self.judge.score(p[parents[i]], depths[i], Candidate(toks[i], logq[i], None, 0, first))
        return p

    def _draft_ahead(self, nodes: Nodes, outcomes, ctx, policy, depth: int, budget: Budget) -> None:
        """The look-ahead job: for the ``branches`` likeliest outcomes (end node v, tokens the tree gave v) that
        leave a candidate, the next root is v's best child outside the tree; the policy then expands below it
        as it would next step."""
        todo = self.branches
        for v, taken in outcomes:
            if todo == 0 or budget.left < 0:
                break
            ModelDraft(self, nodes, v, depth, budget).expand([v], 0)
            nxt = next((c.handle for c in nodes.kids[v] or () if c.token not in taken), None)
            if nxt is None:
                continue  # every candidate after v is in the tree: the bonus there is none the draft offers
            todo -= 1
            view = ModelDraft(self, nodes, nxt, depth, budget)
            policy.expand(view, replace(ctx, root_token=nodes.token[nxt],
                                        context_len=ctx.context_len + nodes.depth[nxt] - nodes.depth[0]))

    def _drafted_ahead(self, ids: list[int]) -> int | None:
        """The node of the current tree whose path is the context's tail and whose children were drafted
        (ahead), if there is one and the tree is still small enough to grow; else None."""
        if self.nodes is None or len(self.nodes.rows) > CONTINUE_ROWS:
            return None
        path = self._walk(ids)
        if path is None or len(path) != len(ids) - len(self.cached):  # the context leaves the tree
            return None
        node = path[-1]
        return node if node and self.nodes.kids[node] is not None else None

    def _walk(self, ids: list[int]) -> list[int] | None:
        """The nodes of the current tree along ``ids`` past the committed draft tokens, root first, as far as
        they match; None when ``ids`` does not continue the committed tokens into this tree."""
        tree, n = self.nodes, len(self.cached)
        if len(ids) <= n or ids[n] != tree.token[0] or ids[:n] != self.cached:
            return None
        path = [0]
        for tok in ids[n + 1:]:
            nxt = tree.child(path[-1], tok)
            if nxt is None:
                break
            path.append(nxt)
        return path

    # ------------------------------------------------------------------ the draft session
    def _room(self) -> int:
        d = self.draft
        window = getattr(d, "sliding_window", None)
        return min(d.max_context, window - 1 if window else d.max_context) - 1

    def _sync(self, want: list[int]) -> None:
        """Bring the draft cache to exactly ``want`` (the draft context but its root)."""
        s, tree = self.session, self.nodes
        if tree is not None and tree.rows:
            path = self._walk(want)
            if path is not None:
                path = [h for h in path if tree.row[h] is not None]  # a node without a row has no children: last
                s.keep([tree.row[h] for h in path], len(tree.rows))
                self.cached += [tree.token[h] for h in path]
            else:
                s.rollback(len(tree.rows))
        self.nodes = None
        same = common_prefix(self.cached, want)
        if same < len(self.cached):
            s.truncate(same)
            del self.cached[same:]
        if len(want) > same:
            s.prefill(want[same:])
            self.cached += want[same:]

    def forward(self, draft: ModelDraft, todo: list[int]) -> None:
        """One draft call: the draft session verifies ``todo`` (frontier nodes of one depth) on top of the
        tree rows it holds, and each gets its ``top_k`` children."""
        start_s = self.clock()
        nodes = draft.nodes
        start = len(nodes.rows)
        order = nodes.rows + todo
        row = {h: i for i, h in enumerate(order)}
        parents = [-1 if nodes.parent[h] < 0 else row[nodes.parent[h]] for h in order]
        tree = Tree.from_lists([nodes.token[h] for h in order], parents)
        if self.grows:
            logits = self.session.grow(tree, start).logits
        else:  # a backend without grow(): verify the whole tree again
            if start:
                self.session.rollback(start)
            logits = self.session.verify(tree).logits[start:]
        for h in todo:  # in the session now
            nodes.row[h] = len(nodes.rows)
            nodes.rows.append(h)
        self.draft.synchronize()
        logits = logits.float()
        vocab = self.target.vocab_size if self.bridge is None else logits.shape[-1]
        if logits.shape[-1] > vocab:  # padding rows of a larger draft vocabulary are never proposed
            logits = logits[:, :vocab]
        logp = torch.log_softmax(logits, dim=-1)
        top = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
        for h, vals, toks in zip(todo, values, indices):
            nodes.kids[h] = [Candidate(t, q, nodes.add(h, t, q)) for t, q in zip(toks, vals) if q > float("-inf")]
        seconds = self.clock() - start_s
        draft.spent_seconds += seconds
        (self.costs if draft.budget is None else self.ahead_costs).observe(len(todo), seconds)


def _handles(draft: ModelDraft, tree: Tree) -> list[int] | None:
    """The draft node of each node of ``tree`` (built from ``draft``), or None if the tree is not made of it."""
    nodes, tokens, parents = draft.nodes, tree.token_list, tree.parent_list
    if tokens[0] != nodes.token[draft.ROOT]:
        return None
    out = [draft.ROOT]
    for i in range(1, len(tokens)):
        h = nodes.child(out[parents[i]], tokens[i])
        if h is None:
            return None
        out.append(h)
    return out


def likeliest_outcomes(tree: Tree, scores: list[float], handles: list[int]) -> list[tuple[int, set[int]]]:
    """The ends of the accepted path, likeliest first, as (draft node, tokens of its children in the tree):
    P(the path ends at v) = P(v) − Σ P(c) over v's children c in the tree (the bonus token after v is then
    none of those children)."""
    parents, tokens = tree.parent_list, tree.token_list
    kids: list[list[int]] = [[] for _ in tokens]
    for i in range(1, len(tokens)):
        kids[parents[i]].append(i)
    end = [scores[i] - sum(scores[c] for c in kids[i]) for i in range(len(tokens))]
    order = sorted(range(len(tokens)), key=lambda i: (-end[i], i))
    return [(handles[i], {tokens[c] for c in kids[i]}) for i in order]


# ---------------------------------------------------------------------- loading and checks
def default_draft(target, name: str = "model") -> tuple[str, str]:
    """The draft ``--drafter model`` uses without a spec, and why: a known cheaper copy of the target."""
    alias = getattr(target, "model_alias", None)
    if alias and getattr(target, "backend", "") != "llama.cpp":
        return alias, (f"the draft is the target's own 4-bit GGUF ({alias}), the cheapest copy of its weights")
    raise SpecframeError(f"drafter '{name}' needs a draft model for target '{target.name}': --drafter {name}:SPEC "
                         f"(a smaller model of the same family, a .gguf file, a model directory or hub id)")


def load_draft(spec: str, backend: str, target, registry, options: dict | None):
    """The draft model on its backend (``auto``: as for a target), with the options a draft runs with there
    (``draft_options`` of the backend's loader, e.g. llama.cpp's fast mode that grows trees)."""
    from specframe.backends import choose_backend
    from specframe.registry import Registry

    registry = registry or Registry()
    device = str(getattr(target, "device", "cpu"))
    name, why = (backend, "") if backend not in (None, AUTO) else choose_backend(spec, device, registry)
    if name not in registry.names("backend"):
        known = ", ".join(registry.names("backend"))
        raise SpecframeError(f"drafter 'model': unknown draft backend '{name}'; installed backends: {known}")
    load = registry.get("backend", name).factory
    opts = {**dict(getattr(load, "draft_options", {}) or {}), **dict(options or {})}
    draft = load_target(spec, name, registry=registry, device=device, options=opts)
    if why:
        draft.backend_note = f"draft {draft.name} on backend auto -> {name}: {why}"
        log.info("drafter model: %s", draft.backend_note)
    return draft


def same_vocabulary(target, draft) -> bool:
    """Whether draft token ids mean the target's: the same vocabulary size (up to padding rows), the same
    text for a spread of ids, and the same tokens for a text made of them."""
    n = min(target.vocab_size, draft.vocab_size)
    if abs(target.vocab_size - draft.vocab_size) > 128 and n < max(target.vocab_size, draft.vocab_size) * 0.99:
        return False
    sample = sorted(set(np.linspace(0, n - 1, num=min(n, 257)).astype(int).tolist()))
    try:
        if not all(target.decode([i], skip_special_tokens=False) == draft.decode([i], skip_special_tokens=False)
                   for i in sample):
            return False
        words = [target.decode([i], skip_special_tokens=True) for i in sample]
        probe = " ".join(w for w in words if w.isprintable() and w.strip()) or "".join(words)
        tokenize = [getattr(m, "tokenize", None) for m in (target, draft)]
        return None in tokenize or tokenize[0](probe) == tokenize[1](probe)
    except Exception:  # noqa: BLE001 - a decoder that cannot read the other's ids: not the same vocabulary
        return False


def check_context(target, draft) -> None:
    """A draft that cannot hold what the target may hold would stop drafting mid-generation: refuse it."""
    window = getattr(target, "sliding_window", None)
    need = min(target.max_context, window - 1 if window else target.max_context)
    if draft.max_context < need:
        raise SpecframeError(f"drafter 'model': draft '{draft.name}' has a context of {draft.max_context} tokens, "
                             f"shorter than the target's {need}; use a draft with a longer context (or, on llama.cpp, "
                             f"--set drafter.options={{'n_ctx': {need}}})")


def availability(target) -> tuple[bool, str]:
    """``auto`` drafts with a draft model where a cheaper copy of the target is known and its runtime is there
    (elsewhere it refuses without a word: most targets have no known draft, and ``auto`` then explains the
    drafter it would otherwise have chosen)."""
    try:
        spec, why = default_draft(target)
    except SpecframeError:
        return False, ""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return False, "the target's 4-bit copy needs llama-cpp-python to draft"
    return True, why + ", on llama.cpp"


ModelDrafter.availability = staticmethod(availability)
ModelDrafter.auto_priority = 30  # above hybrid (20): a model of the same weights drafts far better than prompt lookup or a small head


class AheadModelDrafter(ModelDrafter):
    """The drafter ``model`` drafting ahead while the target verifies (``overlap=true``); never chosen by ``auto``."""

    name = "model-ahead"
    OVERLAP = True  # the same parameters as ``model`` (a bundle's drafter.* defaults must reach them)


AheadModelDrafter.availability = None


@hookimpl
def register_drafters(register):
    register("model", ModelDrafter)
    register("model-ahead", AheadModelDrafter)
