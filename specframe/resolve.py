"""From a policy string and ``--set`` options to component instances.

A policy (``name`` or ``name:VALUE``) names a bundle of components; ``--set`` options override its
parameters (``component.param`` or a bare ``param``) or swap a component by name; ``auto`` picks the
drafter the target has. :func:`resolve_components` does all of it once per generator, before any step.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass

from .clock import Clock, real_clock
from .components import AcceptanceSurrogate, CostModel, Drafter, ExpansionPolicy, component_name
from .errors import PluginError, SpecframeError
from .registry import COMPONENT_KINDS, PolicySpec, Registry

DEFAULT_POLICY = "bastion"


@dataclass
class Components:
    """The resolved components of one policy, plus the names they were resolved from."""

    policy: PolicySpec
    drafter: Drafter
    surrogate: AcceptanceSurrogate
    cost_model: CostModel
    expansion: ExpansionPolicy
    names: dict[str, str]
    notes: dict[str, str]  # component -> why ``auto`` chose it (only for components resolved by ``auto``)

    def describe(self) -> dict:
        """Names as resolved, each component's own description where it gives one (a drafter's checkpoint
        path, a hybrid's sources), and the ``auto`` choices' reasons — for ``--json`` output and logs."""
        details = {}
        for comp in ("drafter", "surrogate", "cost_model", "expansion"):
            describe = getattr(getattr(self, comp), "describe", None)
            if callable(describe):
                details[comp] = str(describe())
        return {"policy": self.policy.name, "names": dict(self.names), "details": details, "auto": dict(self.notes)}


def parse_value(text: str):
    """``--set`` values: Python literals where they parse (16, 0.5, True, 4,2,2), else the string."""
    lowered = text.strip().lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    if lowered in {"none", "null"}:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``["budget=16", "expansion.topology=2,2,1"]`` → ``{"budget": 16, "expansion.topology": (2, 2, 1)}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SpecframeError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = parse_value(value)
    return out


def resolve_components(
    registry: Registry,
    target,
    policy: str = DEFAULT_POLICY,
    drafter: str | Drafter | None = None,
    overrides: Mapping[str, object] | None = None,
    strict: bool = True,
    clock: Clock = real_clock,
    **objects,
) -> Components:
    """Resolve a policy string (``name`` or ``name:VALUE``) plus overrides into component instances.

    ``overrides`` keys are ``component.param``, a bare ``param`` (routed to every component that accepts
    it), or a component name (``surrogate``, ``cost_model``, ...) to swap that component by name.
    ``objects`` may pass ready component instances (``surrogate=MySurrogate()``), used as they are.
    With ``strict=False`` overrides that no component of this policy takes are ignored (for applying one
    ``--set`` to several policies).
    """
    name, _, short = policy.partition(":")
    spec = registry.policy(name)
    chosen: dict[str, object] = dict(spec.components())
    defaults: dict[str, object] = dict(spec.params)
    user: dict[str, object] = {}
    if short:
        if not spec.shorthand:
            raise SpecframeError(f"policy '{name}' takes no ':VALUE' shorthand; use --set key=value")
        user[spec.shorthand] = parse_value(short)
    for key, value in (overrides or {}).items():
        if key in COMPONENT_KINDS:
            chosen[key] = value
        else:
            user[key] = value
    if drafter is not None:
        chosen["drafter"] = drafter
    for key, obj in objects.items():
        if key not in COMPONENT_KINDS or key == "verifier":
            raise SpecframeError(f"unknown component '{key}'; pass one of drafter, surrogate, cost_model, expansion")
        if obj is not None:
            chosen[key] = obj
    notes: dict[str, str] = {}
    if chosen["drafter"] in ("auto", "auto-hybrid"):
        chosen["drafter"], notes["drafter"] = choose_drafter(registry, target, composite=chosen["drafter"] == "auto-hybrid")

    built: dict[str, object] = {}
    names: dict[str, str] = {}
    params = _route_params(registry, chosen, defaults, user, strict)
    for comp in ("drafter", "surrogate", "cost_model", "expansion"):
        value = chosen[comp]
        if not isinstance(value, str):
            built[comp], names[comp] = value, component_name(value)
            continue
        base, _, arg = value.partition(":")
        kwargs = dict(params.get(comp, {}))
        if arg:
            kwargs["path"] = arg
        built[comp] = registry.build(comp, base, kwargs, target=target, registry=registry,
                                     clock=clock)
        names[comp] = value
    names["verifier"] = str(chosen["verifier"])
    return Components(spec, built["drafter"], built["surrogate"], built["cost_model"], built["expansion"], names,
                      notes)


def default_drafter(registry: Registry, target, composite: bool = False) -> str:
    """The drafter ``auto`` resolves to (see :func:`choose_drafter`)."""
    return choose_drafter(registry, target, composite)[0]


def choose_drafter(registry: Registry, target, composite: bool = False) -> tuple[str, str]:
    """The drafter ``auto`` resolves to, and why: among registered drafters whose factory says
    ``available_for(target)``, the one with the highest ``auto_priority``; else ``ngram``. Composite
    drafters (``composite = True``, e.g. ``hybrid``) only count for ``auto-hybrid``. A factory may
    explain its answer with ``availability(target) -> (ok, reason)`` instead of ``available_for``; the
    reason of the winner (or of the best refused candidate, when ``ngram`` is the fallback) comes back."""
    best, best_priority, why = "ngram", float("-inf"), ""
    refused: list[tuple[float, str, str]] = []
    for name in registry.names("drafter"):
        factory = registry.get("drafter", name).factory
        if getattr(factory, "composite", False) and not composite:
            continue
        priority = getattr(factory, "auto_priority", 0)
        if priority <= best_priority:
            continue
        verdict = _availability(name, factory, target)
        if verdict is None:
            continue
        ok, reason = verdict
        if ok:
            best, best_priority, why = name, priority, reason
        elif reason:  # a drafter that refuses without a reason has nothing to say about this target
            refused.append((priority, name, reason))
    if best == "ngram" and not why:
        if refused:
            _, name, reason = max(refused)
            why = f"'{name}' is not available ({reason}); prompt lookup needs no model"
        else:
            why = "no drafter that needs a model is registered for this target; prompt lookup needs no model"
    return best, why


def _availability(name: str, factory, target) -> tuple[bool, str] | None:
    """``(ok, reason)`` from a drafter factory's ``availability`` / ``available_for``, or None if it has neither."""
    explain, check = getattr(factory, "availability", None), getattr(factory, "available_for", None)
    try:
        if explain is not None:
            ok, reason = explain(target)
            return bool(ok), str(reason)
        if check is not None:
            ok = bool(check(target))
            return ok, f"'{name}' says it is {'available' if ok else 'not available'} for this target"
    except SpecframeError:
        raise
    except Exception as err:  # noqa: BLE001
        method = "availability" if explain is not None else "available_for"
        raise PluginError(f"drafter '{name}' failed in {method}: {type(err).__name__}: {err}") from err
    return None


