"""Many streams, one reader: the events endpoint's streams in a server process share
one Redis reader (ormbridge.fanout), under uvicorn over real HTTP."""

import asyncio
import gc
import json
import socket

import pytest
from django.contrib.auth.models import Permission, User

from ormbridge import broadcast, fanout, redis_store
from tests import sse
from tests.conftest import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

BUFFER = 200  # EVENTS_BUFFER of the slow-client server
BIG = list(range(1500))  # an event this size is about 8 kB
ROUND, ROUNDS = 100, 15  # 12 MB: more than TCP buffers for a client that reads nothing


@pytest.fixture
def cookie() -> str:
    user = User.objects.create_user("viewer")
    user.user_permissions.add(Permission.objects.get(codename="view_product"))
    return sse.session_cookie(user)


def emit(count: int, pks: list[int] | None = None) -> list[str]:
    """``count`` events to shop.product through the Redis streams emitter; their ids."""
    events = [broadcast.make_event("update", "shop.product", pks or [n]) for n in range(count)]
    for start in range(0, count, 100):
        broadcast.RedisStreamEmitter().emit(events[start : start + 100])
    return [event["id"] for event in events]


def events_connections(server: sse.Server) -> int:
    """Connections to ormbridge's Redis that the server process's hub holds."""
    name = f"ormbridge-events:{server.process.pid}"
    listed = redis_store.get_redis().client_list()
    rows = [row for node in listed.values() for row in node] if isinstance(listed, dict) else listed
    return sum(1 for row in rows if row["name"] == name)


def all_connections() -> int:
    listed = redis_store.get_redis().client_list()
    return sum(len(node) for node in listed.values()) if isinstance(listed, dict) else len(listed)


async def subscribe_many(port: int, cookie: str, count: int) -> list[asyncio.StreamReader]:
    """``count`` open streams of shop.product, each past its first message."""

    async def one() -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /ormbridge/events/?ns=shop.product HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Cookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await reader.readuntil(b"retry:")
        reader.writer = writer  # type: ignore[attr-defined]  # kept open with its reader
        return reader

    return list(await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 60))


async def first_event(reader: asyncio.StreamReader) -> dict:
    await reader.readuntil(b"\ndata: ")
    return json.loads(await reader.readline())


def test_two_hundred_streams_of_one_process_share_a_few_redis_connections(serve, cookie):
    server = serve()

    async def scenario() -> tuple[int, int, int, list[dict]]:
        [first] = await subscribe_many(server.port, cookie, 1)
        one = all_connections()
        readers = [first, *await subscribe_many(server.port, cookie, 199)]
        held, many = events_connections(server), all_connections()
        [sent] = await asyncio.to_thread(emit, 1)
        received = await asyncio.wait_for(asyncio.gather(*map(first_event, readers)), 30)
        for reader in readers:
            reader.writer.close()  # type: ignore[attr-defined]
        return held, one, many, [event for event in received if event["id"] == sent]

    held, one, many, delivered = asyncio.run(scenario())
    assert 1 <= held <= 1 + fanout.POOL
    assert many - one <= fanout.POOL  # 199 more streams: at most the pool filled up
    assert len(delivered) == 200


def test_a_client_that_stops_reading_is_ended_without_holding_up_the_others(serve, cookie):
    server = serve(EVENTS_BUFFER=BUFFER)
    others = [server.open(["shop.product"], cookie=cookie) for _ in range(2)]
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    slow.sendall(
        f"GET /ormbridge/events/?ns=shop.product HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    wait_until(lambda: b"retry:" in slow.recv(4096, socket.MSG_PEEK), 30, "the slow stream")

    sent: list[str] = []
    for _ in range(ROUNDS):  # each round read by the others before the next is sent
        ids = emit(ROUND, pks=BIG)
        for other in others:
            assert [message["data"]["id"] for message in other.messages(ROUND)] == ids
        sent += ids
    for other in others:
        other.close()

    slow.settimeout(30)
    text = b""
    while b"event: closed" not in text:  # now it reads: what it had, then why it ends
        chunk = slow.recv(1 << 20)
        assert chunk, "the connection closed before the stream said why"
        text += chunk
    slow.close()
    blocks = [sse.parse(block) for block in text.decode().split("\n\n") if "data: " in block]
    *events, closed = blocks
    assert closed["event"] == "closed" and closed["data"]["reason"] == "behind"
    assert [event["data"]["id"] for event in events] == sent[: len(events)] != sent


def test_a_client_that_reconnects_gets_what_it_missed_once_and_in_order(serve, cookie):
    server = serve()
    follower = server.open(["shop.product"], cookie=cookie)  # the hub reads on meanwhile
    stream = server.open(["shop.product"], cookie=cookie)
    first = emit(3)
    seen = stream.messages(3)
    stream.close()
    missed = emit(broadcast.READ_COUNT + 10)  # more than one catch-up read

    resumed = server.open(["shop.product"], cookie=cookie, last_event_id=seen[-1]["id"])
    more = emit(2)
    got = resumed.messages(len(missed) + 2)
    resumed.close()
    assert [message["data"]["id"] for message in seen] == first
    assert [message["data"]["id"] for message in got] == missed + more
    assert len(follower.messages(3 + len(missed) + 2)) == 3 + len(missed) + 2
    follower.close()


def hand_out_to_many(streams: int) -> tuple[bool, bool]:
    """Whether the collector runs right after an entry is handed to ``streams`` streams of a
    hub, and once they have all taken it."""

    async def scenario() -> tuple[bool, bool]:
        hub = fanout.Hub()
        key = broadcast.stream_key("shop.product")
        subscribers = [fanout.Subscriber(hub, [key]) for _ in range(streams)]
        for subscriber in subscribers:
            subscriber.live = True
            hub.subscribers.setdefault(key, set()).add(subscriber)
        hub.positions[key] = "0-0"
        hub._hand_out([(key, [("1-0", {"event": "{}"})])])
        during = gc.isenabled()
        for subscriber in subscribers:
            assert await subscriber.read({key: "0-0"}, 1000) == [(key, [("1-0", {"event": "{}"})])]
        return during, gc.isenabled()

    return asyncio.run(scenario())


def test_the_collector_waits_while_an_event_reaches_many_streams():
    assert hand_out_to_many(fanout.GC_PAUSE_MIN) == (False, True)


def test_the_collector_does_not_wait_for_a_few_streams():
    assert hand_out_to_many(fanout.GC_PAUSE_MIN - 1) == (True, True)


def test_events_gc_pause_0_never_holds_the_collector(settings):
    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "EVENTS_GC_PAUSE": 0}
    assert hand_out_to_many(fanout.GC_PAUSE_MIN) == (True, True)
