"""Refuses request bodies over max_body_bytes before anything parses them (413 problem+json)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.errors import PayloadTooLarge

__all__ = ["BodyLimitMiddleware"]

# An over-long body is read and discarded up to this multiple of the limit before the 413 is sent,
# so ordinary clients (which write the whole body before reading) see the answer instead of a reset.
_DRAIN_FACTOR = 4


class BodyLimitMiddleware:
    """Checks Content-Length, then counts bytes while reading; the app receives the body in one message."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            # Expecting "100 Continue": the client has not sent the body, so answer right away.
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await self._drain(receive, int(declared))
            await self._refuse(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away; let the app see it
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                chunks.clear()
                if message.get("more_body", False):
                    await self._drain(receive, None)
                await self._refuse(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, declared: int | None) -> None:
        budget = _DRAIN_FACTOR * self.max_body_bytes
        if declared is not None and declared > budget:
            return
        read = 0
        while read <= budget:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        error = PayloadTooLarge(
            f"the request body has {'at least ' if size else ''}{size} bytes; at most "
            f"{self.max_body_bytes} are allowed",
            limit="max_body_bytes",
            allowed=self.max_body_bytes,
        )
        response = problem_response(error, str(scope.get("path", "")), {"Connection": "close"})
        await response(scope, receive, send)
