"""``make lint`` holds the package to its layers and to strict typing: it fails when they break.

Each test lints a copy of the repository with one deliberate fault, so the
checked-out tree is never touched.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package, its configuration and what the type checker's plugin imports."""
    for name in ("ormbridge", "tests", "example"):
        shutil.copytree(
            ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / tool), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={"PATH": str(BIN), "PYTHONPATH": str(cwd)},
    )


def test_an_import_against_the_data_flow_fails_the_layers_contract(copy: Path):
    assert run("lint-imports", cwd=copy).returncode == 0
    conf = copy / "ormbridge" / "conf.py"
    conf.write_text(conf.read_text() + "\nfrom ormbridge import relay  # noqa\n")
    done = run("lint-imports", cwd=copy)
    assert done.returncode == 1
    assert "ormbridge.conf is not allowed to import ormbridge.relay" in done.stdout


@pytest.mark.lint
def test_a_type_error_fails_mypy(copy: Path):
    module = copy / "ormbridge" / "replay.py"
    args = ("--follow-imports=silent", "--no-incremental", "ormbridge/replay.py")
    assert run("mypy", *args, cwd=copy).returncode == 0
    module.write_text(module.read_text() + '\nWRONG: int = "not an int"\n')
    done = run("mypy", *args, cwd=copy)
    assert done.returncode == 1
    assert 'Incompatible types in assignment (expression has type "str"' in done.stdout
