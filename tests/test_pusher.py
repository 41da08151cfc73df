"""The Pusher emitter speaks Pusher's HTTP API: checked against a local HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from ormbridge import broadcast
from ormbridge.contrib.pusher import PusherEmitter

pytestmark = pytest.mark.unit


@pytest.fixture
def pusher_api(settings):
    """A local stand-in for api.pusherapp.com that records the batches it is sent."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path.split("?")[0], json.loads(body)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "PUSHER": {"app_id": "42", "key": "k", "secret": "s", "host": "127.0.0.1",
                   "port": server.server_port, "ssl": False},
    }  # fmt: skip
    yield received
    server.shutdown()


def test_events_become_batched_triggers_on_private_channels(pusher_api):
    events = [
        broadcast.make_event("update", "shop.order", [n], ["status"], f"shop.order::customer-{n}")
        for n in range(12)
    ]
    PusherEmitter().emit(events)
    assert [path for path, _ in pusher_api] == ["/apps/42/batch_events"] * 2  # 10 + 2
    sent = [item for _, body in pusher_api for item in body["batch"]]
    assert sent[3]["channel"] == "private-shop.order;customer-3"
    assert sent[3]["name"] == "ormbridge.update"
    assert json.loads(sent[3]["data"])["pks"] == [3]


def test_an_event_over_pushers_limit_is_sent_truncated(pusher_api):
    event = broadcast.make_event("update", "shop.product", list(range(5_000)))
    PusherEmitter().emit([event])
    [(_, body)] = pusher_api
    data = json.loads(body["batch"][0]["data"])
    assert data["pks"] is None and data["truncated"] is True


def test_missing_credentials_are_a_clear_error(settings):
    from django.core.exceptions import ImproperlyConfigured

    settings.ORMBRIDGE = {**settings.ORMBRIDGE, "PUSHER": {"key": "k"}}
    with pytest.raises(ImproperlyConfigured, match="needs app_id, key and secret"):
        PusherEmitter()


def test_a_broken_emitter_never_fails_the_caller(settings):
    settings.ORMBRIDGE = {
        **settings.ORMBRIDGE,
        "EMITTERS": ["ormbridge.contrib.pusher.PusherEmitter"],
        "PUSHER": {},
    }
    assert broadcast.emit([broadcast.make_event("update", "shop.product", [1])]) == 1
