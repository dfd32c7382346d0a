"""The ASGI app (Starlette) and the uvicorn server that drains streams before it stops.

Routes: `WS /v1/listen` (caster.v1 or the Deepgram subset), `POST
/v1/audio/transcriptions` (OpenAI), `GET /health`, `GET /ready`, `GET /metrics`,
and the files of `caster/server/static/` at `/` (the browser demo).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from caster.model import Model
from caster.server import http
from caster.server.hub import Hub
from caster.server.security import install_log_redaction
from caster.server.settings import ServerSettings
from caster.server.ws import listen

STATIC = Path(__file__).resolve().parent / "static"


def create_app(model: Model, settings: ServerSettings | None = None) -> Starlette:
    """An app serving `model`; its engine worker runs while the app is up.

    The hub (engine, quotas, metrics) is `app.state.hub`.
    """
    hub = Hub(model, settings or ServerSettings())

    async def websocket(ws: WebSocket) -> None:
        await listen(ws, hub)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.engine.start()
        try:
            yield
        finally:
            await hub.drain(hub.settings.drain_timeout_s)
            hub.engine.stop()

    middleware = []
    if hub.settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(hub.settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(
        routes=[
            WebSocketRoute("/v1/listen", websocket),
            Route("/v1/audio/transcriptions", http.transcriptions, methods=["POST"]),
            Route("/health", http.health),
            Route("/ready", http.ready),
            Route("/metrics", http.metrics),
            Mount("/", StaticFiles(directory=STATIC, html=True, check_dir=False)),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, but on shutdown open streams first get their final results.

    Plain uvicorn closes WebSockets with 1012 at once; this server first stops
    listening, then asks every stream to finish (results, then close 1001),
    waits up to `drain_timeout_s`, then shuts down as uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        await self.hub.drain(self.hub.settings.drain_timeout_s)
        await super().shutdown(sockets)


def make_server(
    app: Starlette,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "info",
) -> DrainingServer:
    """A uvicorn server for `create_app`'s app (TLS when a certificate and key are given)."""
    hub: Hub = app.state.hub
    install_log_redaction()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level=log_level,
        lifespan="on",
        # Frames up to twice our limit reach the app and get a clear 4413; larger
        # ones are cut off by the WebSocket layer itself (close 1009).
        ws_max_size=2 * hub.settings.max_frame_bytes,
        timeout_graceful_shutdown=5,
    )
    return DrainingServer(config, hub)
