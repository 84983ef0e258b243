"""Start ``assistants-server serve --ephemeral`` as a subprocess and wait until
it accepts requests; stop it with SIGTERM.

The server runs in its own process, from the Python environment this package
is installed in, so it never shares (or fights over) the ``openai`` SDK
version of the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message carries its log's tail."""


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    info: dict[str, str]
    log_path: Path
    _log: IO[bytes]
    _workdir: tempfile.TemporaryDirectory[str]

    @property
    def base_url(self) -> str:
        return self.info["base_url"]

    @property
    def api_key(self) -> str:
        return self.info["api_key"]

    @property
    def admin_url(self) -> str:
        return self.info["admin_url"]

    @classmethod
    def start(
        cls,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT_SECONDS,
    ) -> ServerProcess:
        workdir = tempfile.TemporaryDirectory(prefix="assistants-server-")
        ready = Path(workdir.name) / "ready.json"
        log_path = Path(workdir.name) / "server.log"
        log = log_path.open("wb")
        command = [sys.executable, "-m", "app", "serve", "--ephemeral", "--ready-file", str(ready), *extra_args]
        process = subprocess.Popen(  # noqa: S603 (our own CLI, no shell)
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=workdir.name,
        )
        server = cls(process, {}, log_path, log, workdir)
        try:
            server.info = server._wait_ready(ready, timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, ready: Path, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            if ready.is_file():
                info: dict[str, str] = json.loads(ready.read_text(encoding="utf-8"))
                return info
            if self.process.poll() is not None:
                raise ServerStartError(f"assistants-server exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(delay)  # waiting on another process: there is nothing to await
            delay = min(delay * 2, 0.2)
        raise ServerStartError(f"assistants-server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        self._log.flush()
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_since(0).splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._workdir.cleanup()
