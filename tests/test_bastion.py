"""BASTION: the adaptive stopping rule, online roofline calibration, the calibrated surrogate, and the
policy end to end on tiny targets (greedy parity, learning that a drafter is useless, tree sizes under
measured vs steep cost curves, bad plugin output).

Everything here is CPU-only and small: tiny random models from ``conftest``, synthetic timings, small
hypothesis example counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specframe import SpecGenerator
from specframe.components import (
    AcceptanceSurrogate,
    CostModel,
    Drafter,
    EmptyDraft,
    ExpansionContext,
    MarginalDraft,
)
from specframe.errors import PluginError, SpecframeError
from specframe.plugins.cost_models import ConstantCost, ProfileCost, Roofline
from specframe.plugins.expansion import AdaptiveBestFirst, BestFirst
from specframe.plugins.surrogates import Calibrated, PathConfidence
from specframe.tree import Tree, validate_tree

from conftest import make_tiny_model, new_target, plain_greedy

VOCAB = 64
# measured on an H200 (Qwen3-8B, bf16): its c = 256 row, copied from the shared profiles into the repo
PROFILE = Path(__file__).resolve().parent / "data" / "verify_qwen3-8b_h200_c256.json"


# ---------------------------------------------------------------------- helpers
class CurveCost(CostModel):
    """C(n) from a plain function of the tree size; ignores the context."""

    name = "curve"

    def __init__(self, fn):
        self.fn = fn

    def predict(self, n: int, context: int) -> float:
        return float(self.fn(n))


def marginal(probs: np.ndarray, tokens: np.ndarray | None = None, source: int = 0) -> MarginalDraft:
    """A MarginalDraft from a (D, K) array of probabilities (tokens distinct within each row)."""
    d, k = probs.shape
    if tokens is None:
        tokens = np.array([[(7 * row + j) % VOCAB for j in range(k)] for row in range(d)])
    return MarginalDraft(torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(np.log(probs)), source=source)


def ctx_for(cost: CostModel, max_nodes: int = 10_000, max_depth: int = 64, draft_s: float = 0.0,
            surrogate: AcceptanceSurrogate | None = None, context: int = 100) -> ExpansionContext:
    return ExpansionContext(root_token=1, context_len=context, max_nodes=max_nodes, max_depth=max_depth,
                            surrogate=surrogate or PathConfidence(), cost_model=cost, draft_seconds=draft_s)


def objective(scores: list[float], cost_fn, d: float) -> list[float]:
    """obj[n-1] = (Σ P over the first n nodes, root's 1 included) / (D + C(n)) for every prefix size n."""
    s, out = 0.0, []
    for n, p in enumerate(scores, start=1):
        s += p
        out.append(s / (d + cost_fn(n)))
    return out


def check_tree(built, ctx: ExpansionContext, node_cap: int) -> None:
    tree = built.tree
    validate_tree(tree, VOCAB, "test")
    assert int(tree.tokens[0]) == ctx.root_token
    assert tree.size - 1 <= min(node_cap, ctx.max_nodes)
    assert tree.max_depth <= ctx.max_depth
    assert len(built.scores) == tree.size and built.scores[0] == 1.0
    assert all(0.0 <= p <= 1.0 for p in built.scores)


def same_prefix(built, order, size: int) -> bool:
    return (built.tree.tokens.tolist() == order.tree.tokens[:size].tolist()
            and built.tree.parents.tolist() == order.tree.parents[:size].tolist())


# ---------------------------------------------------------------------- 1. stopping rule optimality
@st.composite
def marginal_problems(draw):
    depth = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    weights = draw(st.lists(st.floats(0.01, 1.0), min_size=depth * k, max_size=depth * k))
    masses = draw(st.lists(st.floats(0.05, 1.0), min_size=depth, max_size=depth))
    w = np.array(weights).reshape(depth, k)
    probs = w / w.sum(1, keepdims=True) * np.array(masses)[:, None]
    perm = draw(st.permutations(list(range(16))))
    tokens = np.array([[(perm[j] + 16 * (row % 4)) for j in range(k)] for row in range(depth)])
    return probs, tokens


# Hard bounds: usually loose (so the stopping rule decides), sometimes tight.
BOUND_NODES = st.one_of(st.just(300), st.integers(1, 300))
BOUND_DEPTH = st.one_of(st.just(64), st.integers(1, 8))
CONVEX = ("quadratic", "roofline")
NONCONVEX = ("sqrt", "step", "stairs")


@st.composite
def cost_curves(draw, kinds):
    """C(n) in units of C's fixed part (the argmax of S / (D + C) is invariant to scaling D and C together)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "quadratic":  # 1 + b n + e n^2
        b, e = draw(st.floats(0.0, 1.0)), draw(st.floats(0.0, 0.05))
        fn = lambda n: 1.0 + b * n + e * n * n  # noqa: E731
    elif kind == "roofline":  # max of a flat (memory) line and a rising (compute) line
        b, a2 = draw(st.floats(1e-3, 1.0)), draw(st.floats(0.0, 1.0))
        fn = lambda n: max(1.0, a2 + b * n)  # noqa: E731
    elif kind == "sqrt":  # concave
        b = draw(st.floats(0.0, 2.0))
        fn = lambda n: 1.0 + b * math.sqrt(n)  # noqa: E731
    elif kind == "step":  # flat, one jump, flat again
        k, jump = draw(st.integers(1, 40)), draw(st.floats(0.01, 3.0))
        fn = lambda n: 1.0 + (jump if n > k else 0.0)  # noqa: E731
    else:  # a staircase (tile / wave quantisation)
        k, jump = draw(st.integers(1, 16)), draw(st.floats(0.01, 1.0))
        fn = lambda n: 1.0 + jump * (n // k)  # noqa: E731
    return kind, fn


def _run_stopping_rule(problem, curve, d_s, max_nodes, ctx_nodes, ctx_depth, patience):
    probs, tokens = problem
    kind, fn = curve
    draft = marginal(probs, tokens)
    ctx = ctx_for(CurveCost(fn), max_nodes=ctx_nodes, max_depth=ctx_depth, draft_s=d_s)
    # The whole best-first order within the same hard bounds.
    order = BestFirst(budget=max_nodes).expand(draft, ctx)
    sc = order.scores
    assert all(sc[i] >= sc[i + 1] for i in range(len(sc) - 1)), "best-first order must pop non-increasing P"
    obj = objective(sc, fn, d_s)
    best = max(obj)
    built = AdaptiveBestFirst(max_nodes=max_nodes, patience=patience).expand(draft, ctx)
    check_tree(built, ctx, max_nodes)
    size = built.tree.size
    assert same_prefix(built, order, size), "the tree must be a prefix of the best-first order"
    assert built.scores == pytest.approx(sc[:size])
    return obj, best, size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=marginal_problems(), curve=cost_curves(CONVEX), d_s=st.floats(0.0, 3.0),
       max_nodes=BOUND_NODES, ctx_nodes=BOUND_NODES, ctx_depth=BOUND_DEPTH)
def test_first_stop_is_optimal_for_convex_costs(problem, curve, d_s, max_nodes, ctx_nodes, ctx_depth):
    obj, best, size = _run_stopping_rule(problem, curve, d_s, max_nodes, ctx_nodes, ctx_depth, patience=0)
    assert obj[size - 1] >= best * (1 - 1e-9), (curve[0], size, obj.index(best) + 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=marginal_problems(), curve=cost_curves(CONVEX + NONCONVEX), d_s=st.floats(0.0, 3.0),
       max_nodes=BOUND_NODES, ctx_nodes=BOUND_NODES, ctx_depth=BOUND_DEPTH)
def test_full_patience_finds_global_optimum_for_any_cost(problem, curve, d_s, max_nodes, ctx_nodes, ctx_depth):
    obj, best, size = _run_stopping_rule(problem, curve, d_s, max_nodes, ctx_nodes, ctx_depth,
                                         patience=max_nodes + 1)
    assert obj[size - 1] >= best * (1 - 1e-9), (curve[0], size, obj.index(best) + 1)
    # ties go to the smallest tree
    assert all(v < obj[size - 1] * (1 + 1e-12) for v in obj[: size - 1])


class ConvexCurveCost(CurveCost):
    """A CurveCost that declares its curve convex from n = 1 on (as a roofline without a single-token path)."""

    convex_from = 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=marginal_problems(), curve=cost_curves(CONVEX), d_s=st.floats(0.0, 3.0),
       h=st.floats(0.0, 0.2), max_nodes=BOUND_NODES, ctx_nodes=BOUND_NODES, ctx_depth=BOUND_DEPTH)
def test_host_time_per_node_counts_and_a_declared_convex_cost_needs_no_look_ahead(problem, curve, d_s, h, max_nodes,
                                                                                  ctx_nodes, ctx_depth):
    """With ``node_seconds`` = h the tree maximises S / (D + C(n) + h·n) over the best-first prefixes; a cost
    model that declares its curve convex gets that optimum without the patience look-ahead (same tree as
    full patience, fewer nodes popped)."""
    probs, tokens = problem
    kind, fn = curve
    draft = marginal(probs, tokens)
    ctx = ctx_for(ConvexCurveCost(fn), max_nodes=ctx_nodes, max_depth=ctx_depth, draft_s=d_s)
    ctx.node_seconds = h
    order = BestFirst(budget=max_nodes).expand(draft, ctx)
    obj = objective(order.scores, lambda n: fn(n) + h * n, d_s)
    declared = AdaptiveBestFirst(max_nodes=max_nodes, patience=16).expand(draft, ctx)
    size = declared.tree.size
    assert same_prefix(declared, order, size)
    assert obj[size - 1] >= max(obj) * (1 - 1e-9), (kind, size, obj.index(max(obj)) + 1)
    full = AdaptiveBestFirst(max_nodes=max_nodes, patience=max_nodes + 1).expand(draft, ctx)
    assert full.tree.size == size


def test_host_time_per_node_shrinks_trees_on_a_flat_device_curve():
    """Verification is free up to hundreds of tokens (a big GPU), but each node costs the host 1 % of a
    forward: the tree stops where a node's P no longer pays for that, instead of at the budget."""
    probs = np.full((8, 8), 0.1)
    flat = ctx_for(ConstantCost(0.04), max_depth=8)
    free = AdaptiveBestFirst(max_nodes=512).expand(marginal(probs), flat)
    flat.node_seconds = 0.0004
    paid = AdaptiveBestFirst(max_nodes=512).expand(marginal(probs), flat)
    assert free.tree.size == 513  # up to the budget: each node adds expected tokens at no cost
    assert 1 < paid.tree.size < 30
    s = lambda b: sum(b.scores)  # noqa: E731
    assert s(paid) / (0.04 + 0.0004 * paid.tree.size) > s(free) / (0.04 + 0.0004 * free.tree.size)


def test_host_cost_fits_fixed_and_per_node_seconds():
    from specframe.fit import HostCost

    rng = np.random.default_rng(0)
    host = HostCost()
    assert host.fixed == 0.0 and host.per_node == 0.0
    for _ in range(300):
        n = int(rng.integers(1, 60))
        host.observe(n, 0.002 + 0.00005 * n + rng.normal(0, 0.0002))
    assert host.per_node == pytest.approx(0.00005, rel=0.15)
    assert host.fixed == pytest.approx(0.002, rel=0.15)
    for _ in range(200):  # every tree the same size: nothing to fit a slope on, the last one is kept
        host.observe(20, 0.002 + 0.00005 * 20)
    slope = host.per_node
    assert slope == pytest.approx(0.00005, rel=0.15)
    host.observe(20, 0.002 + 0.00005 * 20)
    assert host.per_node == slope and host.fixed + 20 * slope == pytest.approx(0.003, rel=1e-3)
    for _ in range(300):  # time falls with size (noise, another load): never a negative slope
        n = int(rng.integers(1, 60))
        host.observe(n, 0.01 - 0.0001 * n)
    assert host.per_node == 0.0
    host.observe(5, float("nan"))
    host.observe(5, -1.0)
    assert host.per_node == 0.0 and math.isfinite(host.fixed)
    # every tree filled to the same budget from the start (a flat device curve, h believed 0): no slope
    # can be fitted, so big trees stand in with their seconds per node, and the tree can start to shrink
    full = HostCost()
    for _ in range(10):
        full.observe(257, 0.001 + 0.00003 * 257)
    assert full.per_node == pytest.approx((0.001 + 0.00003 * 257) / 257)
    small = HostCost()
    for _ in range(10):  # small trees say little per node: no stand-in from them
        small.observe(4, 0.001 + 0.00003 * 4)
    assert small.per_node == 0.0


def test_patience_steps_over_a_bump_in_the_cost_curve():
    """A confident chain and a cost that jumps once then stays flat: the first stop is a local optimum;
    patience looks past the jump to the much better big tree."""
    probs = np.full((30, 1), 0.99)
    fn = lambda n: 1.0 if n <= 4 else 2.0  # noqa: E731
    ctx = ctx_for(CurveCost(fn))
    greedy_stop = AdaptiveBestFirst(max_nodes=64, patience=0).expand(marginal(probs), ctx)
    patient = AdaptiveBestFirst(max_nodes=64, patience=40).expand(marginal(probs), ctx)
    assert greedy_stop.tree.size == 4
    assert patient.tree.size == 31  # the whole chain
    rate = lambda b: sum(b.scores) / fn(b.tree.size)  # noqa: E731
    assert rate(patient) > 3 * rate(greedy_stop)


STEPPED = ("step", "stairs")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=marginal_problems(), curve=cost_curves(STEPPED), d_s=st.floats(0.0, 3.0), h=st.floats(0.0, 0.05),
       max_nodes=BOUND_NODES, ctx_nodes=BOUND_NODES, ctx_depth=BOUND_DEPTH)
