"""Start and stop the processes a benchmark measures: the fake upstream, the
gateway, LiteLLM's proxy. Each one runs in its own process group so that
stopping it stops its children (uvicorn workers) and nothing else."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        self._file = log.open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._file.close()

    def rss_mib(self) -> tuple[float, float]:
        """(current, peak) resident memory of the process, in MiB (Linux)."""
        return _rss_mib(self.popen.pid)

    def processes(self) -> dict[str, int]:
        """The pid of each process of the tree, by its name (`mg-worker-0`,
        `mg-extraction`, ...; Linux). The root, and a name seen before, get
        their pid appended: `python[123]`."""
        out: dict[str, int] = {}
        todo = [self.popen.pid]
        while todo:
            pid = todo.pop()
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except FileNotFoundError:
                continue
            if name in out or pid == self.popen.pid:
                name = f"{name}[{pid}]"
            out[name] = pid
            todo += [int(k) for k in kids]
        return out

    def processes_rss_mib(self) -> dict[str, tuple[float, float]]:
        """(current, peak) resident memory in MiB of each process of the tree,
        by its name (see `processes`)."""
        out: dict[str, tuple[float, float]] = {}
        for name, pid in self.processes().items():
            try:
                out[name] = _rss_mib(pid)
            except FileNotFoundError:
                continue
        return out

    def tail(self, n: int = 2000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")


def _rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.partition(":")[::2] for line in status.splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def wait_http(
    proc: Proc,
    url: str,
    timeout: float,
    method: str = "GET",
    body: bytes | None = None,
    key: str = "sk-bench-not-a-real-key",
) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            req = urllib.request.Request(url, data=body, method=method)
            req.add_header("content-type", "application/json")
            req.add_header("authorization", f"Bearer {key}")
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s:\n{proc.tail()}")


def start_fake_upstream(workdir: Path, *extra: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        "fake-upstream",
        [PYTHON, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(port), *extra],
        workdir / "fake_upstream.log",
    )
    wait_http(proc, f"http://127.0.0.1:{port}/stats", 30)
    return proc, port


def start_gateway(
    name: str,
    workdir: Path,
    upstream_port: int,
    data_dir: Path,
    memory: dict,
    timeout: float = 120,
    server: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> tuple[Proc, int]:
    """`memory-gateway serve` with its default server, as a user would run it;
    `extra`: more top-level sections of its configuration (`storage`, `queue`)."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning", **(server or {})},
        "upstreams": [
            {"name": "fake", "base_url": f"http://127.0.0.1:{upstream_port}/v1", "default": True},
            # The same fake, for /v1/messages (bench/overhead.py --apis messages).
            {
                "name": "fake-anthropic",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api": "anthropic",
            },
        ],
        "data_dir": str(data_dir),
        "memory": memory,
        "metrics": metrics or {"enabled": True},
        **(extra or {}),
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = Proc(
        name,
        [PYTHON, "-m", "gateway", "serve", "--config", str(path)],
        workdir / f"{name}.log",
    )
    wait_http(proc, f"http://127.0.0.1:{port}/ready", timeout)
    return proc, port
