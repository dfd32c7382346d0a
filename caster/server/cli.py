"""`caster serve`: options (each also an environment variable) and the run.

Wire into caster/cli.py with::

    serve = subparsers.add_parser("serve", help="run the realtime server")
    caster.server.cli.add_arguments(serve)  # then: return caster.server.cli.run(args)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from caster.server.settings import ServerSettings

_DEFAULTS = ServerSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `caster serve`'s options; every default can come from a CASTER_* variable."""
    env = os.environ.get

    def option(name: str, kind: type, default: object, help: str) -> None:
        variable = "CASTER_" + name.removeprefix("--").replace("-", "_").upper()
        value = env(variable)
        parser.add_argument(
            name,
            type=kind,
            # argparse converts a string default with `type`, reporting a bad one clearly.
            default=value if value is not None else default,
            help=f"{help} (env {variable}; default {default})",
        )

    parser.add_argument(
        "--model",
        default=env("CASTER_MODEL"),
        help="a .nemo file, Hugging Face or caster directory, or preset:<name> (env "
        "CASTER_MODEL; default: caster's built-in demonstration model)",
    )
    option("--device", str, "cpu", "torch device of the model")
    parser.add_argument(
        "--int8",
        action="store_true",
        default=env("CASTER_INT8", "") not in ("", "0", "false"),
        help="CPU fast path: int8 weights for the large layers (env CASTER_INT8=1)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bf16", "fp16"],
        default=env("CASTER_DTYPE", "float32"),
        help="GPU fast path: encoder and prediction network in bf16 or fp16 (env CASTER_DTYPE)",
    )
    option("--host", str, "127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    option("--port", int, 8000, "TCP port")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[k for k in env("CASTER_API_KEYS", "").split(",") if k.strip()],
        help="accepted API key, repeatable; prefer env CASTER_API_KEYS (comma-separated) or "
        "--api-key-file, which other users cannot see in the process list. No key: no auth",
    )
    option("--api-key-file", str, None, "file with one API key per line")
    option("--max-streams", int, _DEFAULTS.max_streams, "most open realtime streams")
    option("--max-streams-per-key", int, None, "most open streams per API key")
    option("--max-batch", int, _DEFAULTS.max_batch, "most streams per batched engine step")
    option("--max-frame-bytes", int, _DEFAULTS.max_frame_bytes, "largest audio message")
    option("--max-ahead-s", float, _DEFAULTS.max_ahead_s, "audio read ahead of real time")
    option("--start-timeout-s", float, _DEFAULTS.start_timeout_s, "time to send the start")
    option("--idle-timeout-s", float, _DEFAULTS.idle_timeout_s, "longest silence of a client")
    option("--send-timeout-s", float, _DEFAULTS.send_timeout_s, "a stalled reader is dropped")
    option(
        "--load-threshold",
        float,
        _DEFAULTS.load_threshold,
        "share of --max-streams above which streams that allow it get larger chunks",
    )
    option("--max-duration-s", float, _DEFAULTS.max_duration_s, "longest stream")
    option(
        "--drain-timeout-s",
        float,
        _DEFAULTS.drain_timeout_s,
        "on shutdown, time for streams to get their final results",
    )
    option("--max-upload-bytes", int, _DEFAULTS.max_upload_bytes, "largest uploaded file")
    option("--http-workers", int, _DEFAULTS.http_workers, "file transcriptions at once")
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[o for o in env("CASTER_CORS_ORIGINS", "").split(",") if o.strip()],
        help="origin allowed to call the HTTP API from a browser, repeatable, '*' for any "
        "(env CASTER_CORS_ORIGINS, comma-separated)",
    )
    option("--ssl-certfile", str, None, "TLS certificate (PEM): serve https and wss")
    option("--ssl-keyfile", str, None, "TLS private key (PEM)")
    option("--log-level", str, "info", "debug, info, warning or error")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The `ServerSettings` that parsed options describe.

    Raises:
        ValueError: an unusable limit, an unreadable or empty key file.
    """
    keys = [k.strip() for k in args.api_key]
    if args.api_key_file is not None:
        path = Path(args.api_key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read the API key file {path}: {e.strerror}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise ValueError(f"the API key file {path} has no keys")
        keys += from_file
    return ServerSettings(
        max_streams=args.max_streams,
        max_streams_per_key=args.max_streams_per_key,
        max_batch=args.max_batch,
        max_frame_bytes=args.max_frame_bytes,
        max_ahead_s=args.max_ahead_s,
        start_timeout_s=args.start_timeout_s,
        idle_timeout_s=args.idle_timeout_s,
        send_timeout_s=args.send_timeout_s,
        load_threshold=args.load_threshold,
        max_duration_s=args.max_duration_s,
        drain_timeout_s=args.drain_timeout_s,
        max_upload_bytes=args.max_upload_bytes,
        http_workers=args.http_workers,
        api_keys=tuple(keys),
        cors_origins=tuple(o.strip() for o in args.cors_origin),
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until SIGINT/SIGTERM (open streams are drained first)."""
    try:
        from caster.server.app import create_app, make_server
    except ImportError as e:
        print(
            f"caster serve needs the server extra: pip install 'caster[server]' ({e})",
            file=sys.stderr,
        )
        return 2
    import caster

    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
    settings = settings_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    model = caster.load(args.model, args.device, int8=args.int8, dtype=args.dtype)
    app = create_app(model, settings)
    server = make_server(
        app,
        args.host,
        args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level=args.log_level,
    )
    server.run()
    return 0