def test_never_below_a_fixed_budget_on_a_step_shaped_cost(problem, curve, d_s, h, max_nodes, ctx_nodes, ctx_depth):
    """On a step-shaped latency curve (flat, then a jump, then flat: a GPU's tile or wave quantisation) and
    a per-node host time, the tree's expected rate S / (D + C(n) + h·n) is never below the best fixed
    budget it could have chosen (best-first:k for any k within the bounds): on a plateau a node costs only
    h, so the marginal rule keeps going past the step, and the default patience covers the jump itself."""
    probs, tokens = problem
    kind, fn = curve
    draft = marginal(probs, tokens)
    ctx = ctx_for(CurveCost(fn), max_nodes=ctx_nodes, max_depth=ctx_depth, draft_s=d_s)
    ctx.node_seconds = h
    cost = lambda n: fn(n) + h * n  # noqa: E731
    rate = lambda b: sum(b.scores) / (d_s + cost(b.tree.size))  # noqa: E731
    order = BestFirst(budget=max_nodes).expand(draft, ctx)
    built = AdaptiveBestFirst(max_nodes=max_nodes).expand(draft, ctx)
    check_tree(built, ctx, max_nodes)
    assert same_prefix(built, order, built.tree.size)
    best_fixed = max(objective(order.scores, cost, d_s))  # best-first:k is the prefix of k + 1 nodes
    assert rate(built) >= best_fixed * (1 - 1e-9), (kind, built.tree.size)
    for k in {min(k, max_nodes) for k in (1, 4, 16, 64, max_nodes)}:  # the fixed-budget policy itself
        assert rate(built) >= rate(BestFirst(budget=k).expand(draft, ctx)) * (1 - 1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=marginal_problems(), cap=st.floats(0.05, 0.4), d_s=st.floats(0.0, 0.5), slope=st.floats(0.9, 1.5),
       single=st.floats(0.6, 1.0), h=st.floats(0.0, 0.05))
