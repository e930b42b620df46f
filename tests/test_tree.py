"""Tree tensors and their vectorised ops, checked against brute-force walks on random trees."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specframe.errors import InvalidTreeError, SpecframeError
from specframe.tree import (
    Tree,
    ancestor_matrix,
    leaf_paths,
    path_confidence,
    path_logq,
    tree_attention_mask,
    validate_tree,
)

VOCAB = 12
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def random_trees(draw, max_nodes: int = 18, vocab: int = VOCAB):
    """A valid random tree: parents[i] < i, distinct sibling tokens, finite logq, root logq 0."""
    n = draw(st.integers(1, max_nodes))
    tokens = [draw(st.integers(0, vocab - 1))]
    parents = [-1]
    logq = [0.0]
    used: dict[int, set[int]] = {0: set()}
    for i in range(1, n):
        parent = draw(st.integers(0, i - 1))
        free = [t for t in range(vocab) if t not in used[parent]]
        if not free:  # every token already a child of this parent: hang it under the root's first kid chain
            parent = i - 1
            free = [t for t in range(vocab) if t not in used[parent]]
        tok = draw(st.sampled_from(free))
        used[parent].add(tok)
        used[i] = set()
        tokens.append(tok)
        parents.append(parent)
        logq.append(draw(st.floats(-6.0, 0.0, allow_nan=False)))
    return Tree.from_lists(tokens, parents, logq)


def brute_path(tree: Tree, i: int) -> list[int]:
    """Node indices root -> i, walking parents one by one."""
    parents = tree.parents.tolist()
    path = [i]
    while parents[path[-1]] != -1:
        path.append(parents[path[-1]])
        assert len(path) <= tree.size, "cycle"
    return path[::-1]


# ---------------------------------------------------------------------------------------------- structure
@SETTINGS
@given(random_trees())
def test_depths_and_children_match_brute_force(tree):
    parents = tree.parents.tolist()
    for i in range(tree.size):
        assert int(tree.depths[i]) == len(brute_path(tree, i)) - 1
    kids = tree.children()
    for i in range(tree.size):
        assert kids[i] == [j for j in range(tree.size) if parents[j] == i]
    assert tree.max_depth == max(len(brute_path(tree, i)) - 1 for i in range(tree.size))


@SETTINGS
@given(random_trees())
def test_ancestor_matrix_equals_brute_force_walk(tree):
    n = tree.size
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in brute_path(tree, i):
            expected[i, j] = True
    got = ancestor_matrix(tree)
    assert got.dtype == torch.bool and got.shape == (n, n)
    assert torch.equal(got, expected)


@SETTINGS
@given(random_trees(), st.integers(0, 7), st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_attention_mask_shape_values_and_visibility(tree, past, dtype):
    n = tree.size
    mask = tree_attention_mask(tree, past, dtype)
    assert mask.shape == (1, 1, n, past + n)
    assert mask.dtype == dtype
    m = mask[0, 0]
    lowest = torch.finfo(dtype).min
    # only two values: 0 (visible) and finfo.min (hidden)
    assert bool(((m == 0) | (m == lowest)).all())
    # the committed prefix is visible to every node
    assert bool((m[:, :past] == 0).all())
    for i in range(n):
        visible = set(brute_path(tree, i))
        for j in range(n):
            assert (m[i, past + j] == 0).item() == (j in visible), (i, j)


@SETTINGS
@given(random_trees())
def test_path_confidence_is_product_of_draft_probabilities(tree):
    conf = path_confidence(tree)
    logq = tree.logq.tolist()
    assert conf.shape == (tree.size,)
    assert conf[0].item() == pytest.approx(1.0)
    for i in range(tree.size):
        want = math.prod(math.exp(logq[j]) for j in brute_path(tree, i)[1:])
        assert conf[i].item() == pytest.approx(want, rel=1e-4, abs=1e-12)
        assert path_logq(tree)[i].item() == pytest.approx(sum(logq[j] for j in brute_path(tree, i)[1:]), abs=1e-4)


@SETTINGS
@given(random_trees())
def test_leaf_paths_cover_every_leaf_once_and_follow_parents(tree):
    n = tree.size
    parents = tree.parents.tolist()
    leaves = {i for i in range(n) if i not in parents}
    paths = leaf_paths(tree)
    ends = [p[-1] for p in paths]
    assert sorted(ends) == sorted(leaves)  # every leaf, each exactly once
    for path in paths:
        assert path[0] == 0
        for a, b in zip(path, path[1:]):
            assert parents[b] == a
        assert path == brute_path(tree, path[-1])
    # every node lies on some leaf path
    assert set().union(*map(set, paths)) == set(range(n))


def test_single_node_tree():
    tree = Tree.root_only(5)
    assert tree.size == 1 and tree.max_depth == 0
    assert torch.equal(ancestor_matrix(tree), torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(tree_attention_mask(tree, 3, torch.float64), torch.zeros(1, 1, 1, 4, dtype=torch.float64))
    assert leaf_paths(tree) == [[0]]
    validate_tree(tree, VOCAB, "me")


# ---------------------------------------------------------------------------------------------- validation
@SETTINGS
@given(random_trees())
def test_validate_tree_accepts_valid_trees(tree):
    validate_tree(tree, VOCAB, "drafter 'x'")


def _raw(tokens, parents, depths=None, logq=None) -> Tree:
    """A Tree built without from_lists' checks."""
    n = len(tokens)
    return Tree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.tensor(parents, dtype=torch.long),
        depths=torch.tensor(depths if depths is not None else [0] + [1] * (n - 1), dtype=torch.long),
        logq=torch.tensor(logq if logq is not None else [0.0] * n, dtype=torch.float32),
    )


