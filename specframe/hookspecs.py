"""Hook specifications: the points where plugins extend specframe.

A plugin is a module (or object) with functions decorated by ``@specframe.hookimpl`` and named like the
specs below; it is found through the entry-point group ``specframe``. The ``register_*`` hooks are
*collecting* hooks: each implementation calls ``register(name, factory)`` once per component it
provides. A factory is a class or function called with keyword parameters (``--set key=value`` on the
CLI); if it accepts a ``target`` parameter it also receives the loaded :class:`~specframe.target.Target`.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("specframe")
hookimpl = pluggy.HookimplMarker("specframe")


@hookspec
def register_backends(register):
    """Register target backends (runtimes): ``register("hf", load)``, where ``load(spec, *, dtype, device)``
    returns a target for model ``spec`` (see :mod:`specframe.backends` for what a target must offer)."""


@hookspec
def register_drafters(register):
    """Register drafters: ``register("ngram", NgramDrafter)``. They return a
    :class:`~specframe.components.Draft` for each step."""


@hookspec
def register_surrogates(register):
    """Register acceptance surrogates (map draft scores to acceptance probabilities P(v))."""


@hookspec
def register_cost_models(register):
    """Register cost models (predict seconds to verify n tree tokens at context length c)."""


@hookspec
def register_expansion_policies(register):
    """Register expansion policies (choose the tree to verify from a draft)."""


@hookspec
def register_verifiers(register):
    """Register verifiers (accept a path of a verified tree; must be exactly lossless)."""


@hookspec
def register_policies(register):
    """Register policy bundles: ``register(PolicySpec(name=..., drafter=..., ...))``."""


@hookspec
def register_commands(cli):
    """Add commands to the ``specframe`` click group: ``@cli.command() def mine(): ...``."""


@hookspec
def on_step_end(record, step):
    """Observe each decoding step: a :class:`~specframe.components.StepRecord` and its index."""


@hookspec
def on_run_end(stats):
    """Observe each finished generation: its :class:`~specframe.components.RunStats`."""
