"""Plugin discovery (pluggy, entry-point group ``specframe``) and the component registry.

Built-in plugins are entry points of the ``specframe`` distribution itself, loaded through exactly the
same path as third-party ones. (When specframe runs from a source tree without being installed, the
modules in :data:`DEFAULT_PLUGINS` are loaded directly instead.)

``SPECFRAME_PLUGINS`` restricts which *third-party* plugins load: a comma-separated list of entry-point
or distribution names; set it to the empty string to load none. Built-ins always load.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata as md
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import PluginError, SpecframeError, UnknownComponentError, close_matches_hint

ENTRY_POINT_GROUP = "specframe"
ALLOW_ENV = "SPECFRAME_PLUGINS"
OWN_DISTRIBUTION = "specframe"
DEFAULT_PLUGINS = (
    "specframe.plugins.backends",
    "specframe.plugins.verifiers",
    "specframe.plugins.drafters",
    "specframe.plugins.dflash",
    "specframe.plugins.hybrid",
    "specframe.plugins.surrogates",
    "specframe.plugins.cost_models",
    "specframe.plugins.expansion",
    "specframe.plugins.model_drafter",
    "specframe.plugins.multi_sequence",
    "specframe.plugins.branch",
    "specframe.plugins.eagle_tree",
    "specframe.plugins.sequoia_tree",
    "specframe.plugins.rank_blocks",
    "specframe.plugins.multi_draft",
    "specframe.policies.baselines",
    "specframe.policies.bastion",
    "specframe.policies.duodecoding",
    "specframe.policies.specbranch",
    "specframe.policies.eagle2",
    "specframe.policies.sequoia",
    "specframe.policies.specblock",
)

# registry kind -> the hook that fills it. A component kind is spelled as everywhere else: the PolicySpec
# field, the --set prefix, the keyword of resolve_components (``cost_model``, ``expansion``)
KIND_HOOKS = {
    "backend": "register_backends",
    "drafter": "register_drafters",
    "surrogate": "register_surrogates",
    "cost_model": "register_cost_models",
    "expansion": "register_expansion_policies",
    "verifier": "register_verifiers",
}
KIND_LABELS = {"cost_model": "cost model", "expansion": "expansion policy"}  # how messages say a kind


def kind_label(kind: str) -> str:
    """A kind in words, for messages (``cost_model`` -> ``cost model``)."""
    return KIND_LABELS.get(kind, kind)
HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith(("register_", "on_")))


@dataclass
class PluginInfo:
    name: str  # entry-point name (or module name for built-ins loaded from source)
    distribution: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    version: str = ""


@dataclass
class PluginSet:
    """A plugin manager plus what loading found: the plugins and the problems (skipped plugins)."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo]
    problems: list[str]


def _entry_points(group: str) -> list[md.EntryPoint]:
    return list(md.entry_points(group=group))


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def _allowed(ep: md.EntryPoint, allow: set[str] | None) -> bool:
    return allow is None or ep.name in allow or _dist_name(ep).lower() in allow


def _allow_list() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {part.strip().lower() for part in raw.split(",") if part.strip()} | {
        part.strip() for part in raw.split(",") if part.strip()
    }


def _hook_problems(plugin: object, pm: pluggy.PluginManager) -> list[str]:
    """Names of hookimpls on ``plugin`` that match no hookspec (typos)."""
    bad = []
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is not None and attr not in HOOK_NAMES:
            bad.append(f"'{attr}'{close_matches_hint(attr, HOOK_NAMES)}")
    return bad


def _register(pm: pluggy.PluginManager, plugin: object, info: PluginInfo, problems: list[str]) -> None:
    label = f"plugin '{info.name}' (distribution {info.distribution})"
    unknown = _hook_problems(plugin, pm)
    if unknown:
        problems.append(f"{label} skipped: unknown hook {', '.join(unknown)}")
        return
    try:
        pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as err:
        if pm.has_plugin(info.name):  # older pluggy may have registered some hooks before failing
            pm.unregister(name=info.name)
        problems.append(f"{label} skipped: {' '.join(str(err).split())}")
        return
    except ValueError as err:  # already registered under that name
        problems.append(f"{label} skipped: {err}")
        return
    info.hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))