def test_cpu_like_linear_cost_low_confidence_drafts_stay_at_the_root(problem, cap, d_s, slope, single, h):
    """A CPU, where n tree tokens cost nearly n forwards (a faster single-token path at n = 1), and drafts
    whose tokens are accepted at most ``cap`` < 0.4 each: no tree beats the root alone."""
    probs, tokens = problem
    probs = np.minimum(probs, cap)
    fn = lambda n: single if n == 1 else slope * n  # noqa: E731  (seconds, in units of one forward)
    ctx = ctx_for(CurveCost(fn), draft_s=d_s)
    ctx.node_seconds = h
    built = AdaptiveBestFirst(max_nodes=256).expand(marginal(probs, tokens), ctx)
    assert built.tree.size == 1


def test_min_nodes_and_hard_bounds():
    probs = np.full((6, 4), 0.2)  # not worth anything under a steep cost
    steep = CurveCost(lambda n: 0.01 * n)
    ctx = ctx_for(steep, max_nodes=50, max_depth=3)
    assert AdaptiveBestFirst(patience=0).expand(marginal(probs), ctx).tree.size == 1
    forced = AdaptiveBestFirst(patience=0, min_nodes=5).expand(marginal(probs), ctx)
    assert forced.tree.size >= 6
    flat = ctx_for(ConstantCost(0.1), max_nodes=7, max_depth=2)
    built = AdaptiveBestFirst(max_nodes=100).expand(marginal(np.full((6, 4), 0.24)), flat)
    check_tree(built, flat, 100)
    assert built.tree.size == 8 and built.tree.max_depth <= 2
    built = AdaptiveBestFirst(max_nodes=3).expand(marginal(np.full((6, 4), 0.24)), ctx_for(ConstantCost(0.1)))
    assert built.tree.size == 4


