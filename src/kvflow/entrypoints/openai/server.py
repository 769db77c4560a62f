"""The `kvflow serve` command: parse the options, load the engine, run uvicorn.

    kvflow serve [--model smollm2-135m] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-queue-len N]
    kvflow serve --instances 2 [--dispatch-policy prefix-affinity] [--enable-migration] ...   (kvflow.cluster)
    python -m kvflow.entrypoints.openai.server ...      (the same, without the CLI wrapper)

The app itself is api_server.build_app (routes, middleware), request handling is serving.py and
the event streams streaming.py. SIGTERM (or Ctrl-C) drains first: new requests get 503 with
Retry-After, requests in flight get --shutdown-timeout seconds to finish, the rest are aborted
(streams end with finish_reason "abort" and [DONE]); then the engine stops and the process exits 0.
A second signal stops at once.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

import uvicorn

from kvflow.entrypoints.args import add_cluster_args, add_engine_args, cluster_config, engine_config
from kvflow.engine.async_engine import AsyncEngine
from kvflow.entrypoints.openai.api_server import Limits, build_app  # noqa: F401 - build_app: the app's old home
from kvflow.entrypoints.openai.http_protocol import protocol_with_header_timeout
from kvflow.errors import KvflowError

logger = logging.getLogger("kvflow.server")


# ---------------- command line ----------------
def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("KVFLOW_API_KEY"),
                   help="require exactly one 'Authorization: Bearer KEY' header on every path but /health and "
                        "/metrics (default: $KVFLOW_API_KEY, else none)")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="sequences allowed to wait beyond the max-num-seqs that run; a request counts n x its "
                        "prompts. One that would exceed max-num-seqs + N sequences in flight gets 503 with "
                        "Retry-After; one asking for more than that by itself gets 400 (default 1024)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the --model argument)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds to let requests in flight finish; then streams end with "
                        "finish_reason 'abort' and [DONE], other requests get 503 (default 10)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="close an idle keep-alive connection after this many seconds (default 5)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="close a connection whose request headers are not complete after this many seconds "
                        "(default 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="answer 408 when a request body takes longer than this many seconds (default 30)")
    g.add_argument("--max-connections", type=int, default=1024,
                   help="concurrent connections (and requests) before new requests get 503 (default 1024)")
    g.add_argument("--tokenizer-workers", type=int, default=2,
                   help="threads that tokenize large prompts off the event loop (default 2)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False)


class _Server(uvicorn.Server):
    """uvicorn, with the app's drain (api_server.GracefulShutdown) before its own shutdown."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or not self.started or self._loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
            return self._exit(sig, frame)  # a second signal: stop now
        self._draining = True
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame) -> None:
        self._drain_task = self._loop.create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame) -> None:
        try:
            await self._drain()
        except Exception:  # noqa: BLE001 - stopping matters more than draining perfectly
            logger.exception("draining before shutdown failed")
        finally:
            self._exit(sig, frame)

    def _exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down; a server stopped by SIGTERM or
        # Ctrl-C that shut down cleanly exits 0 instead.
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def _check_args(args: argparse.Namespace) -> str | None:
    if args.max_queue_len < 0:
        return f"--max-queue-len must be >= 0, got {args.max_queue_len}"
    if not 0 <= args.port < 65536:
        return f"--port must be in [0, 65535], got {args.port}"
    for name in ("shutdown_timeout", "timeout_keep_alive", "header_timeout", "body_timeout"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
    for name in ("max_connections", "tokenizer_workers"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    return None


def run_server(args: argparse.Namespace) -> int:
    from kvflow.engine.llm_engine import LLMEngine

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        cluster = cluster_config(args)
        if cluster.enabled:  # several instances on Ray, behind the same front end
            from kvflow.cluster.client import ClusterClient
            async_engine = ClusterClient(engine_config(args), cluster, max_queue_len=args.max_queue_len)
        else:
            async_engine = AsyncEngine(LLMEngine(engine_config(args)), max_queue_len=args.max_queue_len)
    except KvflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("loaded %s in %.1f s", async_engine.engine.model_path, time.time() - t0)
    names = args.served_model_name or [args.model]
    app = build_app(async_engine, names, api_key=args.api_key, limits=Limits(body_timeout=args.body_timeout),
                    tokenizer_workers=args.tokenizer_workers)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=5, lifespan="on",
                            http=protocol_with_header_timeout(args.header_timeout),
                            timeout_keep_alive=args.timeout_keep_alive, limit_concurrency=args.max_connections)
    server = _Server(config, lambda: app.state.shutdown.drain(args.shutdown_timeout))
    logger.info("serving %s on http://%s:%d", names[0], args.host, args.port)
    server.run()
    if not server.started:
        return 1
    logger.info("server stopped cleanly")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the kvflow command line (cli.py wires this in)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    add_engine_args(p)
    add_server_args(p)
    add_cluster_args(p)
    p.set_defaults(func=run_server)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvflow.entrypoints.openai.server",
                                     description="Serve a model over an OpenAI-compatible HTTP API.")
    add_engine_args(parser)
    add_server_args(parser)
    add_cluster_args(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
