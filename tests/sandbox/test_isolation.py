"""Escape attempts against the bubblewrap sandbox, without HTTP. Each test
fails if the sandbox leaks; none is skipped where bubblewrap is missing (a
machine that should run code_interpreter must be able to run these)."""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app import sandbox
from app.sandbox import Sandboxes, Session, seccomp
from app.settings import Settings

CANARY = "canary-7f3a9c1e-do-not-leak"
MiB = 1024 * 1024


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    assert shutil.which("bwrap"), "bubblewrap is required for code_interpreter: apt-get install -y bubblewrap"
    venv = Settings().sandbox_python
    assert (venv / "bin" / "python").exists(), f"no sandbox Python at {venv}: run `assistants-server sandbox-setup`"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "assistants.db").write_text(CANARY)
    return Settings(
        data_dir=data_dir,
        sandbox_call_timeout_seconds=3,
        sandbox_cpu_seconds=3,
        sandbox_memory_bytes=768 * MiB,
        sandbox_max_processes=32,
        sandbox_max_output_bytes=4096,
        sandbox_max_file_bytes=8 * MiB,
        sandbox_max_data_bytes=24 * MiB,
        sandbox_tmp_bytes=4 * MiB,
    )


@pytest.fixture
async def sandboxes(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sandboxes]:
    monkeypatch.setenv("ASSISTANTS_TEST_SECRET", CANARY)  # as an API key in the server's environment would be
    manager = Sandboxes(settings)
    try:
        yield manager
    finally:
        await manager.close()


async def _session(sandboxes: Sandboxes, key: str = "thread_a") -> Session:
    return await sandboxes.session(key)


async def _logs(sandboxes: Sandboxes, code: str, key: str = "thread_a") -> str:
    result = await (await _session(sandboxes, key)).run(code)
    return result.logs


async def test_code_runs_unprivileged_with_no_capabilities(sandboxes: Sandboxes) -> None:
    logs = await _logs(
        sandboxes,
        "import os\n"
        "lines = open('/proc/self/status').read().splitlines()\n"
        "status = dict(line.split(':\\t', 1) for line in lines if ':\\t' in line)\n"
        "print(os.getuid(), status['CapEff'].strip(), status['NoNewPrivs'].strip(), os.getcwd())",
    )
    assert logs == "1000 0000000000000000 1 /mnt/data\n"


async def test_no_network_not_even_the_servers_port(sandboxes: Sandboxes) -> None:
    accepted: list[bool] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        logs = await _logs(
            sandboxes,
            "import socket\n"
            f"for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('10.0.2.2', 80)]:\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    print(host, s.connect_ex((host, port)) != 0)\n"
            "print(sorted(name for _, name in socket.if_nameindex()))",
        )
    assert logs == "127.0.0.1 True\n1.1.1.1 True\n10.0.2.2 True\n['lo']\n"
    assert accepted == []


async def test_no_server_environment_or_processes(sandboxes: Sandboxes) -> None:
    logs = await _logs(
        sandboxes,
        "import os\n"
        "pids = [pid for pid in os.listdir('/proc') if pid.isdigit()]\n"
        "seen = []\n"
        "for pid in pids:\n"
        "    try:\n"
        "        seen.append(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except PermissionError:\n"
        "        seen.append(b'denied')\n"
        "print(len(pids) <= 3, b''.join(seen), dict(os.environ))",
    )
    assert CANARY not in logs
    assert "ASSISTANTS_" not in logs
    assert logs.startswith("True ")


