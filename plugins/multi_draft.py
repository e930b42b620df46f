"""(being written)"""

from __future__ import annotations

from specframe import hookimpl


@hookimpl
def register_verifiers(register):
    pass