# ---------------------------------------------------------------------- 2. roofline online calibration
def _small_config():
    import transformers

    # SmolLM2-like proportions, shrunk so weights and KV cache both matter in the byte count
    return transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4)


def _machine(roof: Roofline, ac, bc, am, bm):
    def seconds(n: int, c: int) -> float:
        f, m = roof.features(n, c)
        return max(ac * f + bc, am * m + bm)

    return seconds


def _draw_points(rng, k):
    n = np.round(np.exp(rng.uniform(0, np.log(256), k))).astype(int)  # log-uniform 1..256
    c = rng.integers(0, 4096, k)
    return [(int(a), int(b)) for a, b in zip(n, c)]


GRID = [(n, c) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) for c in (0, 512, 2048, 4000)]


def test_roofline_calibrates_online_and_tracks_a_changed_machine():
    roof = Roofline(config=_small_config(), device="cpu", window=256, half_life=128, refit_every=4)
    truth = dict(alpha_c=3.0, beta_c=1e-3, alpha_m=2.0, beta_m=5e-4)
    true_t = _machine(roof, *truth.values())
    rng = np.random.default_rng(0)
    points = _draw_points(rng, 300)
    compute = [roof.features(n, c)[0] * 3.0 + 1e-3 >= roof.features(n, c)[1] * 2.0 + 5e-4 for n, c in points]
    assert 0.2 < np.mean(compute) < 0.8, "both branches must be active in the data"
    for n, c in points:
        t = true_t(n, c) * (1 + rng.normal(0, 0.02))
        if rng.random() < 0.05:
            t *= 5.0  # gross outlier (a GC pause, a context switch)
        roof.observe(n, c, t)
    roof.refit()
    fitted = roof.parameters()
    for key, value in truth.items():
        assert fitted[key] == pytest.approx(value, rel=0.15), (key, fitted)
    for key in ("alpha_c", "alpha_m"):
        assert fitted[key] == pytest.approx(truth[key], rel=0.05), (key, fitted)
    for n, c in GRID:
        assert roof.predict(n, c) == pytest.approx(true_t(n, c), rel=0.05), (n, c)

    # The machine changes: memory becomes 2x slower. Within one window of new observations the model
    # must follow it.
    slow = _machine(roof, 3.0, 1e-3, 4.0, 5e-4)
    mem_bound = [(n, c) for n, c in GRID if n <= 4]
    assert all(abs(roof.predict(n, c) / slow(n, c) - 1) > 0.3 for n, c in mem_bound)
    for n, c in _draw_points(rng, 256):
        roof.observe(n, c, slow(n, c) * (1 + rng.normal(0, 0.02)))
    roof.refit()
    for n, c in GRID:
        assert roof.predict(n, c) == pytest.approx(slow(n, c), rel=0.05), (n, c, roof.parameters())
    assert roof.parameters()["alpha_m"] == pytest.approx(4.0, rel=0.1)


