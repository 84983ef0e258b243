"""Which built-in tools this server runs. Each tool's issue registers it here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.runner.tools import BuiltinTool

if TYPE_CHECKING:
    from app.runtime import Runtime


def builtin_tools(runtime: Runtime) -> dict[str, BuiltinTool]:
    tools: dict[str, BuiltinTool] = {}
    return tools
