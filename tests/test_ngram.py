"""The prompt-lookup drafter's incremental n-gram index finds exactly what a scan of the whole context
finds, whatever the order of calls: growing contexts (a generation), a context that starts over (a new
request), and one that is cut back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from specframe.plugins.drafters import NgramDrafter


def scan(context: list[int], depth: int, max_ngram: int, min_ngram: int, max_matches: int):
    """The definition: the longest suffix (max_ngram .. min_ngram tokens) that occurred earlier with at
    least one token after it; its distinct continuations, most recent occurrence first."""
    n = len(context)
    for k in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        suffix = context[n - k:]
        found: list[list[int]] = []
        for start in range(n - 1 - k, -1, -1):
            cont = context[start + k:start + k + depth]
            if context[start:start + k] == suffix and cont not in found:
                found.append(cont)
                if len(found) == max_matches:
                    break
        if found:
            return found, k
    return [], 0


edits = st.lists(st.tuples(st.sampled_from(["grow", "new", "cut"]), st.lists(st.integers(0, 4), max_size=6),
                           st.integers(1, 8)), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), edits, st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 8))
def test_the_index_matches_a_full_scan(start, steps, max_ngram, min_ngram, max_matches):
    min_ngram = min(min_ngram, max_ngram)
    drafter = NgramDrafter(max_ngram=max_ngram, min_ngram=min_ngram, max_matches=max_matches)
    context = list(start)
    for kind, tokens, depth in steps:
        if kind == "grow":
            context = context + tokens
        elif kind == "new":
            context = tokens or [0]
        else:
            context = context[: max(1, len(context) - len(tokens))] + tokens[:1]
        assert drafter.match(context, depth) == scan(context, depth, max_ngram, min_ngram, max_matches)


def test_the_engines_growing_context_list_is_indexed_incrementally():
    """The engine extends one list in place; the index keeps its own copy and adds only the new tokens."""
    drafter = NgramDrafter(max_ngram=2)
    context = [1, 2, 3, 1, 2]
    assert drafter.match(context, 3) == ([[3, 1, 2]], 2)
    context += [3, 9]
    assert len(drafter.index.tokens) == 5  # nothing indexed before the next call
    assert drafter.match(context, 3) == ([], 0)  # (3, 9) and 9 never occurred before
    context += [1, 2]
    assert drafter.match(context, 2) == ([[3, 9], [3, 1]], 2)
    assert drafter.index.tokens == context and drafter.index.tokens is not context
