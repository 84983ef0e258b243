"""Which built-in tools this server runs. Each tool's issue registers it here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.runner.tools import BuiltinTool

if TYPE_CHECKING:
    from app.runtime import Runtime


def builtin_tools(runtime: Runtime) -> dict[str, BuiltinTool]:
    tools: dict[str, BuiltinTool] = {}
    from app.runner.tools.file_search import FileSearch

    tools["file_search"] = FileSearch()
    from app.runner.tools.code_interpreter import CodeInterpreter
    from app.sandbox import Sandboxes

    tools["code_interpreter"] = CodeInterpreter(Sandboxes(runtime.settings))
    return tools
