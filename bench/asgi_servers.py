"""Which ASGI server runs the gateway fastest: uvicorn (uvloop + httptools) or granian.

The gateway (memory off) runs under each server in turn in front of the same
fake upstream; the same load is sent to each, alternating, streaming and not.
granian is not our dependency: give `--granian-python`, the interpreter of a
virtualenv where granian and this project are importable, e.g.

    python -m venv /tmp/mg-granian-venv
    echo /work/venv/lib/python3.11/site-packages \
        > /tmp/mg-granian-venv/lib/python3.11/site-packages/work-venv.pth
    /tmp/mg-granian-venv/bin/pip install granian
    python bench/asgi_servers.py --granian-python /tmp/mg-granian-venv/bin/python

Under granian the app is built by `app_from_config` below (a factory), from the
config file named after `--`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import load, pooled, table
from procs import ROOT, Proc, free_port, start_fake_upstream, start_gateway, wait_http

CONFIG_FILE = Path(tempfile.gettempdir()) / "mg-bench-granian.yaml"


def app_from_config():  # type: ignore[no-untyped-def]
    """granian's factory: the gateway app, configured like `memory-gateway serve`."""
    from gateway.app import create_app
    from gateway.config import load_config

    return create_app(load_config(CONFIG_FILE))


def start_granian(python: str, workdir: Path, config: Path) -> tuple[Proc, int]:
    port = free_port()
    shutil.copy(config, CONFIG_FILE)
    proc = Proc(
        "granian",
        [
            python,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--factory",
            "--loop",
            "uvloop",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-ws",
            "--log-level",
            "warning",
            "asgi_servers:app_from_config",
        ],
        workdir / "granian.log",
        env={"PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    wait_http(proc, f"http://127.0.0.1:{port}/ready", 120)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--granian-python", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-asgi-"))
    procs: list[Proc] = []
    try:
        up, up_port = start_fake_upstream(workdir)
        procs.append(up)
        uv, uv_port = start_gateway("uvicorn", workdir, up_port, workdir / "d1", {"enabled": False})
        procs.append(uv)
        gr, gr_port = start_granian(args.granian_python, workdir, workdir / "uvicorn.yaml")
        procs.append(gr)
        targets = {"direct": up_port, "uvicorn+uvloop+httptools": uv_port, "granian": gr_port}
        raw: dict[str, dict[str, list[dict]]] = {}
        for _ in range(args.rounds):
            for c in args.concurrency:
                for stream in (False, True):
                    case = f"c={c} {'stream' if stream else 'non-stream'}"
                    for name, port in targets.items():
                        r = load(port, c, stream, args.duration, [])
                        raw.setdefault(case, {}).setdefault(name, []).append(r)
                        print(f"{case:>18} {name:>26}: {r['rps']:7.0f} req/s", flush=True)
        results = {case: {n: pooled(rs) for n, rs in t.items()} for case, t in raw.items()}
        print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(table(results))
        print(json.dumps(results))
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
