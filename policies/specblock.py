"""(being written)"""

from __future__ import annotations

from specframe import hookimpl


@hookimpl
def register_policies(register):
    pass
