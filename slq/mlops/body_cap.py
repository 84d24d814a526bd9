"""A cap on request bodies, enforced while they stream in (ASGI middleware).

FastAPI reads a JSON body whole before the route sees it, so a route's own limits (items per
request, image bytes, text length) come too late to bound memory: a client could send gigabytes,
declared or chunked. `BodyCap` counts the bytes of each capped route's body as they arrive and
answers 413 as soon as the count passes the route's cap (at once when Content-Length already
says so), before anything is parsed; under the cap the body is handed on unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable


class BodyCap:
    """`limits`: path -> (largest body in bytes, message -> JSON error body of that route)."""

    def __init__(self, app, limits: dict[str, tuple[int, Callable[[str], dict]]]):
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.limits:
            return await self.app(scope, receive, send)
        limit, shape = self.limits[scope["path"]]
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return await _refuse(send, shape(f"the request body ({int(declared):,} bytes) is over the limit of "
                                             f"{limit:,} bytes for {scope['path']}"))
        chunks, got = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            got += len(message.get("body", b""))
            if got > limit:
                return await _refuse(send, shape(f"the request body is over the limit of {limit:,} bytes for "
                                                 f"{scope['path']}"))
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, as the server reports it

        return await self.app(scope, replay, send)


async def _refuse(send, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
