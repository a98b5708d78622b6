"""The README and docs/ as a reader uses them: examples run as written, commands and links hold."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import PROBLEM, REPO_ROOT, UvicornThread

README = REPO_ROOT / "README.md"
DOCS = [README, REPO_ROOT / "CHANGELOG.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def _python_block(path: Path, marker: str) -> str:
    """The one ```python block of ``path`` that contains ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{path.name} should have one python block with {marker!r}, has {len(blocks)}"
    return blocks[0]


async def _two_messages_for_one_session_then_another(example: str, filename: str) -> None:
    """Serve the example's ``app`` on a real uvicorn: one session runs one turn at a time, others are not held up."""
    assert len([line for line in example.splitlines() if line.strip()]) <= 12, "an example a reader takes in at a glance"
    namespace: dict[str, Any] = {}
    exec(compile(example, filename, "exec"), namespace)
    with UvicornThread(namespace["app"]) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            answers = await asyncio.gather(*(client.post("/chat/c1", json={"text": "hi"}) for _ in range(2)))
            other = await client.post("/chat/c2", json={"text": "hi"})
    assert sorted(answer.status_code for answer in answers) == [200, 409]
    busy = next(answer for answer in answers if answer.status_code == 409)
    assert busy.headers["content-type"] == PROBLEM and busy.json()["type"].endswith("/session-busy")
    assert int(busy.headers["retry-after"]) >= 1
    assert other.status_code == 200 and other.json() == {"reply": "hi"}


@pytest.mark.anyio
async def test_the_readme_example_works_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example's default settings keep data in ./data
    await _two_messages_for_one_session_then_another(_python_block(README, "from starlette"), "README.md")
    assert (tmp_path / "data").is_dir()


@pytest.mark.anyio
async def test_the_readme_fastapi_example_works_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    await _two_messages_for_one_session_then_another(_python_block(README, "from fastapi"), "README.md")
    assert (tmp_path / "data").is_dir()


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci_lines[-1]
    assert "pytest" in command, f".ci/run should end with the README's test command, ends with {command!r}"
    assert command in README.read_text().splitlines(), f"README.md should show .ci/run's command as is: {command}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_relative_links_point_at_files_and_headings_that_exist(path: Path) -> None:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name}: no heading #{anchor} in {linked.name}"


def _source_modules() -> set[str]:
    """``app.X`` / ``middleware.X`` for every module and subpackage of the two source folders."""
    names = set()
    for folder in ("app", "middleware"):
        for child in (REPO_ROOT / folder).iterdir():
            if child.suffix == ".py" or (child / "__init__.py").exists():
                names.add(f"{folder}.{child.stem}")
    return names - {"app.__init__", "middleware.__init__"}


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_docs_name_modules_by_their_import_names(path: Path) -> None:
    """``app/`` and ``middleware/`` are source folders; the modules import as ``sessiongate[.gateway]``."""
    text = path.read_text()
    assert not re.findall(r"^\s*(?:from|import) (?:app|middleware)\b", text, re.M), f"{path.name} imports app/middleware"
    folder_modules = "|".join(re.escape(name) for name in sorted(_source_modules()))
    stale = re.findall(rf"(?<![\w./])(?:{folder_modules})\b", text)
    assert not stale, f"{path.name} names modules by their source folder: {sorted(set(stale))}"
