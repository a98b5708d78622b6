"""The static checks are part of the test command: ruff, the import rules and mypy (strict on the library).

``.ci/lint`` holds the commands, so a developer runs the same checks without pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO_ROOT


def test_lint_and_type_check_pass() -> None:
    run = subprocess.run(
        ["bash", str(REPO_ROOT / ".ci" / "lint")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert run.returncode == 0, run.stdout + run.stderr
