"""Load test: one change event fanned out to N concurrent Server-Sent Events clients.

    python bench/sse_clients.py                 # 5,000 clients
    python bench/sse_clients.py --clients 200

Starts the example project under uvicorn (ASGI, one process) on 127.0.0.1, opens
N logged-in event streams from this process, emits one event through the Redis
streams emitter, and prints how many clients got it, the delivery latency (p50,
p99, max: from the event's creation to its arrival), the server's memory before
and after the clients connected, and the Redis connections the server holds
(its streams share one reader: ormbridge.fanout). Targets: every client, p99 <=
250 ms, <= 10 Redis connections. Loopback only; every wait is bounded.
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
import time

from bulk_update import ROOT, ensure_database, setup_django

CONNECT_TIMEOUT = 300.0
CONNECTING = 50  # subscriptions in flight at a time
DELIVERY_TIMEOUT = 30.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def redis_connections(server_pid: int) -> tuple[int, int]:
    """Connections to ormbridge's Redis named by the server process's event streams' hub,
    and every connection that Redis has."""
    from ormbridge import redis_store

    listed = redis_store.get_redis().client_list()
    held = sum(1 for row in listed if row["name"] == f"ormbridge-events:{server_pid}")
    return held, len(listed)


def session_cookie() -> str:
    from django.conf import settings
    from django.contrib.auth.models import Permission, User
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    user, _ = User.objects.get_or_create(username="sse-bench")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


class Fanout:
    """What the clients saw: how many subscribed, and each one's delivery latency."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.subscribed = 0
        self.all_subscribed = asyncio.Event()
        self.latencies: list[float] = []
        self.done = asyncio.Event()


class Listener(asyncio.Protocol):
    """One browser-like client: subscribe, wait for one event, note its latency.

    A bare protocol, not a stream reader and a task: the measuring side of 5,000
    connections must cost little beside the server on the same cores. The arrival
    time is taken as the bytes arrive.
    """

    def __init__(self, request: bytes, fanout: Fanout, connecting: asyncio.Semaphore) -> None:
        self.request = request
        self.fanout = fanout
        self.connecting = connecting
        self.buffer = b""
        self.subscribed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        self.buffer += data
        if not self.subscribed and b"retry:" in self.buffer:
            self.subscribed = True
            self.connecting.release()
            self.buffer = self.buffer.split(b"retry:", 1)[1]
            self.fanout.subscribed += 1
            if self.fanout.subscribed == self.fanout.clients:
                self.fanout.all_subscribed.set()
        if self.subscribed and b"\ndata: " in self.buffer:
            line = self.buffer.split(b"\ndata: ", 1)[1].split(b"\n", 1)[0]
            self.fanout.latencies.append(arrived - json.loads(line)["ts"])
            if len(self.fanout.latencies) == self.fanout.clients:
                self.fanout.done.set()
            self.buffer = b""
            self.subscribed = False  # nothing more to note


async def run(port: int, clients: int, cookie: str, server_pid: int) -> None:
    from asgiref.sync import sync_to_async

    from ormbridge import broadcast

    loop = asyncio.get_running_loop()
    fanout = Fanout(clients)
    request = (
        f"GET /ormbridge/events/?ns=shop.product HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    # Browsers arrive over time, not in one instant: CONNECTING subscriptions at a time.
    connecting = asyncio.Semaphore(CONNECTING)
    transports: list[asyncio.BaseTransport] = []

    async def connect_all() -> None:
        for _ in range(clients):
            await connecting.acquire()
            transport, _ = await loop.create_connection(
                lambda: Listener(request, fanout, connecting), "127.0.0.1", port
            )
            transports.append(transport)

    started = time.perf_counter()
    connector = asyncio.create_task(connect_all())
    try:
        await asyncio.wait_for(fanout.all_subscribed.wait(), CONNECT_TIMEOUT)
    except TimeoutError:
        print(f"only {fanout.subscribed} of {clients} clients subscribed in {CONNECT_TIMEOUT} s")
    connector.cancel()
    print(
        f"{fanout.subscribed} clients subscribed in {time.perf_counter() - started:.1f} s; "
        f"server RSS with them connected: {rss_mb(server_pid):.0f} MB"
    )
    held, total = await sync_to_async(redis_connections)(server_pid)
    print(
        f"Redis connections held by the server process: {held} "
        f"(all clients of that Redis: {total}, of them this process's own)"
    )
    event = broadcast.make_event("update", "shop.product", [1], ["price"])
    await sync_to_async(broadcast.RedisStreamEmitter().emit)([event])
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(fanout.done.wait(), DELIVERY_TIMEOUT)
    for transport in transports:
        transport.close()
    latencies = sorted(fanout.latencies)
    print(f"event delivered to {len(latencies)} of {clients} clients")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)), hard))
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
        print(
            f"# ormbridge bench/sse_clients.py, {datetime.datetime.now(datetime.UTC):%Y-%m-%d}: "
            f"{args.clients} clients, uvicorn on 127.0.0.1"
        )
        print(f"server RSS idle: {rss_mb(server.pid):.0f} MB")
        asyncio.run(run(port, args.clients, cookie, server.pid))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
