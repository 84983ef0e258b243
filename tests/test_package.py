"""The package as a user installs it: a wheel built from this repository,
installed into a fresh virtualenv next to the openai SDK that user's own tests
pin (an old 1.x, the newest 3.x), started with `assistants-server serve` from
an empty folder, and driven through a create_and_poll round trip by that SDK,
run in that virtualenv. Nothing of the repository is importable there.

Slow-ish (two virtualenvs): pip's cache keeps it to about a minute each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.test_cli import free_port

pytestmark = pytest.mark.timeout(900)

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 600
START_TIMEOUT = 60.0

# openai 1.x releases before 1.55 pass `proxies` to httpx, which httpx 0.28
# removed: a user pinning such an SDK pins httpx below 0.28 as well.
SDKS = {
    "openai-1.30.5": ["openai==1.30.5", "httpx<0.28"],
    "openai-3.x": ["openai>=3,<4"],
}

ROUND_TRIP = """
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-anything", max_retries=0, timeout=30)
assistant = client.beta.assistants.create(model="gpt-4o", name="from a wheel")
thread = client.beta.threads.create()
client.beta.threads.messages.create(thread.id, role="user", content="hello from openai " + openai.__version__)
run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=50)
messages = client.beta.threads.messages.list(thread.id, order="asc").data
print(json.dumps({
    "sdk": openai.__version__,
    "status": run.status,
    "reply": messages[-1].content[0].text.value,
}))
"""

# What the installed core must not have pulled in.
CORE_CHECK = """
import importlib.util, json
app = importlib.util.find_spec("app")
print(json.dumps({"litellm": importlib.util.find_spec("litellm") is not None, "app": app and app.origin}))
"""


def _pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from the working tree as `pip wheel .` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    _pip(Path(sys.executable), "wheel", "--no-deps", "--wheel-dir", str(out), str(REPO_ROOT))
    (built,) = out.glob("assistants_server-*.whl")
    return built


def _outside_env() -> dict[str, str]:
    """No ASSISTANTS_* of the developer's, and nothing that would make the
    repository importable (PYTHONPATH, the dev venv on PATH)."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {key: value for key, value in os.environ.items() if not key.startswith("ASSISTANTS_") and key not in drop}


@pytest.fixture(params=sorted(SDKS))
def installed(request: pytest.FixtureRequest, wheel: Path, tmp_path: Path) -> Path:
    """A fresh virtualenv with the wheel and one openai SDK; returns its bin/."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    _pip(python, "install", str(wheel), *SDKS[request.param])
    return target / "bin"


@pytest.fixture
def served(installed: Path, tmp_path: Path) -> Iterator[str]:
    """`assistants-server serve` from the virtualenv, in an empty folder."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [str(installed / "assistants-server"), "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=workdir, env=_outside_env(), stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server did not answer:\n{log_path.read_text()}"
            try:
                httpx2.get(f"{base_url}/assistants", timeout=1.0)
                break
            except httpx2.TransportError:
                time.sleep(0.05)
        yield base_url
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=20)


def _run(installed: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(installed / "python"), *args],
        cwd=installed.parent,
        env=_outside_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_wheel_serves_the_sdk_it_is_installed_next_to(installed: Path, served: str) -> None:
    import app

    version = subprocess.run(
        [str(installed / "assistants-server"), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.stdout.strip() == f"assistants-server {app.__version__}", version.stderr

    core = _run(installed, "-c", CORE_CHECK)
    assert core.returncode == 0, core.stderr
    found = json.loads(core.stdout)
    assert found["litellm"] is False, "the core must not install litellm"
    assert found["app"].startswith(str(installed.parent)), f"app imported from {found['app']}, not the virtualenv"

    done = _run(installed, "-c", ROUND_TRIP, served)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed"
    assert result["reply"] == f"You said: hello from openai {result['sdk']}"


PLUGIN_TEST = """
import openai


def test_scripted_run(assistants):
    client = openai.OpenAI()  # the plugin points OPENAI_BASE_URL / OPENAI_API_KEY at its server
    assistant = client.beta.assistants.create(model="gpt-4o")
    assistants.script("Scripted for openai " + openai.__version__, assistant_id=assistant.id)
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=50)
    reply = client.beta.threads.messages.list(thread.id, order="desc").data[0].content[0].text.value
    assert (run.status, reply) == ("completed", "Scripted for openai " + openai.__version__)
    assert assistants.model_requests(run.id)[0]["request"]["messages"][-1] == {"role": "user", "content": "hi"}


def test_isolated(assistants):
    assert openai.OpenAI().beta.assistants.list().data == []
"""


def test_the_pytest_plugin_works_next_to_that_sdk(installed: Path, tmp_path: Path) -> None:
    """A user's project: their SDK, pytest, and the plugin the wheel ships (pytest11)."""
    _pip(installed / "python", "install", "pytest")
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_app.py").write_text(PLUGIN_TEST)
    done = subprocess.run(
        [str(installed / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=project,
        env=_outside_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
