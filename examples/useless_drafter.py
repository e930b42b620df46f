"""BASTION with useless drafters vs plain decoding (`ar`), same process, greedy, outputs checked equal.

``always-wrong`` proposes <empty_output> (id 16, which the chat model never emits) with probability 1 at
every depth, at no draft cost. ``slow-wrong`` runs the shipped DFlash drafter (so it pays the real draft
time) and then proposes the same useless token. Two repeats over 5 MT-Bench prompts × 128 tokens, the
method order reversed in the second so that order effects cancel.

    python examples/useless_drafter.py        # ≈ 6 minutes on a 2-core CPU
"""

import torch

from specframe import Drafter, MarginalDraft, SpecGenerator, Target
from specframe.datasets import encode, load
from specframe.plugins.dflash import DFlashDrafter
from specframe.plugins.hf import quiet_transformers

USELESS = 16  # <empty_output>


def useless_block(depth: int) -> MarginalDraft:
    """(depth, 1) marginals: the useless token with probability 1."""
    return MarginalDraft(torch.full((depth, 1), USELESS), torch.zeros(depth, 1))


class AlwaysWrong(Drafter):
    name = "always-wrong"
    max_depth = 7

    def propose(self, context_ids, max_depth):
        return useless_block(max(min(max_depth, self.max_depth), 0))


class SlowWrong(Drafter):
    """Pays a real drafter's time, then discards its guesses."""

    name = "slow-wrong"

    def __init__(self, inner: Drafter):
        self.inner = inner
        self.feature_layers, self.max_depth = inner.feature_layers, inner.max_depth

    def start(self, prompt_ids, features):
        self.inner.start(prompt_ids, features)

    def commit(self, tokens, features):
        self.inner.commit(tokens, features)

    def propose(self, context_ids, max_depth):
        self.inner.propose(context_ids, max_depth)
        return useless_block(max(min(max_depth, self.max_depth), 0))


def main(num_prompts: int = 5, new_tokens: int = 128, repeats: int = 2) -> None:
    quiet_transformers()
    target = Target.load(None)
    gens = {
        "ar": SpecGenerator(target, "ar"),
        "bastion, always-wrong": SpecGenerator(target, "bastion", drafter=AlwaysWrong()),
        "bastion, slow-wrong": SpecGenerator(target, "bastion", drafter=SlowWrong(DFlashDrafter(target=target))),
    }
    prompts = [encode(p, target) for p in load("mt-bench", num_prompts)]
    for gen in gens.values():  # warm-up and start-up calibration
        gen.generate(prompts[0], 8)
    totals = {name: [0, 0.0, 0, 0] for name in gens}  # tokens, decode seconds, steps, drafted steps
    for rep in range(repeats):
        order = list(gens) if rep % 2 == 0 else list(gens)[::-1]
        for ids in prompts:
            reference = None
            for name in order:
                out = gens[name].generate(ids, new_tokens)
                reference = reference or out.token_ids
                assert out.token_ids == reference, f"{name} changed the output"
                t = totals[name]
                t[0] += out.stats.new_tokens
                t[1] += out.stats.wall_s - out.stats.prefill_s
                t[2] += out.stats.steps
                t[3] += sum(r.drafted for r in out.stats.records)
    base = totals["ar"][0] / totals["ar"][1]
    for name, (tokens, seconds, steps, drafted) in totals.items():
        rate = tokens / seconds
        print(f"{name}: {rate:.2f} tok/s, {rate / base:.3f}× ar, drafter ran on {drafted}/{steps} steps")


if __name__ == "__main__":
    main()