async def test_server_files_are_out_of_reach(sandboxes: Sandboxes, settings: Settings) -> None:
    database = (settings.data_dir / "assistants.db").resolve()
    logs = await _logs(
        sandboxes,
        "import os\n"
        f"for path in [{str(database)!r}, '/etc/passwd', '/root', '/proc/1/root/{database}']:\n"
        "    try:\n"
        "        print(open(path).read())\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)\n"
        "print(sorted(os.listdir('/')))",
    )
    assert CANARY not in logs
    lines = logs.splitlines()
    assert lines[:3] == ["FileNotFoundError", "FileNotFoundError", "FileNotFoundError"]
    assert lines[3] in {"FileNotFoundError", "PermissionError"}  # PID 1 is the non-dumpable supervisor
    visible = set(ast.literal_eval(lines[4]))
    assert visible <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "mnt", "opt", "proc", "sbin", "tmp", "usr"}


async def test_writes_only_under_mnt_data_and_a_private_tmp(sandboxes: Sandboxes, tmp_path: Path) -> None:
    host_tmp = Path(tempfile.gettempdir()) / f"sandbox-escape-{os.getpid()}"
    logs = await _logs(
        sandboxes,
        "paths = ['/usr/evil', '/opt/venv/evil', '/evil', '/mnt/evil', '/dev/evil', '/proc/sys/kernel/hostname']\n"
        f"paths.append({str(host_tmp)!r})\n"
        "for path in [*paths, '/mnt/data/ok']:\n"
        "    try:\n"
        "        open(path, 'w').write('x'); print('wrote', path)\n"
        "    except OSError as error:\n"
        "        print('OSError')",
    )
    assert logs.splitlines()[:6] == ["OSError"] * 6
    assert f"wrote {host_tmp}" in logs and "wrote /mnt/data/ok" in logs
    assert not host_tmp.exists()
    assert not Path("/usr/evil").exists() and not Path("/evil").exists()  # noqa: ASYNC240
    assert await _logs(sandboxes, "print(open('/mnt/data/ok').read())") == "x\n"


async def test_sessions_do_not_see_each_other(sandboxes: Sandboxes) -> None:
    await _logs(sandboxes, "secret = 1\nopen('/mnt/data/a.txt', 'w').write('a')", key="thread_a")
    logs = await _logs(sandboxes, "import os\nprint('secret' in globals(), os.listdir('/mnt/data'))", key="thread_b")
    assert logs == "False []\n"
    first, second = sandboxes.sessions["thread_a"], sandboxes.sessions["thread_b"]
    if os.geteuid() == 0:
        assert first.uid != second.uid and first.directory.stat().st_uid == first.uid


