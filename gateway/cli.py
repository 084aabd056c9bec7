"""`memory-gateway serve`: load the configuration, then run the app under uvicorn
(in one process, or in `server.workers` processes under a supervisor)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config
from gateway.logs import setup_logging
from memory.heap import tune_process_heap

DEFAULT_CONFIG = Path("gateway.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-gateway",
        description="An OpenAI-compatible gateway that gives any chat app long-term memory.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", type=Path, help="configuration file (default: ./gateway.yaml if present)"
    )
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (server.port)")
    serve.add_argument(
        "--upstream", help="base URL of the default upstream, e.g. http://127.0.0.1:11434/v1"
    )
    serve.add_argument("--data", help="data directory (data_dir)")
    serve.add_argument(
        "--workers", type=int, help="gateway processes sharing the port (server.workers)"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(
        path,
        overrides={
            "server.host": args.host,
            "server.port": args.port,
            "upstream": args.upstream,
            "data_dir": args.data,
            "server.workers": args.workers,
        },
    )


def check_data_dir(path: Path) -> None:
    """Fail before serving when the data directory cannot be written.

    Without this the memory engine fails inside the ASGI lifespan, which prints
    a wall of traceback and exits 3; an operator needs one line naming the path.
    """
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"data_dir: {str(path)!r} is not writable: {reason}") from None


def _uvicorn_config(config: Config) -> dict[str, Any]:
    return {
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "http": "httptools",
        "lifespan": "on",
        "log_level": config.server.log_level,
        "access_log": config.server.access_log,
        "server_header": False,
    }


def run_worker(
    config: Config,
    sock: socket.socket,
    index: int,
    supervisor: int,
    handoff: socket.socket | None = None,
) -> None:
    """One of `server.workers` processes, accepting on the supervisor's socket;
    with `handoff`, its exchanges are extracted by the extraction process."""
    tune_process_heap()
    import uvicorn

    from gateway.app import create_app
    from gateway.supervisor import name_process, watch_parent
    from memory.handoff import HandoffSender

    name_process(f"mg-worker-{index}")
    setup_logging(config)
    sender = HandoffSender(handoff) if handoff is not None else None
    app = create_app(config, handoff=sender, owns_process=True)
    server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_config(config)))
    watch_parent(supervisor, stop=lambda: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    if not server.started:
        # The lifespan failed (store, embedder...): tell the supervisor.
        sys.exit(3)


def serve(config: Config) -> int:
    if config.processes > 1:
        from gateway.extraction_process import run_extraction
        from gateway.supervisor import Supervisor

        setup_logging(config)
        extraction = run_extraction if config.extraction_process else None
        return Supervisor(config, run_worker, extraction).run()

    # One process serves: tune its heap before any thread starts.
    tune_process_heap()
    import uvicorn

    from gateway.app import create_app

    setup_logging(config)
    uvicorn.run(
        create_app(config, owns_process=True),
        host=config.server.host,
        port=config.server.port,
        **_uvicorn_config(config),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if config.memory.enabled:
            check_data_dir(config.data_path)
    except ConfigError as exc:
        print(f"memory-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
