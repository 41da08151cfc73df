"""The README's first command: the demo runs on SQLite and an embedded Redis."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def demo_env(tmp_path) -> dict[str, str]:
    """The environment of a shell with nothing configured but an SQLite file."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    return env


def test_the_demo_runs_on_embedded_services(tmp_path):
    done = subprocess.run(
        [sys.executable, "manage.py", "demo", "--rows", "3000", "--saves", "500", "--hot", "50"],
        cwd=ROOT / "example",
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Embedded Redis" in done.stdout
    assert "Stale reads at commit:     0 of 50" in done.stdout
    assert "Stale reads after delivery: 0 of 50" in done.stdout


def test_the_demo_refuses_bad_numbers(tmp_path):
    done = subprocess.run(
        [sys.executable, "manage.py", "demo", "--rows", "0"],
        cwd=ROOT / "example",
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "CommandError: --rows and --saves must be >= 1 and --hot between 1 and --rows."
    )