def _route_params(registry: Registry, chosen: dict, defaults: dict, user: dict, strict: bool = True) -> dict[str, dict]:
    """Assign parameters to components. User parameters must fit; defaults are dropped where a swapped-in
    component does not take them."""
    accepts: dict[str, set[str]] = {}
    for comp, value in chosen.items():
        if isinstance(value, str) and comp != "verifier":
            accepts[comp] = set(registry.parameters(comp, value.partition(":")[0]))
        else:
            accepts[comp] = set()
    out: dict[str, dict] = {comp: {} for comp in chosen}
    for source, must_fit in ((defaults, False), (user, strict)):
        for key, value in source.items():
            comp, dot, param = key.partition(".")
            if dot:
                if comp not in COMPONENT_KINDS:
                    raise SpecframeError(f"unknown component '{comp}' in --set {key}; use one of {', '.join(COMPONENT_KINDS)}")
                targets = [comp] if param in accepts[comp] else []
            else:
                param = key
                targets = [c for c, ps in accepts.items() if param in ps]
            if not targets:
                if not must_fit:
                    continue
                known = sorted(f"{c}.{p}" for c, ps in accepts.items() for p in ps)
                raise SpecframeError(
                    f"no component of this policy takes the parameter '{key}'; settable: {', '.join(known) or '(none)'}"
                )
            for comp_name in targets:
                out[comp_name][param] = value
    return out


