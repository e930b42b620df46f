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

import numpy as np
import torch

from specframe import hookimpl
from specframe.backends import AUTO, load_target
from specframe.clock import real_clock
from specframe.components import Candidate, Draft, Drafter, EmptyDraft
from specframe.errors import SpecframeError
from specframe.tree import Tree, common_prefix

log = logging.getLogger("specframe")
WINDOW = 64  # draft calls the per-call cost fit remembers


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


class ModelDraft(Draft):
    """One step's draft tree in the DRAFT's token space, grown lazily. Handles are node ids; node 0 is the
    root. ``rows`` lists the nodes the draft session holds (forwarded), in its cache order."""

    ROOT = 0
    lazy = True

    def __init__(self, drafter: "ModelDrafter", root: int, max_depth: int):
        self.drafter, self.max_depth = drafter, max_depth
        self.token, self.parent, self.depth, self.logq = [root], [-1], [0], [0.0]
        self.kids: list[list[Candidate] | None] = [None]
        self.row: list[int | None] = [None]
        self.rows: list[int] = []
        self.spent_seconds = 0.0

    def expanded(self, handle) -> bool:
        return self.kids[handle] is not None or self.depth[handle] >= self.max_depth

    def children(self, handle, depth: int) -> list[Candidate]:
        if self.depth[handle] >= self.max_depth:
            return []
        if self.kids[handle] is None:
            self.expand([handle], depth)
        return self.kids[handle]

    def expand(self, handles: list, depth: int) -> None:
        todo = [h for h in dict.fromkeys(handles) if not self.expanded(h)]
        if todo:
            self.drafter.forward(self, todo)

    def expansion_seconds(self, count: int = 1) -> float:
        return self.drafter.costs.predict(count)

    def expected_child_logq(self, handle, depth: int) -> float:
        return self.drafter.top_logq

    def path(self, handle) -> list[int]:
        """Draft tokens from below the root to ``handle``."""
        out = []
        while handle > 0:
            out.append(self.token[handle])
            handle = self.parent[handle]
        return out[::-1]

    def add(self, parent: int, token: int, logq: float) -> int:
        self.token.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.logq.append(logq)
        self.kids.append(None)
        self.row.append(None)
        return len(self.token) - 1

    def validate(self, vocab_size: int) -> None:
        for row in self.kids:
            for c in row or ():
                if not 0 <= c.token < vocab_size:
                    raise ValueError(f"draft token {c.token} is outside the vocabulary [0, {vocab_size})")


