"""How a session's REPL process is started: under bubblewrap, or (only when
explicitly configured) with no isolation at all.

The bubblewrap sandbox sees: /usr read-only (with the usual /bin, /lib
symlinks), the sandbox venv and the REPL script read-only, its own /mnt/data,
/tmp and /dev/shm (each a private tmpfs whose size the kernel enforces), the
files the server staged for it read-only under /opt/inputs, a fresh /proc and
minimal /dev. It has no network (a private, empty network namespace), no view
of other processes (a PID namespace whose PID 1 is the REPL's supervisor), an
empty environment, a non-root uid, no capabilities, and a seccomp filter (see
seccomp.py). Resource limits are set by the REPL itself before any user code
runs (see kernel.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KERNEL = Path(__file__).with_name("kernel.py")
INSIDE_VENV = "/opt/venv"
INSIDE_KERNEL = "/opt/kernel.py"
INSIDE_INPUTS = "/opt/inputs"
MNT_DATA = "/mnt/data"
# The uid the code sees inside its user namespace (never root).
INSIDE_UID = 1000


@dataclass(frozen=True)
class Limits:
    timeout_seconds: int
    cpu_seconds: int
    session_cpu_seconds: int
    memory_bytes: int
    max_processes: int
    max_open_files: int
    max_file_bytes: int
    max_output_bytes: int
    tmp_bytes: int
    max_data_bytes: int  # the size of the /mnt/data tmpfs
    session_memory_bytes: int  # all of a session's processes together


def _env(mnt_data: str, tmp: str) -> dict[str, str]:
    """The whole environment of sandboxed code: nothing of the server's."""
    return {
        "PATH": f"{INSIDE_VENV}/bin:/usr/bin:/bin",
        "HOME": tmp,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": f"{tmp}/.matplotlib",
        "SANDBOX_MNT_DATA": mnt_data,
        # One thread per math library: fewer processes against RLIMIT_NPROC,
        # and no per-thread arenas eating into the address-space limit.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def _config(limits: Limits) -> str:
    host_side = {"tmp_bytes", "max_data_bytes"}
    fields = {name: getattr(limits, name) for name in Limits.__dataclass_fields__ if name not in host_side}
    return json.dumps(fields)


def _system_links() -> list[str]:
    """/bin, /lib, ... as on the host: symlinks into /usr, or read-only binds."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    return args


def bwrap_argv(bwrap: str, venv: Path, inputs: Path, limits: Limits, seccomp_fd: int) -> list[str]:
    return [
        bwrap,
        "--unshare-all",  # network, pid, ipc, uts, cgroup namespaces
        "--unshare-user",
        "--as-pid-1",  # the supervisor is PID 1: immune to SIGKILL from inside, reaper of orphans
        "--uid", str(INSIDE_UID),
        "--gid", str(INSIDE_UID),
        "--disable-userns",  # no nested namespaces to regain capabilities in
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into a terminal of the server
        "--clearenv",
        "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
        *_system_links(),
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(limits.tmp_bytes), "--tmpfs", "/dev/shm",  # multiprocessing needs it; capped like /tmp
        "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
        "--ro-bind", str(venv.resolve()), INSIDE_VENV,
        "--ro-bind", str(KERNEL), INSIDE_KERNEL,
        # The kernel refuses writes beyond the size (ENOSPC), however deep the path.
        "--size", str(limits.max_data_bytes), "--tmpfs", MNT_DATA,
        "--ro-bind", str(inputs), INSIDE_INPUTS,
        "--chdir", MNT_DATA,
        "--seccomp", str(seccomp_fd),
        # bwrap builds / and /dev as uncapped tmpfs: no writes (nor RAM) there.
        "--remount-ro", "/",
        "--remount-ro", "/dev",
        *[arg for name, value in _env(MNT_DATA, "/tmp").items() for arg in ("--setenv", name, value)],
        f"{INSIDE_VENV}/bin/python", "-I", INSIDE_KERNEL, _config(limits),
    ]  # fmt: skip


def unisolated_argv(venv: Path, limits: Limits) -> list[str]:
    return [str(venv.resolve() / "bin" / "python"), "-I", str(KERNEL), _config(limits)]


def unisolated_env(session_dir: Path) -> dict[str, str]:
    return _env(str(session_dir), str(session_dir / ".tmp"))


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


def find_setpriv() -> str | None:
    return shutil.which("setpriv")


def as_user(setpriv: str, uid: int, argv: list[str]) -> list[str]:
    """``argv`` run as ``uid`` (and the gid of that number) with no
    supplementary groups: the credentials subprocess's user=/group=/
    extra_groups=[] give, set by setpriv (util-linux) in the child before it
    execs ``argv``. A program rather than those arguments, because uvloop's
    subprocesses refuse them (``ValueError: unexpected kwargs``); a
    preexec_fn doing the same would be code of ours between fork and exec
    in a threaded server, and one more difference between the two loops."""
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


Mode = Literal["bwrap", "none"]
