"""Running management commands the way an operator does: as a process."""

import os
import subprocess
import sys

from django.db import connection

from tests.conftest import ROOT


def manage(*args: str, env: dict[str, str] | None = None, **options) -> subprocess.Popen:
    """Start ``manage.py <args>`` on the test database and services."""
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ORMBRIDGE_TEST_DB_NAME": connection.settings_dict["NAME"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "example" / "manage.py"), *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,
    )


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    process = manage(*args, env=env)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