class ModelDrafter(Drafter):
    """Drafts with a second model (see the module's description). Parameters: ``path`` (the draft model
    spec; default: a known cheaper copy of the target), ``backend`` (the draft's runtime, ``auto`` as for
    targets), ``top_k`` (children per expanded node), ``max_depth`` (the deepest a draft may go),
    ``options`` (the draft backend's options, e.g. ``{"threads": 2}``); in Python, ``model`` takes a draft
    already loaded (any object a backend's ``load`` returns)."""

    name = "model"

    def __init__(self, target, registry=None, clock=real_clock, path: str | None = None, backend: str = AUTO,
                 top_k: int = 4, max_depth: int = 32, options: dict | None = None, model=None):
        if not isinstance(top_k, int) or top_k <= 0 or not isinstance(max_depth, int) or max_depth <= 0:
            raise SpecframeError(f"drafter 'model': top_k and max_depth must be positive integers, got {top_k}, {max_depth}")
        self.target, self.clock = target, clock
        self.top_k, self.max_depth = top_k, max_depth
        if model is not None:  # a draft already loaded (Python API, tests)
            self.draft, why = model, ""
        else:
            spec, why = (path, "") if path else default_draft(target)
            self.draft = load_draft(spec, backend, target, registry, options)
        self.note = "; ".join(x for x in (why, getattr(self.draft, "backend_note", "")) if x)
        self.auto_note = getattr(self.draft, "backend_note", "")  # what auto chose for the draft, for one CLI line
        self.bridge = None
        if not same_vocabulary(target, self.draft):
            from specframe.plugins.token_bridge import TokenBridge

            self.bridge = TokenBridge(target, self.draft)
        check_context(target, self.draft)
        self.session = self.draft.start(())  # one draft session for every request: a shared prefix stays
        self.grows = hasattr(self.session, "grow")  # a session that cannot grow re-verifies the tree per depth
        self.cached: list[int] = []  # draft tokens committed in the draft session
        self.tree: ModelDraft | None = None  # the last proposal, whose forwarded rows are in the session
        self.costs = CallCosts()
        self.top_logq = float(np.log(0.8))  # running mean of an expansion's best child log-prob

    def describe(self) -> str:
        how = "through text (other tokenizer)" if self.bridge else "same tokenizer"
        if not self.grows:
            how += "; its backend cannot grow a tree, so each depth re-verifies the whole tree"
        return (f"model:{self.draft.name} on {getattr(self.draft, 'backend', '?')} ({how}; top_k {self.top_k}, "
                f"max_depth {self.max_depth})" + (f" — {self.note}" if self.note else ""))

    # ------------------------------------------------------------------ requests and steps
    def start(self, prompt_ids: list[int], features) -> None:
        """A new request: the draft reads the prompt now (prefill time, not drafting time), keeping the
        prefix it shares with what it held."""
        ids = self.bridge.draft_context(prompt_ids) if self.bridge else list(prompt_ids)
        if 1 < len(ids) <= self._room():
            self._sync(ids[:-1])

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        ids = self.bridge.draft_context(context_ids) if self.bridge else list(context_ids)
        if not ids:
            return EmptyDraft()
        depth = min(max_depth, self.max_depth, self._room() - len(ids))
        if depth <= 0:  # the draft's context is full: the target goes on alone
            return EmptyDraft()
        self._sync(ids[:-1])
        draft = ModelDraft(self, ids[-1], depth)
        self.tree = draft
        draft.expand([0], 0)  # the root's children: part of the proposal's own time
        draft.spent_seconds = 0.0
        return self.bridge.wrap(draft, context_ids, ids) if self.bridge else draft

    def commit(self, tokens: list[int], features) -> None:
        """Nothing to do now: the next proposal keeps what of this tree the target accepted (``_sync``)."""

    # ------------------------------------------------------------------ the draft session
    def _room(self) -> int:
        d = self.draft
        window = getattr(d, "sliding_window", None)
        return min(d.max_context, window - 1 if window else d.max_context) - 1

    def _sync(self, want: list[int]) -> None:
        """Bring the draft cache to exactly ``want`` (the draft context but its root)."""
        s, tree, n = self.session, self.tree, len(self.cached)
        if tree is not None and tree.rows:
            path = [0]
            if want[:n] == self.cached and len(want) > n and want[n] == tree.token[0]:
                node = 0
                for tok in want[n + 1:]:
                    nxt = next((c.handle for c in tree.kids[node] or () if c.token == tok), None)
                    if nxt is None or tree.row[nxt] is None:
                        break
                    node = nxt
                    path.append(node)
                s.keep([tree.row[h] for h in path], len(tree.rows))
                self.cached += [tree.token[h] for h in path]
            else:
                s.rollback(len(tree.rows))
        self.tree = None
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
        start = len(draft.rows)
        for h in todo:
            draft.row[h] = len(draft.rows)
            draft.rows.append(h)
        parents = [-1 if draft.parent[h] < 0 else draft.row[draft.parent[h]] for h in draft.rows]
        tree = Tree.from_lists([draft.token[h] for h in draft.rows], parents)
        if self.grows:
            logits = self.session.grow(tree, start).logits
        else:  # a backend without grow(): verify the whole tree again
            if start:
                self.session.rollback(start)
            logits = self.session.verify(tree).logits[start:]
        self.draft.synchronize()
        logits = logits.float()
        vocab = self.target.vocab_size if self.bridge is None else logits.shape[-1]
        if logits.shape[-1] > vocab:  # padding rows of a larger draft vocabulary are never proposed
            logits = logits[:, :vocab]
        logp = torch.log_softmax(logits, dim=-1)
        top = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
        for h, vals, toks in zip(todo, values, indices):
            draft.kids[h] = [Candidate(t, q, draft.add(h, t, q)) for t, q in zip(toks, vals) if q > float("-inf")]
            self.top_logq = 0.9 * self.top_logq + 0.1 * vals[0]
        seconds = self.clock() - start_s
        draft.spent_seconds += seconds
        self.costs.observe(len(todo), seconds)


# ---------------------------------------------------------------------- loading and checks
def default_draft(target) -> tuple[str, str]:
    """The draft ``--drafter model`` uses without a spec, and why: a known cheaper copy of the target."""
    alias = getattr(target, "model_alias", None)
    if alias and getattr(target, "backend", "") != "llama.cpp":
        return alias, (f"the draft is the target's own 4-bit GGUF ({alias}), the cheapest copy of its weights")
    raise SpecframeError(f"drafter 'model' needs a draft model for target '{target.name}': --drafter model:SPEC "
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


@hookimpl
def register_drafters(register):
    register("model", ModelDrafter)
