"""How far memory falls behind under sustained full load, and what requests get.

Short runs (bench/overhead.py) leave the extraction process's work for after
the measurement: it runs at idle CPU priority, so while requests keep both
cores busy its jobs wait in the spool. This run keeps the load on for longer
than `server.extraction_max_lag_seconds`, so the guard (gateway/priority.py)
has to switch the extraction process to normal priority, and reports per
interval the spool's pending jobs and lag (`/v1/memories/stats`) and which
priority the extraction process is at; then the load's requests/s and
latency over the whole run, and how long the spool took to drain after it.
The same gateway as bench/overhead.py's memory-on target (10k memories for
the user, local embedder, instant fake upstream, `X-Memory-Mode: auto`).

    python bench/backlog.py                       # c=16, 60 s, max lag 10 s
    python bench/backlog.py --extraction inline   # the same, extraction inline
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import drain, load_command, seeded_data
from procs import start_fake_upstream, start_gateway


def spool(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/memories/stats", timeout=30) as r:
        return dict(json.loads(r.read())["spool"])


def priority(pid: int | None) -> str:
    if pid is None:
        return "-"
    with contextlib.suppress(OSError):
        return "idle" if os.sched_getscheduler(pid) == os.SCHED_IDLE else "normal"
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=60, help="length of the load")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-lag", type=float, default=10.0)
    parser.add_argument("--extraction", choices=["process", "inline"], default="process")
    parser.add_argument("--memories", type=int, default=10_000)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-backlog-"))
    upstream, up_port = start_fake_upstream(workdir)
    gateway = None
    try:
        data = seeded_data(args.memories, workdir)
        server = {"extraction": args.extraction, "extraction_max_lag_seconds": args.max_lag}
        gateway, port = start_gateway(
            "gateway", workdir, up_port, data, {"enabled": True}, server=server
        )
        pid = gateway.processes().get("mg-extraction")
        print(
            f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; c={args.concurrency}, "
            f"extraction {args.extraction}, max lag {args.max_lag:g} s"
        )
        load = subprocess.Popen(
            load_command(port, args.concurrency, args.seconds), stdout=subprocess.PIPE, text=True
        )
        print("| t s | spool pending | lag s | extraction priority |")
        print("|---:|---:|---:|---|")
        started = time.monotonic()
        while load.poll() is None:
            time.sleep(args.interval)
            s = spool(port)
            print(
                f"| {time.monotonic() - started:.0f} | {s['pending']} "
                f"| {s['lag_seconds']:.1f} | {priority(pid)} |",
                flush=True,
            )
        out, _ = load.communicate()
        r = json.loads(out)
        print(
            f"load: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"errors {r['errors']}"
        )
        drained = drain(port, timeout=600)
        print(f"after the load: the spool drained in {drained:.1f} s")
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
