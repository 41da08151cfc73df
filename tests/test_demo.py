"""The README's first command: the demo runs on SQLite and an embedded Redis, and every
figure it prints is one it measured."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

DEMO = [sys.executable, "manage.py", "demo", "--rows", "3000", "--saves", "500", "--hot", "50"]
WORKER_LINE = re.compile(r"Worker \(pid (\d+)\): (.+)")
PROC = Path("/proc")


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a shell with nothing configured but an SQLite file."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"REDIS_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    return env


def command_line(pid: int) -> list[str]:
    """The arguments process ``pid`` runs with. Its exec may not have set them up yet when
    the parent's Popen returns (cmdline reads empty until then): wait for them, bounded."""
    cmdline = b""
    deadline = time.monotonic() + 10
    while not cmdline and time.monotonic() < deadline:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes()
        time.sleep(0.01)
    return [part.decode() for part in cmdline.split(b"\0")[:-1]]


@dataclass
class DemoRun:
    returncode: int
    stdout: str
    stderr: str
    printed_worker: list[str] = field(default_factory=list)
    running_worker: list[str] = field(default_factory=list)

    def figure(self, label: str) -> str:
        """What the summary line ``label:`` says, spaces collapsed."""
        for line in self.stdout.splitlines():
            if line.startswith(f"{label}:"):
                return " ".join(line[len(label) + 1 :].split())
        raise AssertionError(f"no {label!r} line in the demo's output:\n{self.stdout}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One demo run (500 saves over 50 of 3,000 products) shared by the tests of its output.

    The worker's command line is read from /proc while the demo runs, to compare it with
    the one the demo prints.
    """
    tmp = tmp_path_factory.mktemp("demo")
    env = {**demo_env(tmp), "PYTHONUNBUFFERED": "1"}  # each line as soon as it is printed
    with open(tmp / "stderr", "w+") as stderr:
        process = subprocess.Popen(
            DEMO, cwd=ROOT / "example", env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        timer = threading.Timer(240, process.kill)  # a hung demo fails the tests, bounded
        timer.start()
        run = DemoRun(0, "", "")
        lines = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                printed = WORKER_LINE.match(line)
                if printed and PROC.is_dir():
                    run.printed_worker = shlex.split(printed[2])
                    run.running_worker = command_line(int(printed[1]))
            run.returncode = process.wait()
        finally:
            timer.cancel()
            process.kill()
        stderr.seek(0)
        run.stderr = stderr.read()
    run.stdout = "".join(lines)
    return run


def test_the_demo_runs_on_embedded_services(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Embedded Redis" in demo.stdout
    assert demo.figure("Stale reads after delivery") == "0 of 50"


def test_the_demo_counts_the_saves_it_makes(demo: DemoRun) -> None:
    # --hot 50: the transaction updates the 50 hot products and orders each once.
    assert demo.figure("Saves") == (
        "600: 500 single commits over 50 products, "
        "then 50 product updates + 50 new orders in one transaction"
    )


def test_the_demo_counts_the_cache_entries_it_deleted(demo: DemoRun) -> None:
    assert demo.figure("Cache entries deleted") == (
        "50 (50 cached before the saves, 0 left after delivery)"
    )


def test_the_demo_counts_distinct_rows_invalidated(demo: DemoRun) -> None:
    assert re.fullmatch(
        r"100 distinct \(50 products, 50 orders\), in [\d,]+ relay batch(es)?",
        demo.figure("Rows invalidated"),
    ), demo.stdout


def test_the_demo_counts_the_task_messages_the_saves_sent(demo: DemoRun) -> None:
    assert demo.figure("Celery tasks sent") == "0 by the saves (counted by before_task_publish)"


def test_the_demo_shows_its_rolled_back_transaction_left_nothing(demo: DemoRun) -> None:
    assert re.fullmatch(
        r"renamed category \d+: 0 change-log rows, 0 events, "
        r"its cache entry still a hit \(name 'demo'\)",
        demo.figure("Rolled back"),
    ), demo.stdout


def test_the_demo_measures_commit_to_fresh_latency(demo: DemoRun) -> None:
    assert re.fullmatch(
        r"p50 [\d.]+ ms, p99 [\d.]+ ms, max [\d.]+ ms over 200 commits "
        r"\(another process reading through cached_instance; 0 stale reads begun after "
        r"a commit returned\)",
        demo.figure("Commit -> fresh"),
    ), demo.stdout


def test_the_demo_prints_the_worker_command_it_runs(demo: DemoRun) -> None:
    if not PROC.is_dir():
        pytest.skip("reads the worker's command line from /proc")
    assert demo.printed_worker, demo.stdout
    assert demo.printed_worker == demo.running_worker


def test_the_demo_refuses_bad_numbers(tmp_path: Path) -> None:
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
