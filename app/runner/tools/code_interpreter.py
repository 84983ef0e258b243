"""The code_interpreter built-in tool: the model writes Python, a sandboxed
session of the run's thread runs it (app/sandbox), and the model sees the logs.

Files the run may use (the assistant's or the run's override, the thread's,
and message attachments meant for code_interpreter) are copied to
/mnt/data/<filename> first. Charts become ``image`` outputs and ``image_file``
parts of the answer; files the code writes under /mnt/data become
``assistants_output`` files, and ``sandbox:/mnt/data/<name>`` links in the
answer become ``file_path`` annotations.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.runner.tools import PublishDelta, ToolResult
from app.sandbox import CallResult, SandboxError, Sandboxes
from app.services import files
from app.services.common import one_of

if TYPE_CHECKING:
    from app.runtime import Runtime

TYPE = "code_interpreter"
LINK_PREFIX = "sandbox:/mnt/data/"
DESCRIPTION = (
    "Runs Python 3 code in a stateful sandboxed session (variables, imports and files persist between calls). "
    "numpy, pandas and matplotlib are installed; there is no internet access. Input files are in /mnt/data; "
    "save files for the user to /mnt/data and link them as sandbox:/mnt/data/<name>. "
    "plt.show() or saved figures are shown to the user as images."
)
# Calls whose produced files are remembered for annotating the answer.
REMEMBERED_CALLS = 1024
_CODE_KEY = re.compile(r'\{\s*"code"\s*:\s*"')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class CodeArguments:
    """Decodes the ``code`` string of ``{"code": "..."}`` as its fragments stream in."""

    def __init__(self) -> None:
        self.raw = ""
        self.position: int | None = None  # where undecoded string content starts
        self.closed = False

    def feed(self, fragment: str) -> str:
        self.raw += fragment
        if self.closed:
            return ""
        if self.position is None:
            match = _CODE_KEY.match(self.raw)
            if match is None:
                return ""
            self.position = match.end()
        return self._decode()

    def _decode(self) -> str:
        assert self.position is not None
        out, raw, at = [], self.raw, self.position
        while at < len(raw):
            char = raw[at]
            if char == '"':
                self.closed = True
                at += 1
                break
            if char != "\\":
                out.append(char)
                at += 1
                continue
            decoded, used = _escape(raw, at)
            if used == 0:
                break  # the escape continues in the next fragment
            out.append(decoded)
            at += used
        self.position = at
        return "".join(out)


def _escape(raw: str, at: int) -> tuple[str, int]:
    """(decoded text, characters used) of the escape at ``at``; (\"\", 0) if incomplete."""
    if at + 1 >= len(raw):
        return "", 0
    kind = raw[at + 1]
    if kind != "u":
        return _ESCAPES.get(kind, kind), 2
    if at + 6 > len(raw):
        return "", 0
    high = int(raw[at + 2 : at + 6], 16)
    if 0xD800 <= high < 0xDC00:  # a surrogate pair needs its second half
        if at + 12 > len(raw):
            return "", 0
        if raw[at + 6 : at + 8] == "\\u":
            low = int(raw[at + 8 : at + 12], 16)
            return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)), 12
    return chr(high), 6


class CodeCallStream:
    def __init__(self) -> None:
        self.arguments = CodeArguments()

    def first(self) -> dict[str, Any]:
        return {"type": TYPE, TYPE: {"input": "", "outputs": []}}

    def feed(self, fragment: str) -> dict[str, Any] | None:
        text = self.arguments.feed(fragment)
        return {"type": TYPE, TYPE: {"input": text}} if text else None


def code_of(arguments: str) -> str | None:
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return code if isinstance(code, str) else None


async def input_files(runtime: Runtime, run: orm.Run) -> list[tuple[str, str, Path]]:
    """(file id, filename, stored path) of every file this run gives the tool."""
    async with runtime.transaction() as session:
        rows = await input_file_rows(session, run)
    found = [(row.id, row.filename, runtime.storage.path(row.id)) for row in rows]
    return [item for item in found if item[2].is_file()]


async def input_file_rows(session: AsyncSession, run: orm.Run) -> list[orm.File]:
    """The files this run gives the tool (the assistant's or the run's
    override, the thread's, and code_interpreter attachments), in that order."""
    assistant = await session.get(orm.Assistant, run.assistant_id)
    thread = await session.get(orm.Thread, run.thread_id)
    resources = run.tool_resources or (assistant.tool_resources if assistant else None) or {}
    wanted = _file_ids(resources) + _file_ids(thread.tool_resources if thread else None)
    attached = await session.scalars(
        select(orm.Message.attachments).where(orm.Message.thread_id == run.thread_id).order_by(orm.Message.seq)
    )
    for attachments in attached:
        for item in attachments or []:
            if any(tool.get("type") == TYPE for tool in item.get("tools") or []):
                wanted.append(str(item.get("file_id")))
    # Only the files of the run's project (its thread's), whatever ids are named.
    project_id = thread.project_id if thread else None
    query = select(orm.File).where(
        one_of(session, orm.File.id, wanted), orm.File.project_id == project_id, files.live()
    )
    rows = (await session.scalars(query)).all()
    by_id = {row.id: row for row in rows}
    return [by_id[file_id] for file_id in dict.fromkeys(wanted) if file_id in by_id]


