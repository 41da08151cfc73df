"""Reading the events endpoint the way a browser does, through Django's async test client."""

import json

from asgiref.sync import async_to_sync
from django.test import AsyncClient


def read(
    namespaces: list[str],
    count: int,
    *,
    user=None,
    last_event_id: str | None = None,
    before_reading=None,
) -> tuple[int, list[dict]]:
    """Status and the first ``count`` messages (``{"id", "event", "data"}``) of a subscription.

    ``before_reading`` runs once the response has started, before the first read.
    """

    async def go():
        client = AsyncClient()
        if user is not None:
            await client.aforce_login(user)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        response = await client.get("/ormbridge/events/", {"ns": namespaces}, headers=headers)
        if response.status_code != 200:
            return response.status_code, []
        messages: list[dict] = []
        buffer = ""
        iterator = response.streaming_content.__aiter__()
        started = False
        while len(messages) < count:
            chunk = await iterator.__anext__()
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
