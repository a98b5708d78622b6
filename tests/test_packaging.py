"""The distribution as a user installs it: one top-level package, typed, the gateway's stack behind an extra.

These build the real wheel from this checkout and install it into a fresh
virtual environment, so a packaging mistake (a module left out, a top-level
``app`` shipped, a gateway import in the library) fails here and not on a
user's machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

SERVER_STACK = ("uvicorn", "httpx", "prometheus_client", "tenacity", "redis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO_ROOT)],
        check=True, timeout=300,
    )
    return next(out.glob("sessiongate-*.whl"))


def test_the_wheel_installs_one_top_level_package_with_its_resources(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"sessiongate"}
    for resource in ("sessiongate/py.typed", "sessiongate/gateway/static/index.html", "sessiongate/gateway/__main__.py"):
        assert resource in names
    assert any(name.startswith("sessiongate/") and name.endswith(".lua") for name in names)


def test_importing_the_library_loads_no_server_stack() -> None:
    probe = f"import sys, sessiongate; print(sorted(m for m in {SERVER_STACK[:2] + SERVER_STACK[3:]!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/")
    assert loaded.stdout.strip() == "[]"


def test_the_library_alone_installs_and_guards_a_fastapi_app(wheel: Path, tmp_path: Path) -> None:
    """``pip install sessiongate`` (no extras) into a fresh venv: no gateway stack, SessionGate mounts in FastAPI."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel), "fastapi"], check=True, timeout=300)
    script = textwrap.dedent(f"""
        import asyncio, importlib.util, json
        from fastapi import FastAPI
        from sessiongate import SessionGate, Settings
        assert [m for m in {SERVER_STACK!r} if importlib.util.find_spec(m)] == [], "no extra was asked for"
        app = FastAPI()
        app.add_middleware(SessionGate, settings=Settings(backend={{"url": "memory://"}}),
                           session_key=lambda scope: scope["path"].rpartition("/")[2] or None)
        @app.post("/chat/{{session}}")
        async def chat(session: str) -> dict:
            await asyncio.sleep(0.2)
            return {{"session": session}}
        async def post(path):  # a bare ASGI call: no HTTP client is installed either
            sent = []
            async def receive():
                return {{"type": "http.request", "body": b"", "more_body": False}}
            async def send(message):
                sent.append(message)
            scope = {{"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "headers": [],
                      "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
                      "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}}
            await app(scope, receive, send)
            return sent[0]["status"], json.loads(sent[-1]["body"])
        async def main():
            (first, body), (second, problem) = await asyncio.gather(post("/chat/s1"), post("/chat/s1"))
            print(first, body["session"], second, problem["type"].rsplit("/", 1)[1])
        asyncio.run(main())
        print(sorted(n for n in ("app", "middleware") if importlib.util.find_spec(n)))
    """)
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["200", "s1", "409", "session-busy", "[]"]
