"""The hf backend's batch room (``Target.open_batch``): ONE transformers forward verifies several requests'
draft trees, and leaves every request's session exactly as if it had verified its own tree alone.

Tiny random models (conftest) in fp64 and fp32, three architectures; trees and prompts drawn by hypothesis."""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TinyTokenizer, make_tiny_model
from specframe.errors import SpecframeError
from specframe.tree import Tree

ARCHS = ("llama", "qwen2", "gemma")
VOCAB = 96
LAYERS = (0, 1)


@functools.lru_cache(maxsize=None)
def _model(arch: str, dtype: torch.dtype):
    model = make_tiny_model(arch)
    return model if dtype == torch.float64 else copy.deepcopy(model).to(dtype).eval()


def target(arch: str = "llama", dtype: torch.dtype = torch.float64):
    from specframe import Target

    return Target(_model(arch, dtype), TinyTokenizer(), f"tiny-{arch}")


def random_tree(rng: random.Random, root: int, size: int) -> Tree:
    parents = [-1] + [rng.randrange(i) for i in range(1, size)]
    return Tree.from_lists([root] + [rng.randrange(VOCAB) for _ in range(size - 1)], parents)


def random_path(rng: random.Random, tree: Tree) -> list[int]:
    """Root-to-node path (node indices, root first) to a random node."""
    parents = tree.parent_list
    path = [rng.randrange(tree.size)]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]



def assert_same_out(out, ref, dtype) -> None:
    assert out.logits.shape == ref.logits.shape and out.logits.dtype == torch.float32
    atol = 1e-9 if dtype == torch.float64 else 1e-4 * max(1.0, float(ref.logits.abs().max()))
    torch.testing.assert_close(out.logits, ref.logits, atol=atol, rtol=0)
    top2 = ref.logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 10 * atol  # rows whose argmax is not a near-tie
    assert torch.equal(out.logits.argmax(-1)[clear], ref.logits.argmax(-1)[clear])
    if ref.features is None:
        assert out.features is None
    else:
        assert out.features.shape == ref.features.shape
        torch.testing.assert_close(out.features, ref.features, atol=atol, rtol=0)


def assert_same_cache(a, b, dtype) -> None:
    from specframe.plugins.hf import _kv_tensors

    assert a.past == b.past
    ka, kb = _kv_tensors(a.cache), _kv_tensors(b.cache)
    assert len(ka) == len(kb)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for (k1, v1), (k2, v2) in zip(ka, kb):
        assert k1.shape == k2.shape and k1.shape[-2] == a.past
        torch.testing.assert_close(k1, k2, atol=atol, rtol=0)
        torch.testing.assert_close(v1, v2, atol=atol, rtol=0)


def twins(room, t, rng, prompt_lengths, feature_layers=LAYERS):
    """One room session and one solo session per prompt, both prefilled with the prompt (all but its last)."""
    pairs = []
    for length in prompt_lengths:
        prompt = [rng.randrange(VOCAB) for _ in range(length)]
        a, b = room.start(), t.start(feature_layers)
        a.prefill(prompt[:-1])
        b.prefill(prompt[:-1])
        pairs.append((a, b, prompt[-1]))
    return pairs


# ---------------------------------------------------------------------- 1 + 4: batched == solo
@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(ARCHS), fp32=st.booleans(), seed=st.integers(0, 2**31),
       lengths=st.lists(st.integers(1, 14), min_size=3, max_size=3), features=st.booleans())
def test_batched_verify_equals_solo(arch, fp32, seed, lengths, features):
    dtype = torch.float32 if fp32 else torch.float64
    t = target(arch, dtype)
    layers = LAYERS if features else ()
    room = t.open_batch(4, layers)
    assert room.batched and room.capacity == 4 and "one" in room.note
    rng = random.Random(seed)
    pairs = twins(room, t, rng, lengths, layers)
    trees = [random_tree(rng, root, rng.randrange(1, 10)) for _, _, root in pairs]
    outs = room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
    assert len(outs) == 3
    for (a, b, _), tree, out in zip(pairs, trees, outs):
        ref = b.verify(tree)
        assert_same_out(out, ref, dtype)
        assert a.past == b.past  # verify commits nothing
        a.rollback(tree.size)
        b.rollback(tree.size)
        assert_same_cache(a, b, dtype)


def test_all_requests_without_a_prefix():
    """Every prompt a single token: nothing cached anywhere, the batched cache starts empty."""
    t = target()
    room = t.open_batch(3, LAYERS)
    rng = random.Random(1)
    pairs = twins(room, t, rng, [1, 1, 1])
    trees = [random_tree(rng, root, size) for (_, _, root), size in zip(pairs, [1, 5, 3])]
    outs = room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
    for (a, b, _), tree, out in zip(pairs, trees, outs):
        assert_same_out(out, b.verify(tree), torch.float64)


# ---------------------------------------------------------------------- 2: caches stay right
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generation_continues_like_solo(arch, dtype):
    """Rounds of batched verify + keep(path) (the path's rows moved into place) give the same caches as solo
    verify + keep; solo verify, solo prefill and rollback keep working on the batched sessions afterwards."""
    t = target(arch, dtype)
    room = t.open_batch(3, LAYERS)
    rng = random.Random(7)
    pairs = twins(room, t, rng, [6, 11, 2])
    roots = [root for _, _, root in pairs]
    for round_ in range(4):
        trees = [random_tree(rng, root, rng.randrange(1, 9)) for root in roots]
        outs = room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
        for i, ((a, b, _), tree, out) in enumerate(zip(pairs, trees, outs)):
            assert_same_out(out, b.verify(tree), dtype)
            path = random_path(rng, tree)
            a.keep(path, tree.size)
            b.keep(path, tree.size)
            assert_same_cache(a, b, dtype)
            roots[i] = rng.randrange(VOCAB)  # the next root: the token the target would add
        if round_ == 1:  # a solo forward in between
            a, b, _ = pairs[0]
            extra = [rng.randrange(VOCAB) for _ in range(3)]
            a.prefill(extra)
            b.prefill(extra)
            tree = random_tree(rng, roots[0], 4)
            assert_same_out(a.verify(tree), b.verify(tree), dtype)
            a.rollback(tree.size)
            b.rollback(tree.size)
            assert_same_cache(a, b, dtype)
    for (a, b, _), root in zip(pairs, roots):  # finally each alone
        tree = random_tree(rng, root, 5)
        assert_same_out(a.verify(tree), b.verify(tree), dtype)