def _fit_on_a_flat_gpu_curve(branch_fit: str) -> Roofline:
    """A roofline calibrated as at start-up on the H200 profile (flat from n = 4 to 512, one step between
    n = 2 and 4), then fed what BASTION's first steps verify there: trees of 9-16 nodes, some plain steps."""
    import json

    import transformers

    prof = ProfileCost(str(PROFILE))
    rng = np.random.default_rng(1)
    data = json.loads((PROFILE.parent / "smollm2_cpu_steps.json").read_text())  # the simulations' roofline shape
    config = transformers.LlamaConfig(**{k: v for k, v in data["config"].items() if k != "model_type"})
    roof = Roofline(config=config, device="cpu", branch_fit=branch_fit)
    roof.calibrate(lambda n: prof.predict(n, 100), 100)
    for i in range(60):
        n = 1 if i % 7 == 0 else int(rng.integers(9, 17))
        c = int(rng.integers(120, 250))
        roof.observe(n, c, prof.predict(n, c))
    return roof


def test_roofline_stays_flat_on_a_step_shaped_gpu_curve():
    """The branch fit keeps the pair of lines of lowest loss and so settles on the flat curve; the plain
    alternation it replaces (``branch_fit="alternate"``) cycled between two poor pairs and kept a compute
    line sloping up through sizes never observed, so BASTION's trees stopped at a fraction of the size
    the device verifies at no extra cost (the H200 simulation's first ~250 MT-Bench steps)."""
    prof = ProfileCost(str(PROFILE))
    new, old = _fit_on_a_flat_gpu_curve("descent"), _fit_on_a_flat_gpu_curve("alternate")
    for n in (16, 64, 256, 512):
        assert new.predict(n, 200) == pytest.approx(prof.predict(n, 200), rel=0.02), n
    assert old.predict(256, 200) > 1.2 * prof.predict(256, 200)  # what the old fit predicted
    draft, d_s, h = _oracle_draft(depth=10, k=8, top=0.6), 0.006, 2.7e-5
    sizes, rates = {}, {}
    for kind, roof in (("new", new), ("old", old)):
        ctx = ctx_for(roof, max_nodes=512, draft_s=d_s, context=200)
        ctx.node_seconds = h
        built = AdaptiveBestFirst(max_nodes=512).expand(draft, ctx)
        n = built.tree.size
        sizes[kind], rates[kind] = n, sum(built.scores) / (d_s + prof.predict(n, 200) + h * n)
    assert sizes["new"] > 2 * sizes["old"] and rates["new"] > rates["old"], (sizes, rates)
    with pytest.raises(ValueError):
        Roofline(config=_small_config(), device="cpu", branch_fit="newton")


def test_roofline_branch_fit_never_raises_the_window_loss():
    from specframe.fit import relative_huber_loss

    rng = np.random.default_rng(2)
    for trial in range(20):
        roof = Roofline(config=_small_config(), device="cpu")
        truth = _machine(roof, *rng.uniform(0.5, 4.0, 1), 1e-3, *rng.uniform(0.5, 4.0, 1), 5e-4)
        pts = _draw_points(rng, 64)
        f, m = (np.array([roof.features(n, c)[i] for n, c in pts]) for i in (0, 1))
        step = np.array([n >= 4 for n, _ in pts]) * rng.uniform(0, 3e-3)  # a step the two lines cannot follow
        t = np.array([truth(n, c) for n, c in pts]) * (1 + rng.normal(0, 0.05, len(pts))) + step
        w = np.ones(len(t))
        start = tuple(rng.uniform(0, 3, 4) * np.array([1, 1e-3, 1, 1e-3]))
        loss = lambda q: relative_huber_loss(1.0, 0.0, np.maximum(q[0] * f + q[1], q[2] * m + q[3]), t, w)  # noqa: E731
        assert loss(roof.fit_branches(f, m, t, w, start)) <= loss(start) + 1e-12, trial


