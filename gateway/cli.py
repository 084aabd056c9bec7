"""`memory-gateway serve`: load the configuration, then run the app under uvicorn
(in one process, or in `server.workers` processes under a supervisor)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config
from gateway.logs import quiet_http_loggers
from memory.heap import limit_arenas

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


def _setup_logging(config: Config) -> None:
    """Logging until the app starts (the supervisor's, and start-up errors);
    the app then configures the same format and level (gateway/app.py)."""
    logging.basicConfig(level=config.server.python_log_level, format=config.server.log_format)
    quiet_http_loggers()


def _uvicorn_config(config: Config) -> dict[str, Any]:
    return {
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "http": "httptools",
        "lifespan": "on",
        "log_level": config.server.log_level,
        "access_log": config.server.access_log,
        "server_header": False,
    }


def run_worker(config: Config, sock: socket.socket, index: int, supervisor: int) -> None:
    """One of `server.workers` processes, accepting on the supervisor's socket."""
    limit_arenas()
    import uvicorn

    from gateway.app import create_app

    _setup_logging(config)
    server = uvicorn.Server(uvicorn.Config(create_app(config), **_uvicorn_config(config)))
    threading.Thread(target=_exit_with_parent, args=(server, supervisor), daemon=True).start()
    server.run(sockets=[sock])
    if not server.started:
        # The lifespan failed (store, embedder...): tell the supervisor.
        sys.exit(3)


def _exit_with_parent(server: Any, parent: int) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) shuts down instead of
    serving on, orphaned and never restarted or stopped."""
    while not server.should_exit:
        if os.getppid() != parent:
            logging.getLogger("gateway.supervisor").warning(
                "the supervisor (pid %s) is gone; this worker shuts down", parent
            )
            server.should_exit = True
        time.sleep(1.0)


def serve(config: Config) -> int:
    if config.server.workers > 1:
        from gateway.supervisor import Supervisor

        _setup_logging(config)
        return Supervisor(config, run_worker).run()

    import uvicorn

    from gateway.app import create_app

    _setup_logging(config)
    uvicorn.run(
        create_app(config),
        host=config.server.host,
        port=config.server.port,
        **_uvicorn_config(config),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    limit_arenas()
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
