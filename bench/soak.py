"""Soak: a steady mixed load against `memory-gateway serve`, watching for leaks.

The gateway runs as a user would run it (memory on, local embedder, extraction
by the instant fake upstream with `--add`, so every exchange writes a fact).
`--concurrency` clients loop for `--minutes`: half the requests stream, users are
drawn from `--users`, each body differs (so retrieval and extraction see new
text). Reported: errors, requests, RSS and open file descriptors of the server
after warm-up and at the end (from /proc), spool state once the load stops and
after it drained, and the LanceDB directory size at start and end.

Run: `python bench/soak.py --minutes 30` (the documented run); prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Proc, start_fake_upstream, start_gateway

KEY = "sk-soak-not-a-real-key"


def open_fds(proc: Proc) -> int:
    return len(os.listdir(f"/proc/{proc.popen.pid}/fd"))


def fd_kinds(proc: Proc, data: Path) -> dict[str, int]:
    """Open descriptors by kind: a leak shows which kind grows, not just that one does."""
    kinds: dict[str, int] = {}
    base = f"/proc/{proc.popen.pid}/fd"
    for fd in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if target.startswith(str(data)):
            parts = Path(target).relative_to(data).parts
            kind = "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts)
        elif target.startswith("/"):
            kind = "file:" + Path(target).suffix
        else:
            kind = target.split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def snapshot(proc: Proc, data: Path) -> dict[str, Any]:
    rss, peak = proc.rss_mib()
    return {
        "rss_mib": round(rss, 1),
        "peak_rss_mib": round(peak, 1),
        "open_fds": open_fds(proc),
        "fd_kinds": fd_kinds(proc, data),
        "lancedb_mib": round(dir_bytes(data / "lancedb") / 2**20, 2),
    }


async def client_loop(
    http: httpx.AsyncClient,
    users: int,
    distinct: int,
    stop: float,
    rng: random.Random,
    tally: dict[str, int],
) -> None:
    while time.monotonic() < stop:
        user = f"soak-user-{rng.randrange(users)}"
        stream = rng.random() < 0.5
        text = f"I like topic {rng.randrange(distinct)}"
        body = {"model": "bench-model", "messages": [{"role": "user", "content": text}]}
        if stream:
            body["stream"] = True
        try:
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers={"X-User-Id": user}
            ) as response:
                payload = await response.aread()
            complete = not stream or payload.rstrip().endswith(b"[DONE]")
            ok = response.status_code == 200 and complete
        except httpx.HTTPError:
            ok = False
        tally["requests"] += 1
        tally["stream" if stream else "plain"] += 1
        if not ok:
            tally["errors"] += 1


async def sample(
    gateway: Proc, data: Path, every: float, stop: float, out: list[dict[str, Any]]
) -> None:
    """A snapshot every `every` seconds: a curve tells a plateau from a leak."""
    began = time.monotonic()
    while time.monotonic() < stop:
        await asyncio.sleep(min(every, max(stop - time.monotonic(), 0)))
        point = await asyncio.to_thread(snapshot, gateway, data)
        out.append({"minute": round((time.monotonic() - began) / 60, 1), **point})


async def load(
    port: int,
    args: argparse.Namespace,
    seconds: float,
    samples: tuple[Proc, Path, list[dict[str, Any]]] | None = None,
) -> dict[str, int]:
    tally = {"requests": 0, "errors": 0, "stream": 0, "plain": 0}
    n = args.concurrency
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"authorization": f"Bearer {KEY}"},
        timeout=60,
        limits=limits,
    ) as http:
        stop = time.monotonic() + seconds
        clients = [
            client_loop(http, args.users, args.distinct, stop, random.Random(i), tally)
            for i in range(args.concurrency)
        ]
        if samples is not None:
            gateway, data, out = samples
            clients.append(sample(gateway, data, args.sample_seconds, stop, out))
        await asyncio.gather(*clients)
    return tally


def spool_stats(port: int) -> dict[str, int]:
    response = httpx.get(f"http://127.0.0.1:{port}/v1/memories/stats", timeout=30)
    response.raise_for_status()
    stats = response.json()
    return {**stats["spool"], "memories": stats["memories"], "users": stats["users"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--users", type=int, default=200)
    # Distinct things a user says: small values make the stored data plateau, so
    # growth of RSS, fds or the directory afterwards means a leak, not more data.
    parser.add_argument("--distinct", type=int, default=5_000_000)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--sample-seconds", type=float, default=60.0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    data = workdir / "data"
    upstream, upstream_port = start_fake_upstream(workdir, "--add")
    gateway = None
    try:
        memory = {
            "embedder": {"provider": "local"},
            "llm": {"api_key": "sk-soak-extractor"},
            # Maintenance as configured by default in production: once a minute.
            "maintenance": {"interval_seconds": 60.0},
        }
        gateway, port = start_gateway("gateway", workdir, upstream_port, data, memory)
        asyncio.run(load(port, args, args.warmup_seconds))
        start = snapshot(gateway, data)
        began = time.monotonic()
        curve: list[dict[str, Any]] = []
        tally = asyncio.run(load(port, args, args.minutes * 60, (gateway, data, curve)))
        elapsed = time.monotonic() - began
        at_stop = spool_stats(port)
        deadline = time.monotonic() + args.drain_timeout
        while True:
            drained = spool_stats(port)
            if drained["pending"] + drained["running"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        drain_seconds = round(time.monotonic() - began - elapsed, 1)
        end = snapshot(gateway, data)
        report = {
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "users": args.users,
            **tally,
            "rps": round(tally["requests"] / elapsed, 1),
            "start": start,
            "end": end,
            "samples": curve,
            "spool_at_stop": at_stop,
            "spool_after_drain": drained,
            "drain_seconds": drain_seconds,
            "alive": gateway.alive(),
        }
        print(json.dumps(report, indent=2))
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