def test_roofline_ignores_bad_timings_and_needs_a_config():
    roof = Roofline(config=_small_config(), device="cpu")
    before = roof.parameters()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        roof.observe(4, 100, bad)
    roof.refit()
    assert roof.parameters() == before
    f, m = roof.features(8, 100)
    assert f > 0 and m > 0 and roof.predict(8, 100) == pytest.approx(max(f, m))
    with pytest.raises(ValueError):
        Roofline(device="cpu")
    with pytest.raises(ValueError):
        Roofline(config=_small_config(), device="no-such-device")


# ---------------------------------------------------------------------- 3. calibrated surrogate convergence
# True conditional acceptance f_d(q) of a node given its parent was accepted (different per depth), and a
# "complement" q' with f_d(q) + f_d(q') = 1: a source-1 sibling whose acceptance covers the remaining
# outcomes (siblings are mutually exclusive under greedy verification), so the walk always goes on. Source 0's
# q is uniform, so its bin averages of f sit at the bin centres; source 1's q is skewed and not checked.
TRUE_F = {1: lambda q: q * q, 2: lambda q: q * (2 - q), 3: lambda q: 0.5 * q}
COMPLEMENT = {1: lambda q: math.sqrt(1 - q * q), 2: lambda q: 1 - math.sqrt(1 - (1 - q) ** 2), 3: None}


def _walk_tree(rng, depths=3):
    """One verified tree and its accepted path: at every depth the accepted node has two children (source
    0 with q uniform, source 1 with the complement q), one of which is accepted with probability f_d(q)
    (exclusive); the rejected sibling gets a child too, which must not count (its parent was rejected)."""
    tokens, parents, logq, sources = [0], [-1], [0.0], [0]

    def add(parent, tok, q, src):
        tokens.append(tok), parents.append(parent), logq.append(math.log(q)), sources.append(src)
        return len(tokens) - 1

    path, node = [0], 0
    for d in range(1, depths + 1):
        f = TRUE_F[d]
        q0 = rng.uniform(0.0, 1.0)
        q1 = COMPLEMENT[d](q0) if COMPLEMENT[d] else rng.uniform(0.0, 1.0)
        q0, q1 = (min(max(q, 1e-6), 1 - 1e-9) for q in (q0, q1))
        kids = [add(node, 1, q0, 0), add(node, 2, q1, 1)]
        fs = [f(q0), f(q1)]
        u = rng.random()
        chosen = kids[0] if u < fs[0] else kids[1] if u < fs[0] + fs[1] else None
        for kid in kids:
            if kid != chosen and d < depths:
                add(kid, 3, rng.uniform(0.01, 0.99), 0)  # child of a rejected node: says nothing
        if chosen is None:
            break
        path.append(chosen)
        node = chosen
    return Tree.from_lists(tokens, parents, logq, sources), path


def test_calibrated_starts_as_path_confidence():
    cal, pc = Calibrated(), PathConfidence()
    from specframe.components import Candidate

    for q in (0.01, 0.2, 0.5, 0.77, 0.999):
        for depth in (1, 3, 20):
            assert cal.rate(0, depth, q) == q
            cand = Candidate(5, math.log(q), None, 0)
            assert cal.score(0.6, depth, cand) == pytest.approx(pc.score(0.6, depth, cand))


def test_calibrated_converges_to_true_conditional_acceptance():
    rng = np.random.default_rng(1)
    cal = Calibrated(bins=5, decay=1.0)  # no forgetting: a pure convergence check
    forgetful = Calibrated(bins=5)  # the default decay caps the effective sample size (~1000 trees)
    for _ in range(5000):
        tree, path = _walk_tree(rng)
        cal.observe(tree, path, [1.0] * tree.size)
        forgetful.observe(tree, path, [1.0] * tree.size)
    for depth, f in TRUE_F.items():
        for centre in cal.centres:
            assert cal.rate(0, depth, centre) == pytest.approx(f(centre), abs=0.05), (depth, centre)
            assert forgetful.rate(0, depth, centre) == pytest.approx(f(centre), abs=0.1), (depth, centre)
    # another source never seen: still the prior (path confidence)
    assert cal.rate(3, 1, 0.35) == 0.35
    # learnt rates are monotone in q
    for depth in TRUE_F:
        rates = [cal.rate(0, depth, c) for c in cal.centres]
        assert rates == sorted(rates)