def make_plugin_set(
    entry_points: Iterable[md.EntryPoint] | None = None,
    allow: set[str] | None | str = "env",
    extra: Iterable[object] = (),
) -> PluginSet:
    """A fresh plugin manager with the built-ins, the allowed third-party plugins and ``extra`` objects.

    ``entry_points`` defaults to the installed ones in group ``specframe``; ``allow`` defaults to the
    ``SPECFRAME_PLUGINS`` environment variable (``None`` = load all).
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    eps = _entry_points(ENTRY_POINT_GROUP) if entry_points is None else list(entry_points)
    allow = _allow_list() if allow == "env" else allow
    plugins: list[PluginInfo] = []
    problems: list[str] = []

    own = [ep for ep in eps if _dist_name(ep) == OWN_DISTRIBUTION]
    if not own:  # running from a source tree: load the built-in modules directly
        for modname in DEFAULT_PLUGINS:
            info = PluginInfo(modname.rsplit(".", 1)[-1], OWN_DISTRIBUTION, True)
            _register(pm, importlib.import_module(modname), info, problems)
            plugins.append(info)
    for ep in eps:
        dist = _dist_name(ep)
        builtin = dist == OWN_DISTRIBUTION
        if not builtin and not _allowed(ep, allow):
            continue
        version = getattr(getattr(ep, "dist", None), "version", "") or ""
        info = PluginInfo(ep.name, dist, builtin, version=version)
        try:
            plugin = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not take the rest down
            problems.append(f"plugin '{ep.name}' (distribution {dist}) failed to import: {type(err).__name__}: {err}")
            continue
        _register(pm, plugin, info, problems)
        plugins.append(info)
    for i, obj in enumerate(extra):
        info = PluginInfo(getattr(obj, "__name__", f"extra-{i}"), "(in-process)", False)
        _register(pm, obj, info, problems)
        plugins.append(info)
    plugins = [p for p in plugins if pm.has_plugin(p.name)]
    return PluginSet(pm, plugins, problems)


# ---------------------------------------------------------------------- policy bundles
@dataclass(frozen=True)
class PolicySpec:
    """A named bundle of components plus default parameters.

    ``params`` maps ``"component.key"`` (component: drafter, surrogate, cost_model, expansion,
    verifier) to a default value. ``shorthand`` names the parameter set by ``name:VALUE`` (e.g.
    ``best-first:16`` sets ``expansion.budget``). ``drafter="auto"`` picks the target's trained
    drafter when one exists, else ``ngram``; ``"auto-hybrid"`` also allows composite drafters (the
    ``hybrid`` of lookup and block drafts); ``verifier="auto"`` picks greedy or sample by temperature.
    """

    name: str
    description: str
    drafter: str = "auto"
    surrogate: str = "path-confidence"
    cost_model: str = "constant"
    expansion: str = "best-first"
    verifier: str = "auto"
    params: dict = field(default_factory=dict)
    shorthand: str | None = None

    def components(self) -> dict[str, str]:
        return {
            "drafter": self.drafter,
            "surrogate": self.surrogate,
            "cost_model": self.cost_model,
            "expansion": self.expansion,
            "verifier": self.verifier,
        }


COMPONENT_KINDS = ("drafter", "surrogate", "cost_model", "expansion", "verifier")


@dataclass
class Registered:
    factory: Callable
    plugin: str


class Registry:
    """Every registered component factory and policy bundle, by kind and name."""

    def __init__(self, plugin_set: PluginSet | None = None):
        self.plugin_set = plugin_set or make_plugin_set()
        self.pm = self.plugin_set.pm
        self.components: dict[str, dict[str, Registered]] = {kind: {} for kind in KIND_HOOKS}
        self.policies: dict[str, tuple[PolicySpec, str]] = {}
        for kind, hook in KIND_HOOKS.items():
            self._collect(hook, lambda name, factory, plugin, kind=kind: self._add(kind, name, factory, plugin))
        self._collect("register_policies", self._add_policy)

    def _collect(self, hook: str, add: Callable) -> None:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin = impl.plugin_name

            def register(*args, _plugin=plugin, **kwargs):
                add(*args, plugin=_plugin, **kwargs)

            try:
                impl.function(register)
            except SpecframeError:
                raise
            except Exception as err:  # noqa: BLE001
                raise PluginError(f"plugin '{plugin}' raised in {hook}: {type(err).__name__}: {err}") from err

    def _add(self, kind: str, name: str, factory: Callable, plugin: str) -> None:
        if not isinstance(name, str) or not callable(factory):
            raise PluginError(f"plugin '{plugin}' registered a {kind_label(kind)} with a bad name or non-callable "
                              f"factory: {name!r}")
        if name in self.components[kind]:
            other = self.components[kind][name].plugin
            raise PluginError(f"{kind_label(kind)} '{name}' is registered by both plugin '{other}' and plugin '{plugin}'")
        self.components[kind][name] = Registered(factory, plugin)

    def _add_policy(self, spec: PolicySpec, plugin: str) -> None:
        if not isinstance(spec, PolicySpec):
            raise PluginError(f"plugin '{plugin}' registered a policy that is not a PolicySpec: {spec!r}")
        if spec.name in self.policies:
            raise PluginError(f"policy '{spec.name}' is registered by both '{self.policies[spec.name][1]}' and '{plugin}'")
        self.policies[spec.name] = (spec, plugin)

    def extended(self, kind: str, name: str, factory: Callable, plugin: str) -> "Registry":
        """A copy of this registry with one more component (an in-process one, e.g. the simulator's
        trace drafter); this registry is left as it was."""
        out = copy.copy(self)
        out.components = {k: dict(table) for k, table in self.components.items()}
        out._add(kind, name, factory, plugin)
        return out

    # ------------------------------------------------------------------ lookup
    def names(self, kind: str) -> list[str]:
        return sorted(self.policies) if kind == "policy" else sorted(self._table(kind))

    def _table(self, kind: str) -> dict[str, Registered]:
        if kind not in self.components:
            raise SpecframeError(f"unknown component kind '{kind}'; the kinds are {', '.join(self.components)}")
        return self.components[kind]

    def policy(self, name: str) -> PolicySpec:
        if name not in self.policies:
            raise UnknownComponentError("policy", name, self.policies)
        return self.policies[name][0]

    def get(self, kind: str, name: str) -> Registered:
        table = self._table(kind)
        if name not in table:
            raise UnknownComponentError(kind_label(kind), name, table)
        return table[name]

    def parameters(self, kind: str, name: str) -> dict[str, inspect.Parameter]:
        """The settable keyword parameters of a component (injected ``target``/``sampling`` excluded)."""
        sig = inspect.signature(self.get(kind, name).factory)
        return {
            k: p
            for k, p in sig.parameters.items()
            if k not in INJECTED and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }

    def build(self, kind: str, name: str, params: dict, **injected):
        """Instantiate a component; unknown parameters and plugin failures give one clear error."""
        reg = self.get(kind, name)
        sig = inspect.signature(reg.factory)
        allowed = self.parameters(kind, name)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            listing = ", ".join(allowed) or "(none)"
            raise SpecframeError(
                f"{kind_label(kind)} '{name}' has no parameter '{unknown[0]}'{close_matches_hint(unknown[0], allowed)}; "
                f"its parameters: {listing}"
            )
        kwargs = dict(params)
        for key, value in injected.items():
            if key in sig.parameters:
                kwargs[key] = value
        try:
            return reg.factory(**kwargs)
        except SpecframeError:
            raise
        except Exception as err:  # noqa: BLE001
            raise PluginError(f"{kind_label(kind)} '{name}' (plugin '{reg.plugin}') failed to start: "
                              f"{type(err).__name__}: {err}") from err


INJECTED = ("target", "sampling", "registry", "clock")


def warn_problems(plugin_set: PluginSet) -> None:
    for problem in plugin_set.problems:
        print(f"specframe: warning: {problem}", file=sys.stderr)
