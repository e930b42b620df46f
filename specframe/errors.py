"""Errors that reach users as one clear line (the CLI prints them and exits with code 2)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecframeError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message, one line."""


class UnknownComponentError(SpecframeError):
    """A name (policy, drafter, verifier, ...) that no installed plugin registers."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(f"unknown {kind} '{name}'.{hint} Known {plural(kind)}: {', '.join(known) or '(none)'}")
        self.kind, self.name, self.known = kind, name, known


class PluginError(SpecframeError):
    """A plugin failed (raised, returned garbage, or declared a hook wrongly); names the plugin."""


class InvalidTreeError(SpecframeError):
    """A drafter or expansion policy produced a tree that violates the tree invariants."""


class UnsupportedModelError(SpecframeError):
    """The target model cannot be driven safely (e.g. sliding-window cache past its window)."""


def plural(kind: str) -> str:
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


def close_matches_hint(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or the empty string."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
