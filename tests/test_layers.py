"""The packages import one way, top to bottom: cli > web | experiments > worker > method > core
(the contract is in pyproject.toml, checked by import-linter, which reads every import statement,
those inside functions too)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]


def lint(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LINT, str(where / "pyproject.toml")],
        cwd=where,
        env={"PYTHONPATH": str(where), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def test_the_code_keeps_the_one_way_layers():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, upward",
    [
        ("core/tokens.py", "from channelscope.web import urls\n"),  # top level
        ("method/measures.py", "def _late():\n    from channelscope.worker import plan\n"),  # in a function
        ("worker/store.py", "def _late():\n    import channelscope.cli.common\n"),
        ("web/urls.py", "def _late():\n    from channelscope.experiments import eval_report\n"),  # a sibling
    ],
)
def test_an_upward_import_anywhere_breaks_the_contract(tmp_path, module, upward):
    shutil.copytree(
        ROOT / "channelscope", tmp_path / "channelscope", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint(tmp_path).returncode == 0  # the copy as it is keeps the contract
    with open(tmp_path / "channelscope" / module, "a") as f:
        f.write("\n\n" + upward)
    result = lint(tmp_path)
    assert result.returncode != 0 and "0 kept, 1 broken" in result.stdout, result.stdout
