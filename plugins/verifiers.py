"""Built-in verifiers: ``greedy`` and ``sample``. Both are exactly lossless for any tree.

``sample`` draws y ~ p at the current node (p = the target's distribution after temperature / top-k /
top-p) and descends if y is one of the node's children; the first y that is not a child is the bonus.
Every committed token is therefore a fresh draw from the target's own conditional distribution, so the
output is distributed exactly as plain sampling, whatever the tree.
"""

from __future__ import annotations

import torch

from specframe import hookimpl
from specframe.components import SamplingParams, Sampler, Verdict, Verifier
from specframe.components import target_probs
from specframe.tree import Tree


def _argmax(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first one on ties, as torch's). On the CPU numpy's is several times faster
    than torch's over a large vocabulary (measured ≈ 6 µs against ≈ 45 µs for 49,152 logits)."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and not logits.requires_grad:
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def _child_index(tree: Tree) -> list[dict[int, int]]:
    """children[i] = {token: child node index} for every node."""
    kids: list[dict[int, int]] = [{} for _ in range(tree.size)]
    for i, (p, tok) in enumerate(zip(tree.parent_list[1:], tree.token_list[1:]), start=1):
        kids[p][tok] = i
    return kids


class GreedyVerifier(Verifier):
    """Descend while the child equals the target's argmax; the bonus is the argmax where it stops."""

    name = "greedy"

    def verify(self, tree: Tree, logits: torch.Tensor, rng: Sampler) -> Verdict:
        best = _argmax(logits)
        kids = _child_index(tree)
        node, path = 0, [0]
        while best[node] in kids[node]:
            node = kids[node][best[node]]
            path.append(node)
        return Verdict(path, best[node])


class SampleVerifier(Verifier):
    """Temperature / top-k / top-p sampling, exactly lossless (see module docstring)."""

    name = "sample"

    def __init__(self, sampling: SamplingParams | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None):
        base = sampling or SamplingParams(temperature=1.0)
        self.params = SamplingParams(
            temperature=base.temperature if temperature is None else temperature,
            top_k=base.top_k if top_k is None else top_k,
            top_p=base.top_p if top_p is None else top_p,
        )
        if self.params.greedy:
            raise ValueError("the sample verifier needs temperature > 0 (use the greedy verifier for 0)")

    def verify(self, tree: Tree, logits: torch.Tensor, rng: Sampler) -> Verdict:
        kids = _child_index(tree)
        node, path = 0, [0]
        while True:
            y = rng.categorical(target_probs(logits[node], self.params))
            if y not in kids[node]:
                return Verdict(path, y)
            node = kids[node][y]
            path.append(node)


@hookimpl
def register_verifiers(register):
    register("greedy", GreedyVerifier)
    register("sample", SampleVerifier)
