"""Reading the events endpoint the way a browser does: through Django's async test client,
or over real HTTP from the example project under uvicorn."""

import asyncio
import collections
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings
from django.test import AsyncClient, Client


def read(
    namespaces: list[str],
    count: int,
    *,
    user=None,
    last_event_id: str | None = None,
    before_reading=None,
    on_response=None,
    timeout: float = 30,
) -> tuple[int, list[dict]]:
    """Status and the first ``count`` messages (``{"id", "event", "data"}``) of a subscription.

    ``on_response`` runs as soon as the response is returned (a browser's EventSource
    fires ``open`` then), ``before_reading`` once its first chunk has arrived. Fails the
    test when a chunk takes longer than ``timeout`` seconds.
    """

    async def go():
        client = AsyncClient()
        if user is not None:
            await client.aforce_login(user)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        response = await client.get("/ormbridge/events/", {"ns": namespaces}, headers=headers)
        if response.status_code != 200:
            return response.status_code, []
        if on_response is not None:
            await on_response()
        messages: list[dict] = []
        buffer = ""
        iterator = response.streaming_content.__aiter__()
        started = False
        while len(messages) < count:
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), timeout)
            except TimeoutError:
                pytest.fail(f"timed out after {timeout} s waiting for {count} messages")
            if not started and before_reading is not None:
                started = True
                await before_reading()
            buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                message = parse(block)
                if message.get("data") is not None:
                    messages.append(message)
        await iterator.aclose()
        return response.status_code, messages

    return async_to_sync(go)()


def parse(block: str) -> dict:
    message: dict = {"event": "message", "id": None, "data": None}
    for line in block.splitlines():
        if line.startswith(":"):
            continue
        field, _, value = line.partition(": ")
        if field == "data":
            message["data"] = json.loads(value)
        elif field in ("id", "event"):
            message[field] = value
    return message


class Server:
    """The example project under uvicorn (ASGI), or ``manage.py runserver`` (WSGI) with
    ``wsgi``, on the test database and services, with extra ``ORMBRIDGE`` settings
    (``ORMBRIDGE_TEST_SETTINGS``, read by tests/settings.py)."""

    def __init__(self, db_name: str, ormbridge: dict, *, wsgi: bool = False) -> None:
        self.db_name = db_name
        self.ormbridge = ormbridge
        self.wsgi = wsgi
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        from tests.conftest import ROOT, wait_until

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        if self.wsgi:  # Django's development server, threaded, as a developer runs it
            command = [
                sys.executable,
                "example/manage.py",
                "runserver",
                f"127.0.0.1:{self.port}",
                "--noreload",
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "example.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--timeout-graceful-shutdown",
                "2",
            ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
                 "ORMBRIDGE_TEST_DB_NAME": self.db_name,
                 "ORMBRIDGE_TEST_SETTINGS": json.dumps(self.ormbridge),
                 "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "example")])},
        )  # fmt: skip

        name = "runserver" if self.wsgi else "uvicorn"

        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, f"{name} exited"
            with socket.socket() as client:
                return client.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 60, f"{name} to listen")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(
        self,
        namespaces: list[str],
        *,
        cookie: str | None = None,
        last_event_id: str | None = None,
        query: str | None = None,
    ) -> "Stream":
        """``GET /ormbridge/events/`` (``query`` replaces the one built from ``namespaces``)."""
        query = query if query is not None else urlencode([("ns", ns) for ns in namespaces])
        headers = {"Accept": "text/event-stream"}
        if cookie:
            headers["Cookie"] = cookie
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return Stream("127.0.0.1", self.port, f"/ormbridge/events/?{query}", headers)


class Stream:
    """One HTTP request to the events endpoint, read as a browser's EventSource would."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=30)
        self.connection.request("GET", path, headers=headers)
        # The connection lets go of its socket when the response will close it (a
        # WSGI server's stream ends with the connection): the response reads on.
        self._socket = self.connection.sock
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.content_type = self.response.getheader("Content-Type", "")
        self.body = b"" if self.status == 200 else self.response.read()
        self._buffer = ""
        self._ready: collections.deque[str] = collections.deque()  # whole, not yet parsed
        if self.status == 200:  # its first message holds the cursor it starts from
            next(self._blocks(30, "the stream's first message"))

    def json(self) -> dict:
        return json.loads(self.body)

    def _blocks(self, timeout: float, what: str) -> Iterator[dict | None]:
        """Each message (data or not) as it arrives; None once the server closed the stream.

        Fails the test when nothing closes or arrives within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            *blocks, self._buffer = self._buffer.split("\n\n")  # not one by one: megabytes
            self._ready.extend(blocks)
            while self._ready:
                yield parse(self._ready.popleft())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            self._socket.settimeout(remaining)
            try:
                chunk = self.response.read1(65536)
            except TimeoutError:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            except (http.client.IncompleteRead, ConnectionError):
                chunk = b""
            if not chunk:
                yield None
                return
            self._buffer += chunk.decode()

    def messages(self, count: int, timeout: float = 30) -> list[dict]:
        """The next ``count`` messages that carry data; fails if the stream ends first."""
        messages: list[dict] = []
        for message in self._blocks(timeout, f"{count} messages"):
            if message is None:
                pytest.fail(f"the stream ended after {len(messages)} of {count} messages")
            if message["data"] is not None:
                messages.append(message)
                if len(messages) == count:
                    break
        return messages

    def until_closed(self, timeout: float = 30) -> list[dict]:
        """The messages carrying data until the server closes the stream."""
        messages: list[dict] = []
        for message in self._blocks(timeout, "the server to close the stream"):
            if message is None:
                break
            if message["data"] is not None:
                messages.append(message)
        return messages

    def close(self) -> None:
        self.response.close()
        self.connection.close()


def session_key(user) -> str:
    """The key of a real session (in the database) of ``user`` logged in."""
    client = Client()
    client.force_login(user)
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


def session_cookie(user) -> str:
    """A ``Cookie`` header of a real session of ``user`` logged in."""
    return f"{django_settings.SESSION_COOKIE_NAME}={session_key(user)}"
