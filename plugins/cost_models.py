"""Built-in cost model ``constant``: every verification costs the same (tree size is free)."""

from __future__ import annotations

from specframe import hookimpl
from specframe.components import CostModel


class ConstantCost(CostModel):
    """C(n; c) = ``seconds`` for every n and c. Useful as a baseline and for tests."""

    name = "constant"

    def __init__(self, seconds: float = 0.1):
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.seconds = float(seconds)

    def predict(self, n: int, context: int) -> float:
        return self.seconds


@hookimpl
def register_cost_models(register):
    register("constant", ConstantCost)