def _file_ids(resources: dict[str, Any] | None) -> list[str]:
    return [str(file_id) for file_id in ((resources or {}).get(TYPE) or {}).get("file_ids") or []]


class CodeInterpreter:
    type = TYPE

    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        # call id -> {name under /mnt/data: file id}, for file_path annotations.
        self.produced: OrderedDict[str, dict[str, str]] = OrderedDict()

    async def close(self) -> None:
        """End every session (worker shutdown)."""
        await self.sandboxes.close()

    async def forget_thread(self, thread_id: str) -> None:
        """The thread was deleted: end its session and delete its files."""
        await self.sandboxes.discard(thread_id)

    def definition(self, run_tool: dict[str, Any]) -> dict[str, Any]:
        parameters = {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        }
        return {"type": "function", "function": {"name": TYPE, "description": DESCRIPTION, "parameters": parameters}}

    def start_call(self, call_id: str) -> CodeCallStream:
        return CodeCallStream()

    async def execute(
        self, runtime: Runtime, run: orm.Run, call_id: str, arguments: str, publish: PublishDelta
    ) -> ToolResult:
        code = code_of(arguments)
        if code is None:
            result = CallResult('The tool call\'s arguments must be JSON like {"code": "print(1)"}.', True)
        else:
            result = await self._run(runtime, run, code)
        images, produced = await self._store(runtime, run, call_id, result)
        outputs: list[dict[str, Any]] = [{"type": "logs", "logs": result.logs}] if result.logs else []
        outputs += [{"type": "image", "image": {"file_id": file_id}} for file_id in images]
        if outputs:
            publish({"type": TYPE, TYPE: {"outputs": [{"index": n, **output} for n, output in enumerate(outputs)]}})
        self._remember(call_id, produced)
        call = {"id": call_id, "type": TYPE, TYPE: {"input": code or "", "outputs": outputs}}
        parts = [{"type": "image_file", "image_file": {"file_id": file_id}} for file_id in images]
        return ToolResult(call=call, output=_for_model(result, images, produced), message_parts=parts)

    async def _run(self, runtime: Runtime, run: orm.Run, code: str) -> CallResult:
        try:
            inputs = await input_files(runtime, run)
            session = await self.sandboxes.session(run.thread_id)
            for file_id, filename, path in inputs:
                await session.add_input(file_id, filename, path)
            return await session.run(code)
        except SandboxError as exc:
            return CallResult(f"The code could not run: {exc}.", True)

    async def _store(
        self, runtime: Runtime, run: orm.Run, call_id: str, result: CallResult
    ) -> tuple[list[str], dict[str, str]]:
        """Save the call's images and files as assistants_output files."""
        if not result.images and not result.files:
            return [], {}
        async with runtime.transaction() as session:
            # The files belong to the run's project: its thread's.
            project_id = await session.scalar(select(orm.Thread.project_id).where(orm.Thread.id == run.thread_id))
            if project_id is None:
                return [], {}  # the thread was deleted meanwhile
            storage = runtime.storage
            images = [
                (await files.create_output(session, storage, project_id, f"{call_id}-{n}.png", data)).id
                for n, data in enumerate(result.images)
            ]
            produced = {
                item.name: (await files.create_output(session, storage, project_id, item.name, item.data)).id
                for item in result.files
            }
        return images, produced

    def _remember(self, call_id: str, produced: dict[str, str]) -> None:
        if produced:
            self.produced[call_id] = produced
            while len(self.produced) > REMEMBERED_CALLS:
                self.produced.popitem(last=False)

    def decorate(
        self, runtime: Runtime, run: orm.Run, content: list[dict[str, Any]], results: list[ToolResult]
    ) -> list[dict[str, Any]]:
        links: dict[str, str] = {}
        images: list[dict[str, Any]] = []
        for result in results:
            links.update(self.produced.get(str(result.call.get("id")), {}))
            images += result.message_parts
            result.message_parts = []  # each image goes into one message only
        return images + [_annotate(part, links) for part in content]


def _annotate(part: dict[str, Any], links: dict[str, str]) -> dict[str, Any]:
    """file_path annotations for ``sandbox:/mnt/data/<name>`` of files this run made."""
    if part.get("type") != "text" or not links:
        return part
    value: str = part["text"]["value"]
    names = "|".join(re.escape(name) for name in sorted(links, key=len, reverse=True))
    annotations = list(part["text"].get("annotations") or [])
    for match in re.finditer(rf"{re.escape(LINK_PREFIX)}(?:{names})", value):
        annotations.append(
            {
                "type": "file_path",
                "text": match.group(0),
                "start_index": match.start(),
                "end_index": match.end(),
                "file_path": {"file_id": links[match.group(0)[len(LINK_PREFIX) :]]},
            }
        )
    annotations.sort(key=lambda annotation: annotation["start_index"])
    return {**part, "text": {**part["text"], "annotations": annotations}}


def _for_model(result: CallResult, images: list[str], produced: dict[str, str]) -> str:
    lines = [result.logs.rstrip("\n")] if result.logs else ["(no output)"]
    lines += [f"[image {file_id} is shown to the user]" for file_id in images]
    if produced:
        lines.append("Files written to /mnt/data (link them as shown):")
        lines += [f"- {name}: {LINK_PREFIX}{name}" for name in produced]
    return "\n".join(lines)
