"""A linear cost model for specframe: C(n; c) = a + b·n + e·c seconds.

n is the number of tree tokens verified in one forward (root included), c the number of tokens
already in the target's KV cache. BASTION asks the cost model for C(n) and C(n + 1) while it grows a
tree; with this model the marginal cost of one more node is the constant b, so BASTION keeps adding
the next node (acceptance probability p) while p·(D + C(n)) > S·b.
"""

from __future__ import annotations

import specframe


class LinearCost(specframe.CostModel):
    """C(n; c) = a + b·n + e·c (seconds). Fixed parameters; set them with --set a=... b=... e=..."""

    name = "example-linear"

    def __init__(self, a: float = 0.02, b: float = 0.001, e: float = 0.0):
        if min(a, b, e) < 0:
            raise ValueError(f"a, b and e must be >= 0, got {a}, {b}, {e}")
        self.a, self.b, self.e = float(a), float(b), float(e)
        self.observed = 0  # measured verifications seen (see observe)

    def predict(self, n: int, context: int) -> float:
        return self.a + self.b * n + self.e * context

    def observe(self, n: int, context: int, seconds: float) -> None:
        # Called after every verification with the measured time. A learning model would refit here;
        # this one only counts, so its predictions stay exactly what you configured.
        self.observed += 1


@specframe.hookimpl
def register_cost_models(register):
    register("example-linear", LinearCost)
