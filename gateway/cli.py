"""`memory-gateway serve`: load the configuration, bind the port, then run the
app under uvicorn (in one process, or in `server.workers` processes under a
supervisor). `memory-gateway health`: ask a running gateway's /health, with
the port found the way `serve` finds it. `memory-gateway memories|keys ...`:
manage a running gateway's memories and keys (gateway/admin_cli.py, with its
own exit statuses).

Exit statuses: 0 stopped cleanly (or healthy), 1 cannot listen (or not
healthy), 2 the configuration cannot be used, 3 the app failed to start."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import admin_cli
from gateway.config import Config, ConfigError, load_config
from gateway.logs import setup_logging
from gateway.startup import address, cannot_listen, log_startup
from memory.heap import tune_process_heap

if TYPE_CHECKING:
    from gateway.chat_activity import Counters

DEFAULT_CONFIG = Path("gateway.yaml")
HEALTH_TIMEOUT = 4.0


# Flags that override a configuration key: argparse dest -> dotted key.
OVERRIDES = {
    "host": "server.host",
    "port": "server.port",
    "upstream": "upstream",
    "data": "data_dir",
    "workers": "server.workers",
    "extraction_model": "memory.llm.model",
    "extraction_url": "memory.llm.base_url",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-gateway",
        description="An OpenAI-compatible gateway that gives any chat app long-term memory.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    _config_flags(serve)
    serve.add_argument(
        "--upstream", help="base URL of the default upstream, e.g. http://127.0.0.1:11434/v1"
    )
    serve.add_argument("--data", help="data directory (data_dir)")
    serve.add_argument(
        "--workers", type=int, help="gateway processes sharing the port (server.workers)"
    )
    serve.add_argument(
        "--extraction-model", help="the model that extracts memories (memory.llm.model)"
    )
    serve.add_argument(
        "--extraction-url",
        help="base URL of the extraction model's endpoint (memory.llm.base_url)",
    )
    health = commands.add_parser(
        "health",
        help="exit 0 if the gateway that `serve` with this configuration runs is healthy",
    )
    _config_flags(health)
    admin_cli.add_commands(commands, _connection_flags)
    return parser


def _connection_flags(command: argparse.ArgumentParser, *, again: bool = False) -> None:
    """`again`: the same flags on an action (`memories search --url ...`),
    where a flag not given leaves the one given before the action alone."""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if again else {}
    _config_flags(command, **extra)
    command.add_argument(
        "--url",
        help="the gateway (default: where `serve` with this configuration listens)",
        **extra,
    )
    command.add_argument(
        "--admin-key",
        help="the admin key (default: $GATEWAY_ADMIN_KEY; none needed locally"
        " when no admin key is set)",
        **extra,
    )


def _config_flags(command: argparse.ArgumentParser, **extra: Any) -> None:
    command.add_argument(
        "--config",
        type=Path,
        help="configuration file (default: ./gateway.yaml if present)",
        **extra,
    )
    command.add_argument("--host", help="address to listen on (server.host)", **extra)
    command.add_argument("--port", type=int, help="port to listen on (server.port)", **extra)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def config_path(args: argparse.Namespace) -> Path | None:
    """The file to read: --config, else ./gateway.yaml if present; None means
    the built-in defaults."""
    if args.config is not None:
        return Path(args.config)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {key: getattr(args, dest, None) for dest, key in OVERRIDES.items()}
    return load_config(config_path(args), overrides=overrides)


def check_data_dir(path: Path) -> None:
    """Fail before serving when the data directory cannot be written.

    Without this the memory engine fails inside the ASGI lifespan, which prints
    a wall of traceback and exits 3; an operator needs one line naming the path.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"data_dir: {str(path)!r} is a file, not a directory") from None
    except NotADirectoryError:
        raise ConfigError(
            f"data_dir: {str(path)!r} cannot be created: a parent of it is a file"
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"data_dir: {str(path)!r} cannot be created: {reason}") from None
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
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
        # The socket is bound already; host and port name it in uvicorn's log.
        "host": config.server.host,
        "port": config.server.port,
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
    chat_counters: Counters | None = None,
) -> None:
    """One of `server.workers` processes, accepting on the supervisor's socket;
    with `handoff`, its exchanges are extracted by the extraction process. It
    counts its chat requests in slot `index` of `chat_counters`."""
    tune_process_heap()
    import uvicorn

    from gateway.app import create_app
    from gateway.chat_activity import ChatActivity
    from gateway.supervisor import name_process, watch_parent
    from memory.handoff import HandoffSender

    name_process(f"mg-worker-{index}")
    setup_logging(config)
    sender = HandoffSender(handoff) if handoff is not None else None
    activity = ChatActivity.for_config(config, chat_counters, slot=index)
    app = create_app(config, handoff=sender, activity=activity, owns_process=True)
    server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_config(config)))
    watch_parent(supervisor, stop=lambda: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    if not server.started:
        # The lifespan failed (store, embedder...): tell the supervisor.
        sys.exit(3)


def listen(config: Config) -> socket.socket:
    """The listening socket, bound before anything slow starts, so that a port
    in use is one line at once rather than a traceback after the app's start-up."""
    from gateway.supervisor import bind

    return bind(config.server.host, config.server.port)


def serve(config: Config, sock: socket.socket, source: Path | None = None) -> int:
    """Run the gateway on `sock` until SIGTERM/SIGINT; the exit status."""
    from gateway.chat_activity import log_yield_decision

    setup_logging(config)
    log_startup(config, source)
    log_yield_decision(config)
    if config.processes > 1:
        from gateway.extraction_process import run_extraction
        from gateway.supervisor import Supervisor

        extraction = run_extraction if config.extraction_process else None
        return Supervisor(config, run_worker, extraction).run(sock)
    return _serve_here(config, sock)


def _serve_here(config: Config, sock: socket.socket) -> int:
    """One process serves (no supervisor)."""
    # Tune the heap before any thread starts.
    tune_process_heap()
    import uvicorn

    from gateway.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(create_app(config, owns_process=True), **_uvicorn_config(config))
    )
    # uvicorn re-raises the SIGINT it handled once it has shut down.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    # Not started: the lifespan failed (store, embedder...), as a worker reports it.
    return 0 if server.started else 3


