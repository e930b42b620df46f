"""Baseline policy bundles: ``ar``, ``chain``, ``static-tree`` and ``best-first``."""

from __future__ import annotations

from specframe import hookimpl
from specframe.registry import PolicySpec

POLICIES = (
    PolicySpec(
        name="ar",
        description="plain autoregressive decoding through the same loop (the fair timing baseline)",
        drafter="none",
        expansion="root-only",
    ),
    PolicySpec(
        name="chain",
        description="one path: the drafter's top token at every depth (DFlash-style)",
        expansion="chain",
        shorthand="expansion.max_len",
    ),
    PolicySpec(
        name="static-tree",
        description="a fixed topology of child ranks per depth, the same every step (--set topology=2,2,1)",
        expansion="static-tree",
        shorthand="expansion.topology",
    ),
    PolicySpec(
        name="best-first",
        description="query-dependent tree of a fixed node budget: the N most confident prefixes (DDTree-style)",
        expansion="best-first",
        params={"expansion.budget": 16},
        shorthand="expansion.budget",
    ),
)


@hookimpl
def register_policies(register):
    for spec in POLICIES:
        register(spec)
