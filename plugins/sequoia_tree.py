"""(being written)"""

from __future__ import annotations

from specframe import hookimpl


@hookimpl
def register_expansion_policies(register):
    pass