def test_calibrated_ignores_children_of_rejected_nodes():
    cal = Calibrated(bins=4, decay=1.0)
    # root -> a (q .9) -> b (q .9); root -> c (q .9). Only a accepted; b rejected.
    tree = Tree.from_lists([0, 1, 2, 3], [-1, 0, 1, 0], [0.0, math.log(0.9), math.log(0.9), math.log(0.9)])
    for _ in range(200):
        cal.observe(tree, [0, 1], [1.0] * 4)
    assert cal.rate(0, 1, 0.9) == pytest.approx(0.5, abs=0.02)  # a always hit, c always missed
    assert cal.rate(0, 2, 0.9) < 0.05  # b: parent accepted, b never
    cal2 = Calibrated(bins=4)
    for _ in range(50):
        cal2.observe(tree, [0], [1.0] * 4)  # nothing accepted: depth-2 node says nothing
    assert (0, 2) not in cal2.rates  # no depth-2 statistics were learned from children of rejected nodes
    assert cal2.rate(0, 2, 0.9) == cal2.rate(0, 1, 0.9) < 0.1  # an unseen depth borrows the shallower one


# ---------------------------------------------------------------------- 4. BASTION end to end
PROMPT = [3, 14, 15, 9, 2, 6, 5, 3, 14, 15, 9, 2]


class FixedDrafter(Drafter):
    """Proposes the same confident marginal block every step, ignoring the context."""

    name = "fixed"

    def __init__(self, tokens: list[list[int]], top: float = 0.97):
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        d, k = self.tokens.shape
        row = [top] + [(1 - top) / max(k - 1, 1)] * (k - 1)
        self.logq = torch.tensor([row] * d, dtype=torch.float64).log()
        self.max_depth = d

    def propose(self, context_ids, max_depth):
        if max_depth <= 0:
            return EmptyDraft()
        return MarginalDraft(self.tokens[:max_depth], self.logq[:max_depth])


@pytest.fixture(scope="module")
def reference():
    return plain_greedy(make_tiny_model("llama"), PROMPT, 60)


def wrong_drafter(reference, depth=4, k=3) -> FixedDrafter:
    """Confident, and never right: its tokens never occur in the greedy continuation."""
    unused = [t for t in range(96) if t not in set(reference)]
    assert len(unused) >= depth * k
    return FixedDrafter([unused[i * k:(i + 1) * k] for i in range(depth)])


class LinearCost(CostModel):
    name = "linear"

    def __init__(self, a: float = 2.0, b: float = 1.0):
        self.a, self.b = a, b

    def predict(self, n, context):
        return self.a + self.b * n


@pytest.mark.parametrize("surrogate", ["default", "path-confidence", "object-pc", "object-cal"])
@pytest.mark.parametrize("drafter", ["ngram", "wrong"])
def test_bastion_greedy_parity(tiny_target, reference, drafter, surrogate):
    kwargs: dict = {}
    params = {}
    if surrogate == "path-confidence":
        params["surrogate"] = "path-confidence"
    elif surrogate == "object-pc":
        kwargs["surrogate"] = PathConfidence()
    elif surrogate == "object-cal":
        kwargs["surrogate"] = Calibrated(bins=5)
    d = "ngram" if drafter == "ngram" else wrong_drafter(reference)
    gen = SpecGenerator(tiny_target, "bastion", drafter=d, params=params, **kwargs)
    want = {"default": "calibrated", "path-confidence": "path-confidence", "object-pc": "path-confidence",
            "object-cal": "calibrated"}[surrogate]
    assert gen.components.names["surrogate"] == want
    assert gen.components.names["expansion"] == "adaptive-best-first"
    out = gen.generate(PROMPT, 30)
    assert out.token_ids == reference[:30]
    if surrogate == "object-pc":
        assert gen.components.surrogate is kwargs["surrogate"]


def test_calibrated_learns_a_useless_drafter_and_shrinks_the_tree(tiny_target, reference):
    sizes = {}
    for surrogate in ("calibrated", "path-confidence"):
        gen = SpecGenerator(tiny_target, "bastion", drafter=wrong_drafter(reference, depth=6),
                            params={"surrogate": surrogate, "expansion.gate": False}, cost_model=LinearCost())
        out = gen.generate(PROMPT, 60)
        assert out.token_ids == reference[:60]
        recs = out.stats.records
        assert all(r.accepted == 0 for r in recs)
        sizes[surrogate] = [r.tree_size for r in recs]
    cal, pc = sizes["calibrated"], sizes["path-confidence"]
    assert len(cal) == 60 and len(pc) == 60
    assert cal[0] == pc[0] > 2  # identical at first: the prior is path confidence
    assert np.mean(cal[-20:]) <= 2.0, cal
    assert np.mean(pc[-20:]) >= 5.0, pc


def _oracle_draft(depth=10, k=8, top=0.9) -> MarginalDraft:
    probs = np.array([[top] + [(1 - top) / (k - 1)] * (k - 1)] * depth)
    return marginal(probs, np.array([[(row * 5 + j) % VOCAB for j in range(k)] for row in range(depth)]))


