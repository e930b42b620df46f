"""Built-in training-free drafters: ``none`` (no guesses) and ``ngram`` (prompt lookup), usable on any model.

It finds earlier occurrences of the longest suffix of the context (``max_ngram`` down to ``min_ngram``
tokens) and proposes what followed them. Several distinct continuations form a tree (a trie); a node's
draft probability is the share of matches that continue through it, ``count(child) / (count(parent) +
alpha_k)``, so a single match is not taken as certainty; ``alpha_k = alpha · (1 + max_ngram − k)`` grows as the
matched suffix length k shrinks, so a match of the longest suffix is trusted most.
"""

from __future__ import annotations

import copy
import math

from specframe import hookimpl
from specframe.components import Draft, Drafter, EmptyDraft, TrieDraft


class NoDrafter(Drafter):
    """Proposes nothing; with it every step verifies the root alone."""

    name = "none"
    sampling_q = True  # nothing to draw: any verifier works with it

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        return EmptyDraft()


class NgramIndex:
    """Where every n-gram of the context occurs, kept up to date as the context grows: ``ends[k][gram]``
    lists (ascending) each position ``e`` with ``context[e-k:e] == gram`` and a token at ``e`` to continue
    with (so the context's own suffix is not a match of itself). A step adds the committed tokens' n-grams only (O(1) per token, not a scan of the context); a
    context that does not extend the indexed one (a new request, another caller) is indexed afresh."""

    def __init__(self, sizes):
        self.sizes = tuple(sizes)
        self.tokens: list[int] = []
        self.ends: dict[int, dict[tuple[int, ...], list[int]]] = {k: {} for k in self.sizes}

    def sync(self, context: list[int]) -> dict[int, dict[tuple[int, ...], list[int]]]:
        """Index ``context`` (every n-gram followed by a token) and return the tables."""
        done = len(self.tokens)
        if len(context) < done or context[:done] != self.tokens:  # one C-level comparison
            self.tokens, done = [], 0
            self.ends = {k: {} for k in self.sizes}
        new = context[done:]
        self.tokens += new
        toks = self.tokens
        for k, table in self.ends.items():
            for end in range(max(k, done), len(toks)):
                table.setdefault(tuple(toks[end - k:end]), []).append(end)
        return self.ends


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 8, max_depth: int = 8,
                 alpha: float = 0.5):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_matches <= 0 or max_depth <= 0:
            raise ValueError("max_matches and max_depth must be positive")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_matches, self.max_depth, self.alpha = max_matches, max_depth, alpha
        self.index = NgramIndex(range(min_ngram, max_ngram + 1))

    def match(self, context: list[int], depth: int) -> tuple[list[list[int]], int]:
        """Distinct continuations (most recent match first) of the longest matching suffix, and that
        suffix's length; ([], 0) when nothing matches."""
        ends = self.index.sync(context)
        n = len(context)
        for k in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            hits = ends[k].get(tuple(context[n - k:]))
            if not hits:
                continue
            found: list[list[int]] = []
            seen: set[tuple[int, ...]] = set()
            for end in reversed(hits):
                cont = tuple(context[end:end + depth])
                if cont not in seen:
                    seen.add(cont)
                    found.append(list(cont))
                    if len(found) == self.max_matches:
                        break
            return found, k
        return [], 0

    def fork(self) -> "NgramDrafter":
        twin = copy.copy(self)
        twin.index = NgramIndex(self.index.sizes)  # each request its own n-gram index
        return twin

    def propose(self, context_ids: list[int], max_depth: int) -> Draft:
        conts, k = self.match(context_ids, min(max_depth, self.max_depth))
        if not conts:
            return EmptyDraft()
        # a shorter matched suffix is weaker evidence: a larger smoothing constant lowers q, so the
        # calibrated surrogate (which bins by q) learns each match length's real acceptance separately
        alpha = self.alpha * (1 + self.max_ngram - k)
        tokens, parents, counts = [context_ids[-1]], [-1], [0]
        index: dict[tuple[int, int], int] = {}
        for cont in conts:
            node = 0
            counts[0] += 1
            for tok in cont:
                child = index.get((node, tok))
                if child is None:
                    child = index[(node, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(node)
                    counts.append(0)
                counts[child] += 1
                node = child
        logq = [0.0] + [
            math.log(counts[i] / (counts[parents[i]] + alpha)) for i in range(1, len(tokens))
        ]
        return TrieDraft(tokens, parents, logq)


@hookimpl
def register_drafters(register):
    register("none", NoDrafter)
    register("ngram", NgramDrafter)
