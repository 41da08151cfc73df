"""A real Pushpin (GRIP proxy) for the django-eventstream test and benchmark.

Each instance has its own directory (``pushpin.conf``, ``routes``, run and log
directories) and its own free ports on 127.0.0.1, so it runs unprivileged beside
anything else, the system's Pushpin included. No pytest here: the benchmark uses it too.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests import processes

SIG_KEY = "ormbridge-test-grip-signing-key-of-32-bytes-or-more"
"""Pushpin signs what it forwards with it (``Grip-Sig``); ``grip_url`` makes Django verify it."""


def executable() -> str | None:
    return shutil.which("pushpin")


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _listening(port: int) -> bool:
    with socket.socket() as client:
        return client.connect_ex(("127.0.0.1", port)) == 0


class Pushpin:
    """Pushpin routing every request to ``127.0.0.1:<origin port>``.

    Its ports are chosen at construction, so ``grip_url`` can be given to Django
    before the origin (and so the route) is known.
    """

    def __init__(self, directory: Path, max_connections: int = 1000) -> None:
        self.directory = directory
        self.max_connections = max_connections
        self.port, self.publish_port, self.push_port, self.sub_port, self.command_port = (
            _free_ports(5)
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "pushpin.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grip_url(self) -> str:
        """Django's ``GRIP_URL``: Pushpin's HTTP publish endpoint, and the key it signs with."""
        return f"http://127.0.0.1:{self.publish_port}?key={SIG_KEY}"

    def start(self, origin_port: int, timeout: float = 30) -> None:
        binary = executable()
        if binary is None:
            raise RuntimeError("pushpin is not installed (Debian: apt-get install pushpin)")
        run, logs = self.directory / "run", self.directory / "log"
        run.mkdir(parents=True, exist_ok=True)
        logs.mkdir(exist_ok=True)
        (self.directory / "routes").write_text(f"* 127.0.0.1:{origin_port}\n")
        config = self.directory / "pushpin.conf"
        config.write_text(
            "\n".join(
                [
                    "[global]",
                    "include={libdir}/internal.conf",
                    f"rundir={run}",
                    "ipc_prefix=pushpin-",
                    "port_offset=0",
                    "[runner]",
                    "services=condure,zurl,pushpin-proxy,pushpin-handler",
                    f"http_port=127.0.0.1:{self.port}",
                    f"logdir={logs}",
                    "log_level=2",
                    f"client_maxconn={self.max_connections}",
                    "[proxy]",
                    "routesfile=routes",
                    # internal.conf puts zurl (Pushpin's client to the origin) in /var/run/zurl
                    "zurl_out_specs=ipc://{rundir}/{ipc_prefix}zurl-in",
                    "zurl_out_stream_specs=ipc://{rundir}/{ipc_prefix}zurl-in-stream",
                    "zurl_in_specs=ipc://{rundir}/{ipc_prefix}zurl-out",
                    "sig_iss=pushpin",
                    f"sig_key={SIG_KEY}",
                    "updates_check=off",
                    "[handler]",
                    f"push_in_spec=tcp://127.0.0.1:{self.push_port}",
                    f"push_in_sub_specs=tcp://127.0.0.1:{self.sub_port}",
                    "push_in_sub_connect=false",
                    "push_in_http_addr=127.0.0.1",
                    f"push_in_http_port={self.publish_port}",
                    "stats_spec=ipc://{rundir}/{ipc_prefix}stats",
                    f"command_spec=tcp://127.0.0.1:{self.command_port}",
                    # Debian's pushpin.conf values: without a rate, a publish to 5,000
                    # connections at once makes condure 1.36 panic
                    "message_rate=2500",
                    "message_hwm=25000",
                    "",
                ]
            )
        )
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "--config", str(config), "--merge-output"],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=processes.die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not (self._publishes() and self._proxies()):
            if self.process.poll() is not None:
                raise RuntimeError(f"pushpin exited with {self.process.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pushpin did not listen within {timeout} s:\n{self.text()}")
            time.sleep(0.05)

    def _publishes(self) -> bool:
        """Whether Pushpin takes a publish (an empty one): listening is not enough, its
        handler answers errors while it starts, and the relay would back off."""
        if not _listening(self.publish_port):
            return False
        client = http.client.HTTPConnection("127.0.0.1", self.publish_port, timeout=5)
        try:
            client.request("POST", "/publish/", body=b'{"items": []}',
                           headers={"Content-Type": "application/json"})  # fmt: skip
            return client.getresponse().status == 200
        except OSError:
            return False
        finally:
            client.close()

    def _proxies(self) -> bool:
        """Whether a request through Pushpin reaches the origin: while its parts connect,
        Pushpin answers 502 ("received message out of sequence") or drops the connection."""
        if not _listening(self.port):
            return False
        client = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            client.request("GET", "/pushpin-started/")
            return client.getresponse().status != 502
        except (OSError, http.client.HTTPException):
            return False
        finally:
            client.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rss_mb(self) -> float:
        """Resident memory of Pushpin's runner and every process it started, in MB."""
        if self.process is None:
            return 0.0
        pids = [self.process.pid, *processes.children(self.process.pid)]
        return sum(processes.status_kb(pid, "VmRSS") for pid in pids) / 1024

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.process = None