async def test_a_fork_bomb_is_capped(sandboxes: Sandboxes, settings: Settings) -> None:
    logs = await _logs(
        sandboxes,
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    for _ in range(10_000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        children += 1\n"
        "except OSError as error:\n"
        "    print('refused', type(error).__name__)\n"
        "print(children)",
    )
    refused, children = logs.splitlines()
    assert refused == "refused BlockingIOError"
    assert int(children) < settings.sandbox_max_processes
    # The classic bomb ends (children die when fork fails), and the session still answers.
    await _logs(sandboxes, "import os\nwhile True:\n    os.fork()")
    assert await _logs(sandboxes, "print('alive')") == "alive\n"


async def test_a_memory_hog_gets_memory_error(settings: Settings) -> None:
    # A smaller address space and a longer clock: zero-filling 768 MiB can take 3 s on a busy machine.
    limits = {"sandbox_memory_bytes": 384 * MiB, "sandbox_call_timeout_seconds": 30}
    manager = Sandboxes(settings.model_copy(update=limits))
    try:
        logs = await _logs(manager, "kept = []\nwhile True:\n    kept.append(bytearray(50 * 1024 * 1024))")
        assert "MemoryError" in logs
        assert await _logs(manager, "del kept\nprint('alive')") == "alive\n"
    finally:
        await manager.close()


async def test_an_infinite_loop_times_out_and_keeps_the_session(sandboxes: Sandboxes) -> None:
    logs = await _logs(sandboxes, "x = 5\nwhile True:\n    pass")
    assert "CallTimeout: Execution stopped" in logs
    assert await _logs(sandboxes, "print(x)") == "5\n"


async def test_code_that_defeats_the_timeout_is_killed_and_restarted(sandboxes: Sandboxes) -> None:
    code = (
        "import signal\n"
        "for s in (signal.SIGALRM, signal.SIGXCPU):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "x = 1\n"
        "while True:\n"
        "    pass"
    )
    result = await (await _session(sandboxes)).run(code)
    assert result.restarted and "timed out after 3 seconds and the session was restarted" in result.logs
    logs = await _logs(sandboxes, "print('x' in globals())")
    assert logs == "False\n"


async def test_a_crash_restarts_the_session_and_keeps_files(sandboxes: Sandboxes) -> None:
    await _logs(sandboxes, "open('/mnt/data/kept.txt', 'w').write('still here')")
    result = await (await _session(sandboxes)).run("import os\nos.kill(os.getpid(), 9)")
    assert result.restarted and "crashed" in result.logs
    assert await _logs(sandboxes, "print(open('/mnt/data/kept.txt').read())") == "still here\n"


async def test_huge_output_is_capped(sandboxes: Sandboxes) -> None:
    logs = await _logs(
        sandboxes, "import os, sys\nprint('x' * 10_000_000)\nos.write(2, b'y' * 1_000_000)\nprint('end')"
    )
    assert len(logs) < 4096 + 200
    written = 10_000_001 + 1_000_000 + len("end\n")
    assert logs.endswith(f"\n[output truncated: {written - 4096} more bytes not shown]")
    assert await _logs(sandboxes, "print('next')") == "next\n"  # the next call starts clean


async def test_files_are_capped_and_tmp_is_small(sandboxes: Sandboxes) -> None:
    logs = await _logs(
        sandboxes,
        "import signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "for path in ['/mnt/data/big.bin', '/tmp/big.bin', '/dev/shm/big.bin']:\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        "            for _ in range(64): f.write(bytes(1024 * 1024))\n"
        "        print('wrote', path)\n"
        "    except OSError as error:\n"
        "        print(path, error.errno)",
    )
    assert logs == "/mnt/data/big.bin 27\n/tmp/big.bin 28\n/dev/shm/big.bin 28\n"  # EFBIG, ENOSPC, ENOSPC


async def test_symlinks_never_make_the_server_read_or_write_its_files(sandboxes: Sandboxes, tmp_path: Path) -> None:
    secret = tmp_path / "server-secret.txt"
    secret.write_text(CANARY)
    session = await _session(sandboxes)
    result = await session.run(
        "import os\n"
        f"os.symlink({str(secret)!r}, '/mnt/data/leak.txt')\n"
        f"os.symlink({str(secret)!r}, '/mnt/data/input.csv')"
    )
    assert result.files == []  # links are not files: nothing is read through them
    upload = tmp_path / "upload.csv"
    upload.write_text("a,b\n")
    await session.add_input("file-1", "input.csv", upload)
    assert secret.read_text() == CANARY  # the copy replaced the link instead of writing through it
    assert await _logs(sandboxes, "print(open('/mnt/data/input.csv').read())") == "a,b\n\n"


async def test_inputs_in_and_outputs_out(settings: Settings, tmp_path: Path) -> None:
    # A long clock: matplotlib's first import in a session overran 3 s in CI's run on a fresh, busy machine.
    limits = {"sandbox_call_timeout_seconds": 30, "sandbox_cpu_seconds": 30}
    manager = Sandboxes(settings.model_copy(update=limits))
    try:
        result = await _plot_an_input(await _session(manager), tmp_path)
    finally:
        await manager.close()
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG")
    assert sorted(item.name for item in result.files) == ["chart.png", "out.txt"]
    assert [item.data for item in result.files if item.name == "out.txt"] == [b"done"]


async def _plot_an_input(session: Session, tmp_path: Path) -> sandbox.CallResult:
    upload = tmp_path / "stored"
    upload.write_text("1,2,3")
    await session.add_input("file-9", "../../numbers.csv", upload)
    return await session.run(
        "import matplotlib.pyplot as plt\n"
        "numbers = open('/mnt/data/numbers.csv').read().split(',')\n"
        "plt.plot([int(n) for n in numbers]); plt.savefig('/mnt/data/chart.png')\n"
        "open('/mnt/data/out.txt', 'w').write('done')"
    )


async def test_idle_and_deleted_sessions_are_reclaimed(sandboxes: Sandboxes) -> None:
    await _logs(sandboxes, "print(1)", key="thread_a")
    await _logs(sandboxes, "print(1)", key="thread_b")
    a, b = sandboxes.sessions["thread_a"], sandboxes.sessions["thread_b"]
    await sandbox.forget("thread_a")  # the thread was deleted
    assert "thread_a" not in sandboxes.sessions and not a.directory.exists() and a.process is None
    sandboxes.idle_seconds = 0
    await sandboxes.reap_idle()
    assert sandboxes.sessions == {} and not b.directory.exists()


async def test_no_isolation_only_when_chosen_and_loudly(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    unisolated = Sandboxes(settings.model_copy(update={"sandbox": "none"}))
    try:
        assert "WITHOUT ISOLATION" in caplog.text
        assert await _logs(unisolated, "print(6 * 7)") == "42\n"
    finally:
        await unisolated.close()
    caplog.clear()
    isolated = Sandboxes(settings)
    await isolated.close()
    assert "WITHOUT ISOLATION" not in caplog.text


async def test_the_sandbox_dir_may_not_hold_the_database(settings: Settings) -> None:
    with pytest.raises(ValueError, match="must not be inside the data directory"):
        Sandboxes(settings.model_copy(update={"sandbox_dir": settings.data_dir / "sandboxes"}))


# --- the findings of the attack on the sandbox's limits (issue 15) ---


async def test_mnt_data_is_a_size_limited_filesystem_even_under_paths_longer_than_path_max(
    sandboxes: Sandboxes,
) -> None:
    # Directories nested past PATH_MAX (4,096 characters), which no walk of the tree can measure.
    logs = await _logs(
        sandboxes,
        "import os\n"
        "for _ in range(30):\n"
        "    os.mkdir('d' * 200); os.chdir('d' * 200)\n"
        "written = 0\n"
        "try:\n"
        "    for n in range(100):\n"
        "        with open(f'fill-{n}.bin', 'wb') as f:\n"
        "            for _ in range(4): f.write(b'x' * 1024 * 1024); written += 1024 * 1024\n"
        "except OSError as error:\n"
        "    print('refused', error.errno)\n"
        "print(len(os.getcwd()) > 4096, written <= 24 * 1024 * 1024)\n"
        "os.chdir('/mnt/data')",
    )
    assert logs == "refused 28\nTrue True\n"  # ENOSPC from the filesystem itself
    logs = await _logs(
        sandboxes,
        "import shutil\nshutil.rmtree('/mnt/data/' + 'd' * 200)\n"
        "open('/mnt/data/after.txt', 'w').write('ok')\nprint('ok')",
    )
    assert logs == "ok\n"  # deleting frees the space again


async def test_files_are_read_back_up_to_their_real_size_and_the_output_cap(sandboxes: Sandboxes) -> None:
    result = await (await _session(sandboxes)).run(
        "import os\n"
        "with open('/mnt/data/sparse.bin', 'wb') as f:\n"
        "    f.truncate(7 * 1024 * 1024)\n"  # 7 MiB of holes: nothing stored
        "for name in ('a.bin', 'b.bin'):\n"
        "    open(f'/mnt/data/{name}', 'wb').write(os.urandom(5 * 1024 * 1024))",
    )
    assert [item.name for item in result.files] == ["a.bin"]
    assert len(result.files[0].data) == 5 * MiB
    assert (
        "b.bin (5242880 bytes) was not returned: the files of one call may total at most 8388608 bytes" in result.logs
    )
    assert "sparse.bin was not returned: it is a sparse file of 7340032 bytes" in result.logs


async def test_every_process_a_call_started_is_gone_when_it_returns(sandboxes: Sandboxes) -> None:
    logs = await _logs(
        sandboxes,
        "import os, subprocess, sys\n"
        "spin = 'while True: pass'\n"
        "subprocess.Popen([sys.executable, '-c', spin])\n"
        "subprocess.Popen([sys.executable, '-c', spin], start_new_session=True)\n"
        "if os.fork() == 0:\n"  # a daemon: double fork, new session, parent gone
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        while True: pass\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "print(len([pid for pid in os.listdir('/proc') if pid.isdigit()]) >= 5)",
    )
    assert logs == "True\n"
    logs = await _logs(
        sandboxes,
        "import os\n"
        "alive = [pid for pid in os.listdir('/proc') if pid.isdigit()]\n"
        "print(sorted(int(pid) for pid in alive))",
    )
    assert logs == "[1, 2]\n"  # the supervisor and the worker (the REPL), nothing else, not even a zombie


async def test_processes_share_one_memory_budget(settings: Settings) -> None:
    # Each child stays far below its own 768 MiB address space; together they pass the session's 384 MiB.
    limits = {"sandbox_session_memory_bytes": 384 * MiB, "sandbox_call_timeout_seconds": 30}  # a busy machine
    manager = Sandboxes(settings.model_copy(update=limits))
    try:
        await _check_memory_budget(manager)
    finally:
        await manager.close()


async def _check_memory_budget(sandboxes: Sandboxes) -> None:
    result = await (await _session(sandboxes)).run(
        "import os, time\n"
        "x = 1\n"
        "for _ in range(4):\n"
        "    if os.fork() == 0:\n"
        "        kept = b'x' * (150 * 1024 * 1024)\n"
        "        time.sleep(30); os._exit(0)\n"
        "time.sleep(30)"
    )
    assert result.restarted
    assert "used more than 402653184 bytes of memory together" in result.logs
    logs = await _logs(
        sandboxes, "import os\nprint('x' in globals(), len([p for p in os.listdir('/proc') if p.isdigit()]))"
    )
    assert logs == "False 2\n"


async def test_processes_share_one_cpu_budget_for_the_session(settings: Settings) -> None:
    limits = {
        "sandbox_session_cpu_seconds": 2,
        "sandbox_call_timeout_seconds": 30,
    }  # a busy machine: CPU, not wall clock
    manager = Sandboxes(settings.model_copy(update=limits))
    try:
        spin = (
            "import subprocess, sys\n"
            "subprocess.run([sys.executable, '-c', 'import time\\nend = time.process_time() + 1.2\\n"
            "while time.process_time() < end: pass']).returncode"
        )
        session = await manager.session("thread_a")
        first = await session.run(spin)  # in a child process, not the REPL
        assert first.logs == "0\n" and not first.error
        await session.run(spin)
        refused = await session.run("print('ran')")
        assert "The session has used its CPU budget of 2 seconds" in refused.logs
        assert "ran" not in refused.logs and refused.error
    finally:
        await manager.close()


async def test_model_code_cannot_reach_the_tool_protocol(sandboxes: Sandboxes) -> None:
    result = await (await _session(sandboxes)).run(
        "import json, os\n"
        "forged = json.dumps({'type': 'result', 'logs': 'FORGED', 'error': False, 'blobs': []}).encode() + b'\\n'\n"
        "for fd in sorted(int(fd) for fd in os.listdir('/proc/self/fd')):\n"
        "    try:\n"
        "        os.write(fd, forged)\n"
        "    except OSError:\n"
        "        pass\n"
        "for path in ('/proc/1/fd', '/proc/1/mem', '/proc/1/environ'):\n"
        "    try:\n"
        "        os.listdir(path) if path.endswith('fd') else open(path, 'rb').read(1)\n"
        "        print('reached', path)\n"
        "    except OSError as error:\n"
        "        print(type(error).__name__)\n"
        "raise ValueError('real')"
    )
    assert result.error  # the real outcome, not the forged one
    assert "PermissionError\nPermissionError\nPermissionError\n" in result.logs
    assert "ValueError: real" in result.logs
    # What the code wrote to its stdout and stderr is plain data in the logs.
    assert result.logs.count("FORGED") == 2
    assert await _logs(sandboxes, "print('next')") == "next\n"  # still in step


async def test_model_code_cannot_stop_the_supervisor(sandboxes: Sandboxes) -> None:
    await _logs(sandboxes, "open('/mnt/data/kept.txt', 'w').write('kept')")
    logs = await _logs(
        sandboxes,
        "import os, signal\n"
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGKILL):\n"
        "    os.kill(1, sig)\n"
        "print('sent')",
    )
    assert logs == "sent\n"
    assert await _logs(sandboxes, "print(open('/mnt/data/kept.txt').read())") == "kept\n"


async def test_seccomp_blocks_io_uring_ptrace_and_namespaces(sandboxes: Sandboxes) -> None:
    logs = await _logs(
        sandboxes,
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "params = ctypes.create_string_buffer(120)\n"
        "calls = {'io_uring_setup': (425, 8, params), 'ptrace': (101, 0, 0, 0, 0), 'unshare': (272, 0),\n"
        "         'bpf': (321, 0, 0, 0), 'perf_event_open': (298, 0, 0, -1, -1, 0), 'keyctl': (250, 0),\n"
        "         'process_vm_readv': (310, 1, 0, 0, 0, 0, 0)}\n"
        "for name, args in calls.items():\n"
        "    result = libc.syscall(*args)\n"
        "    print(name, result, os.strerror(ctypes.get_errno()) if result == -1 else '')\n"
        "print('getpid', libc.syscall(39))",
    )
    if os.uname().machine != "x86_64":
        pytest.skip("the system call numbers in this test are x86_64's")
    assert logs.splitlines() == [
        "io_uring_setup -1 Operation not permitted",
        "ptrace -1 Operation not permitted",
        "unshare -1 Operation not permitted",
        "bpf -1 Operation not permitted",
        "perf_event_open -1 Operation not permitted",
        "keyctl -1 Operation not permitted",
        "process_vm_readv -1 Operation not permitted",
        "getpid 2",
    ]


def test_the_seccomp_filter_refuses_unknown_architectures() -> None:
    assert len(seccomp.program("x86_64")) % 8 == 0 and len(seccomp.program("aarch64")) % 8 == 0
    with pytest.raises(seccomp.UnsupportedArchitecture):
        seccomp.program("sparc64")


async def test_a_manager_on_another_event_loop_is_left_to_it(settings: Settings) -> None:
    """A second server in this process, on an event loop of its own thread
    (a test harness's, an embedding application's): deleting a thread here,
    or ending every session here, leaves that server's sessions to it. Its
    session and reaper belong to its loop; awaiting them here raised
    "attached to a different loop" (the thread delete a 500)."""
    elsewhere = asyncio.new_event_loop()
    thread = threading.Thread(target=elsewhere.run_forever, daemon=True)
    thread.start()
    other = Sandboxes(settings)
    try:
        started = asyncio.run_coroutine_threadsafe(other.session("thread_x"), elsewhere)
        await asyncio.wrap_future(started)
        await sandbox.forget("thread_x")
        await sandbox.close_all()
        assert list(other.sessions) == ["thread_x"]
    finally:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(other.close(), elsewhere))
        elsewhere.call_soon_threadsafe(elsewhere.stop)
        thread.join(timeout=10)
        elsewhere.close()
