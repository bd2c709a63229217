"""`cbir serve`: the search service on uvicorn (registered by `cbir.cli`).

Kept light at import time: FastAPI and the model load only when the command runs.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from cbir.localize import LOCALIZERS
from cbir.models.engine import ENGINES


def serve(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory built by `cbir index`.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")] = 8000,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest upload accepted, in MiB.")] = 20,
    max_megapixels: Annotated[float, typer.Option("--max-megapixels", min=0.001, help="Largest image accepted, in Mpixel, checked before decoding (bounds decode work; decompression bombs are refused).")] = 50,
    max_uploads: Annotated[int, typer.Option("--max-uploads", min=1, max=1024, help="Uploads received at once; beyond it, 503 with Retry-After.")] = 8,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Extractions run at once (CPU-bound); more requests wait their turn.")] = 2,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, max=256, help="ONNX Runtime threads per extraction (default: cores / workers).")] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Refuse to add or delete images.")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Local weights file for the backbone, if the index was built with one.")] = None,
    engine: Annotated[str, typer.Option("--engine", help=f"Inference engine: {ENGINES.choices()}.")] = "onnx",
    localizer: Annotated[Optional[str], typer.Option("--localizer", "-l", help=f"How a query photo is split into objects, each searched: {', '.join(LOCALIZERS.names())} (`cbir localizers`); default: the one stored with the index, else whole.")] = None,
    rerank: Annotated[Optional[str], typer.Option("--rerank", help="Re-ranking steps after the index's pipeline, e.g. 'SV50' (spatial verification) or 'QE5' (see `cbir pipelines`).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level: critical, error, warning, info, debug.")] = "info",
) -> None:
    """Serve a search page and a JSON API over an index: drop a photo, see what matches."""
    import uvicorn

    from cbir.service.app import create_app

    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise typer.BadParameter(f"--log-level {log_level!r}: choose critical, error, warning, info or debug")
    # Bind first, so that a port in use is one line, not a traceback after the model loaded.
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, socktype, proto, _, addr = infos[0]
        # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections
        # only then, and without it every response waits ~40 ms on Nagle and delayed ACKs.
        sock = socket.socket(family, socktype, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        typer.echo(f"error: cannot listen on {host}:{port} ({e.strerror or e})", err=True)
        raise typer.Exit(2) from None
    try:
        app = create_app(index, weights=weights, engine=engine, max_upload_mb=max_upload_mb,
                         max_megapixels=max_megapixels, workers=workers, threads=threads, read_only=read_only,
                         max_uploads=max_uploads, localizer=localizer, rerank=rerank)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    typer.echo(f"cbir: serving {index} ({len(app.state.service.index)} images) at http://{shown}:{bound_port}/", err=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
