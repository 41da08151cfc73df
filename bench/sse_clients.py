"""Load test: one change event fanned out to N concurrent Server-Sent Events clients.

    python bench/sse_clients.py                 # 500 clients
    python bench/sse_clients.py --clients 200

Starts the example project under uvicorn (ASGI) on 127.0.0.1, opens N logged-in
event streams from this process, emits one event through the Redis streams
emitter, and prints how many clients got it, the delivery latency (p50, p99,
max: from the event's creation to its arrival) and the server's memory before
and after the clients connected. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
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

CONNECT_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 30.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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


async def listen(port: int, cookie: str, fanout: Fanout) -> None:
    """One browser-like client: subscribe, wait for one event, note its latency."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /ormbridge/events/?ns=shop.product HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    buffer = b""
    subscribed = False
    try:
        while chunk := await reader.read(65536):
            buffer += chunk
            if not subscribed and b"retry:" in buffer:
                subscribed = True
                fanout.subscribed += 1
                if fanout.subscribed == fanout.clients:
                    fanout.all_subscribed.set()
            if b"\ndata: " in buffer:
                line = buffer.split(b"\ndata: ", 1)[1].split(b"\n", 1)[0]
                fanout.latencies.append(time.time() - json.loads(line)["ts"])
                return
    finally:
        writer.close()


async def run(port: int, clients: int, cookie: str, server_pid: int) -> None:
    from asgiref.sync import sync_to_async

    from ormbridge import broadcast

    fanout = Fanout(clients)
    started = time.perf_counter()
    tasks = [asyncio.create_task(listen(port, cookie, fanout)) for _ in range(clients)]
    try:
        await asyncio.wait_for(fanout.all_subscribed.wait(), CONNECT_TIMEOUT)
    except TimeoutError:
        print(f"only {fanout.subscribed} of {clients} clients subscribed in {CONNECT_TIMEOUT} s")
    print(
        f"{fanout.subscribed} clients subscribed in {time.perf_counter() - started:.1f} s; "
        f"server RSS with them connected: {rss_mb(server_pid):.0f} MB"
    )
    event = broadcast.make_event("update", "shop.product", [1], ["price"])
    await sync_to_async(broadcast.RedisStreamEmitter().emit)([event])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500)
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
