"""Request body limit as a pure ASGI middleware (BaseHTTPMiddleware would break disconnect propagation of
streaming responses). A declared Content-Length over the limit gets a 413 OpenAI error before anything is read;
a chunked body that grows past it is cut off (the app sees a client disconnect, never a partial body) and the
client gets the same 413."""

from __future__ import annotations

from .errors import APIError


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        received, exceeded, started = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if exceeded:
                return  # the app's reaction to the cut-off body is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(413, f"request body over {self.max_bytes} bytes (--max-body-bytes)")
        await error.response()(scope, receive, send)
