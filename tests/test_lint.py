"""``make lint`` holds the package to its design: the import contract fails when it breaks.

Each test lints a copy of the package and its ``pyproject.toml`` with one deliberate
fault, so the checked-out tree is never touched. Only import-linter runs here (a second
or two a run); ``make lint`` runs ruff and mypy on the tree itself.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# make lint runs these (-m lint); the test passes leave them out.
pytestmark = pytest.mark.lint

BIN = Path(sys.executable).parent


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package and the configuration that holds its contract."""
    shutil.copytree(
        ROOT / "ormbridge", tmp_path / "ormbridge", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache", "--no-logo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(BIN), "PYTHONPATH": str(cwd)},
    )


def add_import(copy: Path, module: str, line: str) -> None:
    path = copy / "ormbridge" / f"{module}.py"
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")


def broken(done: subprocess.CompletedProcess[str]) -> str:
    """The report of a failed run, on one line per statement (the report wraps at 80)."""
    assert done.returncode == 1, done.stdout + done.stderr
    return " ".join(done.stdout.split())


def test_the_package_keeps_its_contract(copy: Path):
    done = lint_imports(copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 kept, 0 broken" in done.stdout


def test_an_import_against_the_data_flow_fails_the_layers_contract(copy: Path):
    add_import(copy, "conf", "from ormbridge import relay")
    report = broken(lint_imports(copy))
    assert "ormbridge.conf is not allowed to import ormbridge.relay" in report


def test_a_read_module_that_imports_the_relay_fails_the_contract(copy: Path):
    add_import(copy, "querysets", "from ormbridge import relay")
    report = broken(lint_imports(copy))
    assert "Reads never import the write side or the delivery side BROKEN" in report
    assert "ormbridge.querysets is not allowed to import ormbridge.relay" in report


@pytest.mark.parametrize(
    ("module", "line", "imported"),
    [
        ("bulk", "from ormbridge import relay", "ormbridge.relay"),
        ("resync", "from ormbridge.relay import deliver_held", "ormbridge.relay"),
        ("commit", "from ormbridge import broadcast", "ormbridge.broadcast"),
    ],
)
def test_the_write_side_importing_the_delivery_side_past_the_door_fails_the_contract(
    copy: Path, module: str, line: str, imported: str
):
    add_import(copy, module, line)
    report = broken(lint_imports(copy))
    assert "reaches the delivery side only through sync_delivery BROKEN" in report
    assert f"ormbridge.{module} is not allowed to import {imported}" in report


def test_the_door_itself_is_allowed(copy: Path):
    """``sync_delivery`` is the write side's one way in: a write module importing it
    keeps every contract (bulk and resync do)."""
    add_import(copy, "capture_signals", "from ormbridge import sync_delivery")
    done = lint_imports(copy)
    assert done.returncode == 0, done.stdout


def test_a_module_left_out_of_the_contract_fails_it(copy: Path):
    (copy / "ormbridge" / "newroom.py").write_text(
        '"""A module nobody gave a place."""\n\nfrom ormbridge.conf import settings  # noqa\n'
    )
    report = broken(lint_imports(copy))
    assert "The following modules are not listed as layers: - ormbridge.newroom" in report


def test_contrib_importing_past_the_public_surface_fails_the_contract(copy: Path):
    add_import(copy, "contrib/pusher", "from ormbridge import relay")
    report = broken(lint_imports(copy))
    assert "contrib uses the public surface" in report
    assert "ormbridge.contrib.pusher -> ormbridge.relay" in report
