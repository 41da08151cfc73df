"""The chaos run's services: its Redis servers, Celery workers and database."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.chaos import ROOT
from tests.processes import die_with_parent

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/ormbridge_chaos"
BACKLOG = "SELECT count(*) FROM ormbridge_changebatch WHERE state IN ('pending', 'claimed')"


def _die_with_run() -> None:
    """In a child (before exec, or first thing): SIGKILL when the run's process dies."""
    die_with_parent(signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of the run's own, on a free port; restarted on the same port."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory / name
        self.directory.mkdir()
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self, from_snapshot: bool = False) -> None:
        """Start it empty, or on the last snapshot (``SAVE`` writes ``snapshot.rdb``; Redis 7
        refuses to change ``dbfilename`` at run time, so an empty start hides the file)."""
        snapshot = self.directory / "snapshot.rdb"
        hidden = self.directory / "snapshot.hidden"
        if not from_snapshot and snapshot.exists():
            snapshot.rename(hidden)
        log = (self.directory / "redis.log").open("ab")
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--dbfilename", snapshot.name],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_run,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        try:
            while True:
                try:
                    self.client().ping()
                    return
                except Exception:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise RuntimeError(
                            f"{self.name} Redis did not start on {self.port}"
                        ) from None
                    time.sleep(0.05)
        finally:
            if hidden.exists():
                hidden.rename(snapshot)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def snapshot(self) -> None:
        self.client().save()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


class Worker:
    """A ``celery worker`` process (solo pool: its relay and its tasks)."""

    def __init__(self, index: int, run_dir: Path, queue: str) -> None:
        self.index = index
        self.run_dir = run_dir
        self.queue = queue
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {
            **os.environ,
            "PGAPPNAME": f"chaos-worker-{self.index}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")]),
        }
        log = self.run_dir / f"worker-{self.index}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "example", "worker", "-Q", self.queue,
             "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "WARNING", "-n", f"chaos-{self.index}-{self.starts}@%h", "--logfile", str(log)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_run,
        )  # fmt: skip

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None


def connection_params(db: dict[str, Any]) -> dict[str, Any]:
    """psycopg's connection arguments for a Django database's settings (without its name)."""
    params = {"host": db["HOST"], "port": db["PORT"], "user": db["USER"]}
    if db.get("PASSWORD"):
        params["password"] = db["PASSWORD"]
    return params


def create_database(db: dict[str, Any]) -> None:
    """The run's database, created empty (dropped first, with its sessions, if it exists)."""
    import psycopg

    with psycopg.connect(**connection_params(db), dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db["NAME"]}"')


def drop_database(db: dict[str, Any]) -> None:
    """Drop the database the run created (its processes are gone or going: FORCE)."""
    import psycopg

    with psycopg.connect(**connection_params(db), dbname="postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db["NAME"]}" WITH (FORCE)')
