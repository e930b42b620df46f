"""Draft trees as flat tensors in topological order, and the vectorised ops on them.

A tree of ``n`` nodes is four 1-D tensors of length ``n``:

* ``tokens[i]``  – token id of node ``i``;
* ``parents[i]`` – index of its parent, ``parents[0] == -1`` (node 0 is the *root*: the last committed
  token, which the target has not yet consumed) and ``parents[i] < i`` for every other node;
* ``depths[i]``  – distance from the root (``depths[0] == 0``);
* ``logq[i]``    – the drafter's log-probability of ``tokens[i]`` given its parent (``logq[0] == 0``).

The target verifies the whole tree in one forward: node ``i`` sits at position ``past + depths[i]`` and
attends to the committed prefix plus its own ancestors (and itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from .errors import InvalidTreeError


@dataclass(frozen=True)
class Tree:
    tokens: torch.Tensor  # (n,) int64
    parents: torch.Tensor  # (n,) int64, parents[0] == -1
    depths: torch.Tensor  # (n,) int64
    logq: torch.Tensor  # (n,) float32, draft log-prob of each node given its parent
    source: torch.Tensor | None = None  # (n,) int64, which draft source proposed the node (optional)
    #: Per node, what its children were drawn from, for a verifier that samples them from the draft's
    #: distribution (see :meth:`specframe.components.Verifier.draw`); None when the children are ranked
    #: candidates, as for every tree an expansion policy builds.
    proposals: ClassVar[tuple | None] = None

    @property
    def size(self) -> int:
        return len(self.token_list)

    # Plain-list views, made once per tree: a step's tree is small, and the loop, the verifier and a
    # backend's batch layout each read it; one tensor op costs more than a loop over such a list.
    @cached_property
    def token_list(self) -> list[int]:
        return self.tokens.tolist()

    @cached_property
    def logq_list(self) -> list[float]:
        return self.logq.tolist()

    @cached_property
    def source_list(self) -> list[int] | None:
        return None if self.source is None else self.source.tolist()

    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def depth_list(self) -> list[int]:
        return self.depths.tolist()

    @cached_property
    def max_depth(self) -> int:
        return max(self.depth_list, default=0)

    @classmethod
    def root_only(cls, token: int) -> "Tree":
        return cls.from_lists([token], [-1], [0.0])

    @classmethod
    def from_lists(
        cls,
        tokens: list[int],
        parents: list[int],
        logq: list[float] | None = None,
        source: list[int] | None = None,
        proposals: list | None = None,
    ) -> "Tree":
        """Build a tree from python lists; depths are derived from ``parents``. ``proposals``: see
        :attr:`proposals` (one entry per node)."""
        n = len(tokens)
        if len(parents) != n:
            raise InvalidTreeError(f"tree has {n} tokens but {len(parents)} parents")
        depths = [0] * n
        for i, p in enumerate(parents):
            if i == 0:
                if p != -1:
                    raise InvalidTreeError(f"node 0 must be the root (parent -1), got parent {p}")
                continue
            if not 0 <= p < i:
                raise InvalidTreeError(f"node {i} has parent {p}; parents must come first (0 <= parent < {i})")
            depths[i] = depths[p] + 1
        for what, values in (("draft log-probs", logq), ("sources", source), ("proposals", proposals)):
            if values is not None and len(values) != n:
                raise InvalidTreeError(f"tree has {n} tokens but {len(values)} {what}")
        if cls is not Tree:  # a subclass gets its own constructor with every tensor
            if proposals is not None:
                raise InvalidTreeError(f"{cls.__name__}.from_lists does not take proposals")
            return cls(tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long),
                       depths=torch.tensor(depths, dtype=torch.long),
                       logq=torch.tensor(logq if logq is not None else [0.0] * n, dtype=torch.float32),
                       source=None if source is None else torch.tensor(source, dtype=torch.long))
        tree = _ListTree.of(list(map(int, tokens)), list(map(int, parents)), depths,
                            [0.0] * n if logq is None else list(map(float, logq)),
                            None if source is None else list(map(int, source)))
        if proposals is not None:
            tree.__dict__["proposals"] = tuple(proposals)
        return tree

    def children(self) -> list[list[int]]:
        """children[i] = indices of the children of node i (ascending)."""
        kids: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parent_list[1:], start=1):
            kids[p].append(i)
        return kids


class _ListTree(Tree):
    """A :class:`Tree` made by :meth:`Tree.from_lists`: the lists are its values, and each tensor is made
    on first use (a step that never needs one, such as a root-only step on llama.cpp, makes none)."""

    def __init__(self, tokens, parents, depths, logq=None, source=None):  # e.g. dataclasses.replace()
        as_list = lambda v, kind: list(map(kind, v.tolist() if isinstance(v, torch.Tensor) else v))  # noqa: E731
        self._fill(as_list(tokens, int), as_list(parents, int), as_list(depths, int),
                   [0.0] * len(tokens) if logq is None else as_list(logq, float),
                   None if source is None else as_list(source, int))

    @classmethod
    def of(cls, tokens: list[int], parents: list[int], depths: list[int], logq: list[float],
           source: list[int] | None) -> "_ListTree":
        """From lists already checked and converted (no copies)."""
        tree = object.__new__(cls)
        tree._fill(tokens, parents, depths, logq, source)
        return tree

    def _fill(self, tokens, parents, depths, logq, source) -> None:  # frozen: straight into the instance dict
        self.__dict__.update(token_list=tokens, parent_list=parents, depth_list=depths, logq_list=logq,
                             source_list=source)
        if source is None:
            self.__dict__["source"] = None

    @cached_property
    def tokens(self) -> torch.Tensor:
        return torch.tensor(self.token_list, dtype=torch.long)

    @cached_property
    def parents(self) -> torch.Tensor:
        return torch.tensor(self.parent_list, dtype=torch.long)

    @cached_property
    def depths(self) -> torch.Tensor:
        return torch.tensor(self.depth_list, dtype=torch.long)

    @cached_property
    def logq(self) -> torch.Tensor:
        return torch.tensor(self.logq_list, dtype=torch.float32)

    @cached_property
    def source(self) -> torch.Tensor | None:
        return torch.tensor(self.source_list, dtype=torch.long)

    def __repr__(self) -> str:
        return f"Tree(tokens={self.token_list}, parents={self.parent_list}, logq={self.logq_list})"


def ancestor_matrix(tree: Tree) -> torch.Tensor:
    """(n, n) bool: ``m[i, j]`` is True iff j is i or an ancestor of i.

    Vectorised by walking every node up one level at a time: O(depth) tensor ops.
    """
    n = tree.size
    idx = torch.arange(n)
    m = torch.zeros(n, n, dtype=torch.bool)
    m[idx, idx] = True
    up = tree.parents.clone()  # (n,) current ancestor of each node, -1 once past the root
    for _ in range(tree.max_depth):
        live = up >= 0
        m[idx[live], up[live]] = True
        up = torch.where(live, tree.parents[up.clamp(min=0)], up)
    return m


def tree_attention_mask(tree: Tree, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Float additive mask ``(1, 1, n, past + n)``: 0 where visible, ``finfo.min`` elsewhere.

    A float mask (not bool) is essential: some attention paths add a bool mask to the scores.
    """
    n = tree.size
    visible = torch.ones(n, past + n, dtype=torch.bool)
    visible[:, past:] = ancestor_matrix(tree)
    mask = torch.zeros(n, past + n, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def path_logq(tree: Tree) -> torch.Tensor:
    """(n,) sum of draft log-probs along root→i (0 at the root)."""
    return ancestor_matrix(tree).to(tree.logq.dtype) @ tree.logq


def path_confidence(tree: Tree) -> torch.Tensor:
    """(n,) P(v) = product of draft probabilities along root→v; P(root) = 1."""
    return path_logq(tree).exp()


def leaf_paths(tree: Tree) -> list[list[int]]:
    """Every root-to-leaf path as a list of node indices (root first)."""
    kids = tree.children()
    parents = tree.parent_list
    paths = []
    for leaf in (i for i in range(tree.size) if not kids[i]):
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    return paths


def validate_tree(tree: Tree, vocab_size: int, who: str) -> None:
    """Raise :class:`InvalidTreeError` naming ``who`` if ``tree`` breaks an invariant.

    Checked: shapes agree, root at 0, parents precede children, depths consistent, tokens inside the
    vocabulary, finite draft log-probs, and no two siblings with the same token (a verifier could
    otherwise descend into either).
    """
    n = tree.size
    # a tree from lists has consistent lengths by construction; one built from tensors is checked here
    fields = () if isinstance(tree, _ListTree) else (tree.tokens, tree.parents, tree.depths, tree.logq)
    if n == 0 or any(t.shape != (n,) for t in fields):
        raise InvalidTreeError(f"{who} produced a malformed tree (empty or fields of different lengths)")
    # plain lists: a step's tree is small, and one tensor op costs more than a loop over it
    parents, depths, tokens = tree.parent_list, tree.depth_list, tree.token_list
    if parents[0] != -1:
        raise InvalidTreeError(f"{who} produced a tree whose node 0 is not the root (parent {parents[0]})")
    for i in range(1, n):
        if not 0 <= parents[i] < i:
            raise InvalidTreeError(
                f"{who} produced an invalid tree: node {i} has parent {parents[i]} (must be in [0, {i}))"
            )
    if depths[0] != 0 or any(depths[i] != depths[parents[i]] + 1 for i in range(1, n)):
        raise InvalidTreeError(f"{who} produced a tree whose depths do not match its parents")
    for i, tok in enumerate(tokens):
        if not 0 <= tok < vocab_size:
            raise InvalidTreeError(
                f"{who} produced token {tok} at node {i}, outside the vocabulary [0, {vocab_size})"
            )
    if not all(map(math.isfinite, tree.logq_list)):
        raise InvalidTreeError(f"{who} produced NaN or infinite draft log-probabilities")
    if len(set(zip(parents[1:], tokens[1:]))) != n - 1:
        raise InvalidTreeError(f"{who} produced a tree with two siblings carrying the same token")


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two lists (node paths, token sequences)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