def test_rollback_after_batched_verify_restores_the_state():
    from specframe.plugins.hf import _kv_tensors

    t = target()
    room = t.open_batch(3)
    rng = random.Random(3)
    pairs = twins(room, t, rng, [4, 9, 1], ())
    before = [[(k.clone(), v.clone()) for k, v in _kv_tensors(a.cache)] for a, _, _ in pairs]
    pasts = [a.past for a, _, _ in pairs]
    trees = [random_tree(rng, root, size) for (_, _, root), size in zip(pairs, [6, 2, 8])]
    room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
    for (a, _, _), tree, past in zip(pairs, trees, pasts):
        assert all(k.shape[-2] == past + tree.size for k, _ in _kv_tensors(a.cache))
        a.rollback(tree.size)
    for (a, b, _), saved, past in zip(pairs, before, pasts):
        assert a.past == past
        now = [(k, v) for k, v in _kv_tensors(a.cache) if k.shape[-2]]  # an empty cache may now hold 0-row tensors
        assert len(now) == len(saved)
        for (k, v), (k0, v0) in zip(now, saved):
            assert torch.equal(k, k0) and torch.equal(v, v0)
    # and a second batched round after the rollback equals solo
    outs = room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
    for (a, b, _), tree, out in zip(pairs, trees, outs):
        assert_same_out(out, b.verify(tree), torch.float64)


def test_a_session_with_uncommitted_rows_is_refused():
    t = target()
    room = t.open_batch(2)
    rng = random.Random(5)
    (a, _, ra), (c, _, rc) = twins(room, t, rng, [5, 3], ())
    a.verify(random_tree(rng, ra, 3))  # not kept nor rolled back
    with pytest.raises(SpecframeError, match="keep"):
        room.verify([(a, random_tree(rng, ra, 2)), (c, random_tree(rng, rc, 2))])


def test_capacity_and_duplicates():
    t = target()
    room = t.open_batch(2)
    rng = random.Random(6)
    pairs = twins(room, t, rng, [2, 3, 4], ())
    trees = [random_tree(rng, root, 2) for _, _, root in pairs]
    with pytest.raises(SpecframeError, match="capacity"):
        room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
    with pytest.raises(SpecframeError, match="twice"):
        room.verify([(pairs[0][0], trees[0]), (pairs[0][0], trees[0])])
    assert room.verify([]) == []
    with pytest.raises(SpecframeError):
        t.open_batch(0)


# ---------------------------------------------------------------------- 3: one request is the solo forward
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_request_is_solo_exactly(dtype):
    t = target("llama", dtype)
    room = t.open_batch(4, LAYERS)
    rng = random.Random(2)
    [(a, b, root)] = twins(room, t, rng, [8])
    tree = random_tree(rng, root, 7)
    [out] = room.verify([(a, tree)])
    ref = b.verify(tree)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.features, ref.features)


# ---------------------------------------------------------------------- 4: features per request
def test_features_per_request_match_solo():
    t = target("qwen2")
    for layers in [(1,), (0, 1)]:
        room = t.open_batch(3, layers)
        rng = random.Random(len(layers))
        pairs = twins(room, t, rng, [3, 7, 10], layers)
        trees = [random_tree(rng, root, size) for (_, _, root), size in zip(pairs, [4, 1, 6])]
        outs = room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
        for (a, b, _), tree, out in zip(pairs, trees, outs):
            ref = b.verify(tree)
            assert out.features.shape == (tree.size, len(layers) * t.hidden_size)
            torch.testing.assert_close(out.features, ref.features, atol=1e-10, rtol=0)
    room = t.open_batch(2)  # no feature layers: none come back
    pairs = twins(room, t, random.Random(0), [3, 5], ())
    outs = room.verify([(a, random_tree(random.Random(1), root, 3)) for a, _, root in pairs])
    assert all(out.features is None for out in outs)
    with pytest.raises(SpecframeError):
        t.open_batch(2, (t.num_layers,))


# ---------------------------------------------------------------------- 5: fallback states its reason
@pytest.mark.parametrize("arch", ["mistral-sw", "gemma2-sw"])
def test_sliding_window_models_fall_back_and_say_why(arch):
    from specframe import Target

    t = Target(make_tiny_model(arch), TinyTokenizer(), f"tiny-{arch}")
    room = t.open_batch(3)
    assert not room.batched
    assert "sliding-window" in room.note and "not batched" in room.note
    rng = random.Random(4)
    pairs = twins(room, t, rng, [3, 6, 2], ())
    trees = [random_tree(rng, root, size) for (_, _, root), size in zip(pairs, [3, 4, 2])]
    outs = room.verify([(a, tree) for (a, _, _), tree in zip(pairs, trees)])
    for (a, b, _), tree, out in zip(pairs, trees, outs):
        assert torch.equal(out.logits, b.verify(tree).logits)
