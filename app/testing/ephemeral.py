"""``serve --ephemeral``: a throwaway server for a test run.

A free port on 127.0.0.1, a temporary data directory (removed at exit),
SQLite, the offline model unless a routing file is given, and the admin API
on. Once it accepts connections it prints one JSON line to stdout (and writes
it to ``--ready-file`` if given, atomically)::

    {"base_url": "http://127.0.0.1:43121/v1", "api_key": "...", "admin_url": "...", "pid": 123, "data_dir": "..."}

so a harness in any language (Jest, ``go test``, a shell script) can start it,
read where it is, and stop it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from app import preflight
from app.settings import Settings

# What clients send when the server checks no keys (any string works then).
OPEN_KEY = "sk-assistants-server-test"


def prepare(settings: Settings, stack: ExitStack, explicit_data_dir: bool) -> tuple[Settings, socket.socket]:
    """The settings an ephemeral server runs with, and its bound socket."""
    changes: dict[str, Any] = {"admin_api": True}
    if not explicit_data_dir:
        temp = stack.enter_context(tempfile.TemporaryDirectory(prefix="assistants-ephemeral-"))
        changes["data_dir"] = Path(temp)
        if settings.database_url is None or settings.database_url.startswith("sqlite"):
            changes["database_url"] = None  # the SQLite file inside the temporary directory
    sock = preflight.bind(settings.host, 0)  # the kernel picks a free port: no check-then-bind race
    changes["port"] = sock.getsockname()[1]
    return settings.model_copy(update=changes), sock


def announcement(settings: Settings) -> dict[str, Any]:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    origin = f"http://{host}:{settings.port}"
    return {
        "base_url": f"{origin}/v1",
        "api_key": settings.api_keys[0] if settings.api_keys else OPEN_KEY,
        "admin_url": f"{origin}/admin",
        "pid": os.getpid(),
        "data_dir": str(Path(settings.data_dir).resolve()),
    }


def announce(settings: Settings, ready_file: Path | None) -> None:
    line = json.dumps(announcement(settings))
    if ready_file is not None:
        temp = ready_file.with_name(ready_file.name + ".tmp")
        temp.write_text(line + "\n", encoding="utf-8")
        os.replace(temp, ready_file)  # readers never see half a line
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
