"""Load test: one change event fanned out by Pushpin to N Server-Sent Events clients.

    python bench/pushpin_clients.py                  # 5,000 clients
    python bench/pushpin_clients.py --clients 500

Starts a Pushpin of its own (temporary directory, free ports, needs Debian's
``pushpin``) in front of the example project under uvicorn, with
django-eventstream and ormbridge's channel manager (docs/eventstream.md). N
logged-in clients subscribe to ``shop.product`` through Pushpin: Django answers
each subscription once with GRIP instructions and holds no connection; Pushpin
holds them all. Then ``EventStreamEmitter`` publishes one event (what the relay
does for a ``safe_bulk_update``) and the benchmark prints how many clients got
it, the latency from the event's creation to its arrival (p50, p99, max), and
Pushpin's resident memory (all its processes) idle, with the clients, after the
event. Clients are asyncio sockets of one process; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bulk_update import ROOT, ensure_database, setup_django

if TYPE_CHECKING:
    from tests.pushpin import Pushpin

CONNECT_TIMEOUT = 180.0
DELIVERY_TIMEOUT = 30.0
OPENING = 32  # subscriptions in flight at once: each costs Django a request and a DB connection
MARKER = b"event: message\ndata: "


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sockets(pid: int) -> int:
    """Open sockets of a process: what it holds, listening socket included."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def session_cookie() -> str:
    from django.conf import settings
    from django.contrib.auth.models import Permission, User
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    user, _ = User.objects.get_or_create(username="pushpin-bench")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


class Fanout:
    """What the clients saw: how many subscribed, and each one's delivery latency."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.subscribed = 0
        self.refused = 0
        self.all_answered = asyncio.Event()
        self.latencies: list[float] = []

    def answered(self) -> None:
        if self.subscribed + self.refused == self.clients:
            self.all_answered.set()


async def listen(port: int, cookie: str, fanout: Fanout, opening: asyncio.Semaphore) -> None:
    """One browser-like client: subscribe through Pushpin, wait for one event, note its latency."""
    async with opening:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /eventstream/?channel=shop.product HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Cookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        buffer = b""
        while b"stream-open" not in buffer:
            chunk = await reader.read(65536)
            if not chunk or b"stream-error" in buffer + chunk:
                fanout.refused += 1
                if fanout.refused == 1:
                    print("first refusal:", (buffer + chunk)[:200])
                fanout.answered()
                writer.close()
                return
            buffer += chunk
    fanout.subscribed += 1
    fanout.answered()
    try:
        while MARKER not in buffer:
            chunk = await reader.read(65536)
            if not chunk:
                return
            buffer += chunk
        line = buffer.split(MARKER, 1)[1].split(b"\n", 1)[0]
        fanout.latencies.append(time.time() - json.loads(line)["ts"])
    finally:
        writer.close()


async def run(proxy: Pushpin, clients: int, cookie: str, server_pid: int) -> None:
    from asgiref.sync import sync_to_async

    from ormbridge import broadcast
    from ormbridge.contrib.eventstream import EventStreamEmitter

    fanout = Fanout(clients)
    opening = asyncio.Semaphore(OPENING)
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(listen(proxy.port, cookie, fanout, opening)) for _ in range(clients)
    ]
    try:
        await asyncio.wait_for(fanout.all_answered.wait(), CONNECT_TIMEOUT)
    except TimeoutError:
        answered = fanout.subscribed + fanout.refused
        print(f"only {answered} of {clients} clients answered in {CONNECT_TIMEOUT} s")
    print(
        f"{fanout.subscribed} clients subscribed through Pushpin in "
        f"{time.perf_counter() - started:.1f} s ({fanout.refused} refused); "
        f"Pushpin RSS with them: {proxy.rss_mb():.0f} MB; uvicorn has "
        f"{sockets(server_pid)} sockets open (none a client's), RSS {rss_mb(server_pid):.0f} MB"
    )
    event = broadcast.make_event("update", "shop.product", [1], ["price"])
    try:
        await sync_to_async(EventStreamEmitter().emit)([event])
    except Exception as error:  # reported with Pushpin's own log lines below
        print(f"the publish failed: {error}")
    await asyncio.wait(tasks, timeout=DELIVERY_TIMEOUT)
    for task in tasks:
        task.cancel()
    latencies = sorted(fanout.latencies)
    print(f"event delivered to {len(latencies)} of {clients} clients")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        )
    print(f"Pushpin RSS after the event: {proxy.rss_mb():.0f} MB")
    if len(latencies) < clients:
        lines = proxy.text().splitlines()
        problems = [line for line in lines if not line.startswith(("[INFO]", "[DEBUG]"))]
        problems = [line[:300] for line in problems]
        print("Pushpin's log, but for its INFO lines:", *problems[-10:], sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 3 * args.clients + 256)), hard))
    sys.path.insert(0, str(ROOT))
    from tests.pushpin import Pushpin, executable

    if executable() is None:
        sys.exit("pushpin is not installed (Debian: apt-get install pushpin)")
    directory = tempfile.TemporaryDirectory(prefix="ormbridge-pushpin-")
    proxy = Pushpin(Path(directory.name), max_connections=args.clients + 100)
    os.environ["GRIP_URL"] = proxy.grip_url  # this process publishes; the server hands out GRIP
    setup_django()
    ensure_database()
    cookie = session_cookie()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "example.asgi:application", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--backlog", "4096"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "bench.settings",
             "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")])},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                sys.exit("uvicorn did not start")
            time.sleep(0.1)
        proxy.start(port)
        version = subprocess.run(
            [executable() or "pushpin", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        today = datetime.datetime.now(datetime.UTC)
        print(
            f"# ormbridge bench/pushpin_clients.py, {today:%Y-%m-%d}: "
            f"{args.clients} clients, {version} in front of uvicorn, 127.0.0.1, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"Pushpin RSS idle: {proxy.rss_mb():.0f} MB")
        asyncio.run(run(proxy, args.clients, cookie, server.pid))
    finally:
        proxy.stop()
        server.terminate()
        server.wait(30)
        directory.cleanup()


if __name__ == "__main__":
    main()
