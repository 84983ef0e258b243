"""``assistants-server sandbox-setup``: build the Python that model-written
code runs in (code_interpreter), with numpy, pandas and matplotlib.

It is made from a system interpreter under /usr on purpose: the sandbox mounts
only /usr (read-only) and this venv, so a Python living elsewhere (pyenv under
/root, the server's own virtualenv) would not be reachable inside it.
Idempotent: a stamp file named after the pins skips the work when nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PINS = ("numpy==2.2.6", "pandas==2.2.3", "matplotlib==3.10.3")
# Tried in this order when --base-python is not given.
BASE_PYTHON_CANDIDATES = (Path("/usr/bin/python3"), Path("/usr/local/bin/python3"))


class SandboxSetupError(Exception):
    """Setting up cannot go on; the message says what to do."""


def default_base_python() -> Path | None:
    for candidate in BASE_PYTHON_CANDIDATES:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _stamp(venv: Path) -> Path:
    digest = hashlib.sha256("\n".join(PINS).encode()).hexdigest()[:16]
    return venv / f".setup-{digest}"


def is_ready(venv: Path) -> bool:
    return (venv / "bin" / "python").exists() and _stamp(venv).is_file()


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)  # noqa: S603
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise SandboxSetupError(f"{what} failed: {detail[-1] if detail else f'exit {done.returncode}'}")


def set_up(venv: Path, base_python: Path | None, say: Callable[[str], None] = print) -> None:
    """Create or refresh the sandbox's virtualenv at ``venv``."""
    venv = venv.absolute()
    base = base_python or default_base_python()
    if base is None:
        raise SandboxSetupError(
            "no system Python under /usr to build the sandbox from: install python3 and python3-venv "
            "(Debian: apt-get install python3-venv) or pass --base-python"
        )
    if not str(base).startswith("/usr/"):
        raise SandboxSetupError(f"{base} is outside /usr; the sandbox mounts only /usr and cannot run it")
    if is_ready(venv):
        say(f"sandbox-setup: {venv} is up to date")
        return
    if not (venv / "bin" / "python").exists():
        say(f"sandbox-setup: creating a virtualenv from {base} at {venv}")
        try:
            venv.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SandboxSetupError(
                f"cannot create {venv.parent}: {exc.strerror}; set ASSISTANTS_SANDBOX_PYTHON or pass --path"
            ) from None
        _run([str(base), "-m", "venv", str(venv)], f"{base} -m venv (Debian: apt-get install python3-venv)")
    python = str(venv / "bin" / "python")
    say(f"sandbox-setup: installing {', '.join(PINS)} (about 60 MB the first time)")
    _run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", *PINS],
        "pip install into the sandbox",
    )
    say("sandbox-setup: precompiling and building matplotlib's font cache")
    # Compile now: inside the sandbox the venv is read-only, so every import
    # would otherwise recompile from source.
    _run([python, "-m", "compileall", "-q", str(venv / "lib")], "compileall")
    # The font cache goes into the venv once (the sandbox's home is a fresh
    # tmpfs every session; the server points MPLCONFIGDIR here, read-only).
    mplconfig = venv / "mplconfig"
    mplconfig.mkdir(exist_ok=True)
    env = {**os.environ, "MPLCONFIGDIR": str(mplconfig), "MPLBACKEND": "Agg"}
    _run([python, "-c", "import matplotlib.pyplot as plt; plt.figure()"], "matplotlib font cache", env)
    _make_world_readable(venv)
    for old in venv.glob(".setup-*"):
        old.unlink()
    _stamp(venv).touch()
    say(f"sandbox-setup: ready at {venv}")


def _make_world_readable(venv: Path) -> None:
    """Sessions run as other uids when the server is root: they must read the venv."""
    for directory, _dirs, files in os.walk(venv):
        path = Path(directory)
        path.chmod(path.stat().st_mode | 0o555)
        for name in files:
            file = path / name
            if not file.is_symlink():
                mode = file.stat().st_mode
                file.chmod(mode | (0o555 if mode & 0o111 else 0o444))


def main(venv: Path, base_python: Path | None) -> int:
    try:
        set_up(venv, base_python)
    except SandboxSetupError as exc:
        print(f"sandbox-setup: {exc}", file=sys.stderr)
        return 1
    return 0