def _assert_rejected(tree: Tree, vocab: int = VOCAB):
    who = "drafter 'evil-drafter'"
    with pytest.raises(InvalidTreeError) as info:
        validate_tree(tree, vocab, who)
    assert who in str(info.value)
    assert isinstance(info.value, SpecframeError)


def _mutable(tree: Tree) -> dict:
    return {k: getattr(tree, k).clone() for k in ("tokens", "parents", "depths", "logq")}


@SETTINGS
@given(random_trees(), st.data())
def test_validate_tree_rejects_parent_not_before_child(tree, data):
    if tree.size < 2:
        tree = Tree.from_lists([1, 2], [-1, 0], [0.0, -1.0])
    f = _mutable(tree)
    i = data.draw(st.integers(1, tree.size - 1))
    f["parents"][i] = data.draw(st.integers(i, tree.size + 3))  # itself or a later / missing node
    _assert_rejected(Tree(**f))


def test_validate_tree_rejects_negative_parent_and_self_loop():
    _assert_rejected(_raw([1, 2, 3], [-1, 0, -1], [0, 1, 1]))
    _assert_rejected(_raw([1, 2, 3], [-1, 0, 2], [0, 1, 2]))
    with pytest.raises(InvalidTreeError):
        Tree.from_lists([1, 2, 3], [-1, 2, 0])


@SETTINGS
@given(random_trees(), st.data())
def test_validate_tree_rejects_tokens_outside_vocab(tree, data):
    f = _mutable(tree)
    i = data.draw(st.integers(0, tree.size - 1))
    f["tokens"][i] = data.draw(st.sampled_from([-1, -7, VOCAB, VOCAB + 5]))
    _assert_rejected(Tree(**f))


@SETTINGS
@given(random_trees(), st.data())
def test_validate_tree_rejects_non_finite_logq(tree, data):
    f = _mutable(tree)
    i = data.draw(st.integers(0, tree.size - 1))
    f["logq"][i] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    _assert_rejected(Tree(**f))


@SETTINGS
@given(random_trees(), st.data())
def test_validate_tree_rejects_duplicate_sibling_tokens(tree, data):
    kids = tree.children()
    with_two = [i for i, k in enumerate(kids) if len(k) >= 2]
    if not with_two:  # append a root child that repeats an existing root child's token
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        root_kids = [j for j in range(1, len(parents)) if parents[j] == 0]
        if not root_kids:
            tokens, parents, root_kids = tokens + [3], parents + [0], [len(tokens)]
        _assert_rejected(Tree.from_lists(tokens + [tokens[root_kids[0]]], parents + [0]))
        return
    p = data.draw(st.sampled_from(with_two))
    a, b = data.draw(st.permutations(kids[p]))[:2]
    f = _mutable(tree)
    f["tokens"][b] = f["tokens"][a]
    _assert_rejected(Tree(**f))


def test_same_token_under_different_parents_is_fine():
    validate_tree(Tree.from_lists([0, 5, 5, 5], [-1, 0, 1, 2]), VOCAB, "x")
    validate_tree(Tree.from_lists([5, 5, 6, 5, 5], [-1, 0, 0, 1, 2]), VOCAB, "x")


@pytest.mark.parametrize("parent0", [0, 1, -2, 3])
def test_validate_tree_rejects_bad_root(parent0):
    _assert_rejected(_raw([1, 2, 3, 4], [parent0, 0, 0, 1], [0, 1, 1, 2]))
    with pytest.raises(InvalidTreeError):
        Tree.from_lists([1, 2, 3, 4], [parent0, 0, 0, 1])


def test_validate_tree_rejects_empty_and_ragged_trees():
    _assert_rejected(_raw([], []))
    ok = Tree.from_lists([1, 2, 3], [-1, 0, 1], [0.0, -0.5, -0.5])
    for field, bad in [
        ("parents", torch.tensor([-1, 0], dtype=torch.long)),
        ("depths", torch.tensor([0, 1, 2, 3], dtype=torch.long)),
        ("logq", torch.tensor([0.0, -0.5], dtype=torch.float32)),
    ]:
        f = _mutable(ok)
        f[field] = bad
        _assert_rejected(Tree(**f))
    with pytest.raises(InvalidTreeError):
        Tree.from_lists([1, 2, 3], [-1, 0])


@SETTINGS
@given(random_trees(), st.data())
def test_validate_tree_rejects_inconsistent_depths(tree, data):
    if tree.size < 2:
        tree = Tree.from_lists([1, 2], [-1, 0], [0.0, -1.0])
    f = _mutable(tree)
    i = data.draw(st.integers(0, tree.size - 1))
    f["depths"][i] += data.draw(st.sampled_from([-1, 1, 2]))
    _assert_rejected(Tree(**f))
