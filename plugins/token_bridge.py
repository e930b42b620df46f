"""Drafting across tokenizers: a draft model whose vocabulary is not the target's drafts through text, as
transformers' universal assisted generation does.

* Target context → text → draft tokens: the draft reads the target's committed context as text
  (special tokens written out), tokenized its own way (its BOS included); its cache keeps the prefix it
  shares with the last step's reading, so only the tail is new.
* Draft tokens → text → target tokens: a draft node's path is decoded to text after the draft's last
  context tokens, and that text is tokenized by the target after the target's last context tokens; the
  target tokens past the context's own are the node's target continuation ``T(v)``. Where the target's
  tokenizer would merge the new text into the context's last token (the longest common prefix stops
  inside the context), the node offers nothing.
* The tree in target tokens is a lazy trie over those continuations (:class:`BridgedDraft`): a draft node's
  first target token carries its draft log-prob, the rest of its continuation log-prob 0; siblings that
  begin with the same target token are one node (the likelier draft node continues it).

The verifier never reads q, so the output is the target's own at any temperature.
"""

from __future__ import annotations

from specframe.components import Candidate, Draft
from specframe.errors import SpecframeError

TAIL = 8  # context tokens re-read on each side of a draft path's text


class TokenBridge:
    """Text conversions between a target's tokens and a draft's."""

    def __init__(self, target, draft):
        for who, model in (("target", target), ("draft", draft)):
            if getattr(model, "tokenizer", True) is None or not hasattr(model, "tokenize"):
                raise SpecframeError(
                    f"drafter 'model': the draft '{draft.name}' and the target '{target.name}' have different "
                    f"vocabularies ({draft.vocab_size} vs {target.vocab_size} tokens) and the {who} has no tokenizer "
                    f"to translate through; use a draft with the target's tokenizer, or give both tokenizers")
        self.target, self.draft = target, draft
        self.target_eos = next(iter(getattr(target, "eos_token_ids", ()) or ()), None)
        self.draft_eos = set(getattr(draft, "eos_token_ids", ()) or ())

    def draft_context(self, context_ids: list[int]) -> list[int]:
        """The draft's reading of the target context (its BOS, if it uses one, included)."""
        text = self.target.decode(context_ids, skip_special_tokens=False)
        return list(self.draft.encode(text, chat=False))

    def wrap(self, draft: Draft, context_ids: list[int], draft_ids: list[int]) -> "BridgedDraft":
        return BridgedDraft(draft, self, self._tail(context_ids), draft_ids[-TAIL - 1:])

    def _tail(self, context_ids: list[int]) -> tuple[list[int], str] | None:
        """The last target tokens whose text the target tokenizes back into exactly those tokens."""
        for m in (TAIL, 4, 2, 1):
            ids = list(context_ids[-m:])
            text = self.target.decode(ids, skip_special_tokens=False)
            if self.target.tokenize(text) == ids:
                return ids, text
        return None

    def continuation(self, tail, draft_tail: list[int], path: list[int]) -> list[int] | None:
        """``T(v)``: the target tokens of draft ``path``'s text after the context, or None where the text
        does not begin at a target token boundary."""
        if tail is None:
            return None
        eos = bool(path) and path[-1] in self.draft_eos and self.target_eos is not None
        if eos:
            path = path[:-1]
        before = self.draft.decode(draft_tail, skip_special_tokens=False)
        after = self.draft.decode(draft_tail + path, skip_special_tokens=False)
        if not after.startswith(before):
            return None
        new = after[len(before):].rstrip("\ufffd")  # an unfinished character waits for the next token
        ids, text = tail
        out = self.target.tokenize(text + new) if new else list(ids)
        if out[: len(ids)] != ids:
            return None
        return out[len(ids):] + ([self.target_eos] if eos else [])


class BridgedDraft(Draft):
    """A lazy draft in TARGET tokens over a draft-space :class:`~specframe.plugins.model_drafter.ModelDraft`.
    A handle ``(v, j)`` is the target node after the first j tokens of draft node v's continuation."""

    lazy = True

    def __init__(self, inner, bridge: TokenBridge, tail, draft_tail: list[int]):
        self.inner, self.bridge, self.tail, self.draft_tail = inner, bridge, tail, draft_tail[:-1]
        self.root_token = draft_tail[-1] if draft_tail else None
        self.max_depth = inner.max_depth
        self.ROOT = (0, 0)
        self._cont: dict[int, list[int] | None] = {0: []}

    @property
    def spent_seconds(self) -> float:
        return self.inner.spent_seconds

    def _t(self, v: int) -> list[int] | None:
        if v not in self._cont:
            self._cont[v] = self.bridge.continuation(self.tail, self.draft_tail + [self.root_token], self.inner.path(v))
        return self._cont[v]

    def expanded(self, handle) -> bool:
        v, j = handle
        return j < len(self._t(v) or ()) or self.inner.expanded(v)

    def expand(self, handles: list, depth: int) -> None:
        self.inner.expand([v for v, j in handles if j >= len(self._t(v) or ())], depth)

    def expansion_seconds(self, count: int = 1) -> float:
        return self.inner.expansion_seconds(count)

    def expected_child_logq(self, handle, depth: int) -> float:
        return self.inner.expected_child_logq(handle[0], depth)

    def children(self, handle, depth: int) -> list[Candidate]:
        v, j = handle
        mine = self._t(v) or []
        if j < len(mine):  # inside v's own continuation: its next target token, already paid for
            return [Candidate(mine[j], 0.0, (v, j + 1))]
        best: dict[int, Candidate] = {}
        for cand in self.inner.children(v, self.inner.depth[v]):
            theirs = self._t(cand.handle)
            if theirs is None or len(theirs) <= len(mine) or theirs[: len(mine)] != mine:
                continue  # no new target token, or the text re-tokenizes what v already gave
            tok = theirs[len(mine)]
            if tok not in best or cand.logq > best[tok].logq:
                best[tok] = Candidate(tok, cand.logq, (cand.handle, len(mine) + 1))
        return sorted(best.values(), key=lambda c: -c.logq)

    def validate(self, vocab_size: int) -> None:
        for cand in self.children(self.ROOT, 0):
            if not 0 <= cand.token < vocab_size:
                raise ValueError(f"draft token {cand.token} is outside the vocabulary [0, {vocab_size})")
