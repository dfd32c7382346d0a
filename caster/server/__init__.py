"""caster's realtime server: `caster serve` (needs the `server` extra).

`create_app(model, settings)` builds the ASGI app, `make_server(app, host, port)`
the uvicorn server that drains streams on shutdown. The WebSocket protocol is
documented in `caster.server.protocol`, the Deepgram subset in
`caster.server.deepgram`, the HTTP API in `caster.server.http`. Names are
imported on first use, so `caster.server.cli` loads without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app", "make_server"]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "make_server"):
        from caster.server import app

        return getattr(app, name)
    if name == "ServerSettings":
        from caster.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'caster.server' has no attribute {name!r}")