def test_measured_gpu_profile_grows_hundreds_of_nodes_steep_cpu_curve_stays_small():
    prof = ProfileCost(str(PROFILE))
    assert prof.cs == [256] and prof.max_tokens == 1024
    assert prof.predict(1, 100) == prof.predict(1, 256)  # contexts below the table clamp
    assert prof.predict(512, 100) < 2 * prof.predict(1, 100)  # a flat device curve: 512 tokens cost < 2 × one
    draft = _oracle_draft()
    for draft_s in (0.0, 0.005):
        ctx = ctx_for(prof, max_nodes=1000, draft_s=draft_s, context=100)
        built = AdaptiveBestFirst(max_nodes=512).expand(draft, ctx)
        check_tree(built, ctx, 512)
        assert built.tree.size >= 256, built.tree.size
        assert built.tree.max_depth == 10
    # a CPU roofline for an 8B-class model: compute-bound after a handful of tokens
    import transformers

    cpu = Roofline(config=transformers.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                                   num_hidden_layers=36, num_attention_heads=32,
                                                   num_key_value_heads=8, head_dim=128), device="cpu")
    ctx = ctx_for(cpu, max_nodes=1000, context=100)
    small = AdaptiveBestFirst(max_nodes=512).expand(draft, ctx)
    check_tree(small, ctx, 512)
    assert 2 <= small.tree.size <= 32, small.tree.size


def test_steep_cost_keeps_trees_small_even_without_profile():
    draft = _oracle_draft()
    flat = AdaptiveBestFirst(max_nodes=512).expand(draft, ctx_for(ConstantCost(0.04)))
    steep = AdaptiveBestFirst(max_nodes=512).expand(draft, ctx_for(CurveCost(lambda n: 0.01 + 0.01 * n)))
    assert flat.tree.size == 513
    assert 2 <= steep.tree.size <= 16


# ---------------------------------------------------------------------- 5. bad plugin output
class ConstSurrogate(AcceptanceSurrogate):
    name = "bad-surrogate"

    def __init__(self, value):
        self.value = value

    def score(self, parent_p, depth, cand):
        return self.value


class ConstCost(CostModel):
    name = "bad-cost"

    def __init__(self, value):
        self.value = value

    def predict(self, n, context):
        return self.value


def _always(reference):
    return wrong_drafter(reference, depth=3, k=2)


@pytest.mark.parametrize("value", [1.5, -0.5, float("nan")])
def test_surrogate_out_of_range_names_the_plugin_best_first(tiny_target, reference, value):
    gen = SpecGenerator(tiny_target, "best-first", drafter=_always(reference), surrogate=ConstSurrogate(value))
    with pytest.raises(PluginError, match="bad-surrogate"):
        gen.generate(PROMPT, 5)


def test_surrogate_above_one_names_the_plugin_bastion(tiny_target, reference):
    gen = SpecGenerator(tiny_target, "bastion", drafter=_always(reference), surrogate=ConstSurrogate(1.5))
    with pytest.raises(PluginError, match="bad-surrogate"):
        gen.generate(PROMPT, 5)


@pytest.mark.parametrize("value", [-0.5, float("nan")])
def test_surrogate_nan_or_negative_names_the_plugin_bastion(tiny_target, reference, value):
    gen = SpecGenerator(tiny_target, "bastion", drafter=_always(reference), surrogate=ConstSurrogate(value))
    with pytest.raises(PluginError, match="bad-surrogate"):
        gen.generate(PROMPT, 5)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
@pytest.mark.parametrize("policy", ["bastion", "best-first"])
def test_cost_model_bad_prediction_names_the_plugin(tiny_target, reference, value, policy):
    gen = SpecGenerator(tiny_target, policy, drafter=_always(reference), cost_model=ConstCost(value))
    with pytest.raises(PluginError, match="bad-cost"):
        gen.generate(PROMPT, 5)


@pytest.mark.parametrize("params", [{"expansion.max_nodes": 0}, {"expansion.max_nodes": -3},
                                    {"expansion.patience": -1}, {"expansion.min_nodes": -1}])
def test_bad_adaptive_parameters_fail_at_construction(tiny_target, params):
    with pytest.raises(SpecframeError, match="adaptive-best-first"):
        SpecGenerator(tiny_target, "bastion", drafter="ngram", params=params)


def test_bad_adaptive_parameters_direct():
    with pytest.raises(ValueError):
        AdaptiveBestFirst(max_nodes=0)
    with pytest.raises(ValueError):
        AdaptiveBestFirst(patience=-1)
    with pytest.raises(ValueError):
        AdaptiveBestFirst(max_nodes=2.5)  # type: ignore[arg-type]
    with pytest.raises(SpecframeError, match="adaptive-best-first"):
        SpecGenerator(new_target("llama"), "bastion:0", drafter="ngram")