def health(args: argparse.Namespace) -> int:
    """GET /health of the gateway this configuration describes: 0 when it
    answers 200, else 1 (a Docker HEALTHCHECK reserves 2), with one line."""
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"memory-gateway: configuration error: {exc}", file=sys.stderr)
        return 1
    url = f"http://{address(_probe_host(config.server.host), config.server.port)}/health"
    problem = _get_problem(url)
    if problem is not None:
        print(f"memory-gateway: not healthy: {url}: {problem}", file=sys.stderr)
        return 1
    print(f"memory-gateway: healthy: {url}")
    return 0


def _probe_host(host: str) -> str:
    """Where to reach a gateway bound to `host` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    # Bound to "::" the socket is IPv6-only (socket.create_server).
    return "::1" if host == "::" else host


def _get_problem(url: str) -> str | None:
    """None when `url` answers 200, else what went wrong."""
    # Straight to the gateway on this machine: a container's HTTP_PROXY must
    # not carry the health check elsewhere.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        # The URL is built above: http, to the configured port.
        with direct.open(url, timeout=HEALTH_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except urllib.error.URLError as exc:
        reason = exc.reason
        return str(getattr(reason, "strerror", None) or reason).lower()
    except (OSError, http.client.HTTPException) as exc:
        return (str(getattr(exc, "strerror", None) or exc) or type(exc).__name__).lower()
    return None if status == 200 else f"answered {status}"


def admin(args: argparse.Namespace) -> int:
    """`memories` and `keys`: calls to a running gateway (gateway/admin_cli.py)."""
    url = args.url
    if url is None:
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            print(f"memory-gateway: configuration error: {exc}", file=sys.stderr)
            return 2
        url = f"http://{address(_probe_host(config.server.host), config.server.port)}"
    return admin_cli.main(args, url)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "health":
        return health(args)
    if args.command in ("memories", "keys"):
        return admin(args)
    source = config_path(args)
    try:
        config = config_from_args(args)
        if config.memory.enabled:
            check_data_dir(config.data_path)
    except ConfigError as exc:
        print(f"memory-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen(config)
    except OSError as exc:
        print(
            f"memory-gateway: {cannot_listen(config.server.host, config.server.port, exc)}",
            file=sys.stderr,
        )
        return 1
    return serve(config, sock, source)


if __name__ == "__main__":
    sys.exit(main())
