"""Replicas: what the shared engines (PostgreSQL queue, S3 tables) cost.

Two parts, on real servers on loopback: PostgreSQL 15 (initdb in a temporary
directory; as root it runs as the `postgres` OS user) and moto's S3 server
(`python -m moto.server`, a bucket made with boto3).

1. Chat load. An instant fake upstream (bench/fake_upstream.py, which also
   answers extraction), and in front of it: one gateway on the embedded
   defaults (tables in its data dir, SQLite queue) and `--replicas` gateways
   (3) sharing `storage.uri: s3://...` and `queue.url: postgresql://...`,
   each with its own data dir. The bench user holds `--memories` memories
   (1,000, plus 20 other users), seeded before the gateways start; memory
   on, `yield_to_chat: false`. bench/load.py sends the same load to the
   direct upstream, the embedded gateway and the first 1, 2 and 3 replicas
   (one load.py, its requests round-robined over the replicas' ports), round
   after round as bench/overhead.py does; all replicas run throughout, so
   each takes extraction jobs from the shared queue whichever gets the chats.
   After each gateway measurement the run waits until the queue is drained
   (pending + running = 0 in `GET /v1/memories/stats`): "drain s". Also per
   target: chats answered `X-Memory-Status: degraded` (from `/metrics`), and
   the CPU time of the gateways, PostgreSQL and moto from before the load
   until the drain, per measured request.
2. Search at scale on object storage. bench/search_scale.py's table (random
   unit vectors, the queried user holds `--user-rows` rows, the others 100
   each), written in Arrow batches through the store at `--rows` rows, once
   in a local directory and once on moto; then, on a freshly opened store,
   the cold load of the user after each of `--cold` cache drops (on S3: the
   per-user reload a replica pays after a cache drop, docs/scaling.md), search
   p50/p99 through the scope cache, and `--direct` searches with the cache
   off; on moto, how many requests each cold load and the cached searches made.
   moto answers a ranged GET by reading the whole object, so the S3 cold
   figures grow with the table's file sizes (not just the user's rows) and
   are far worse than a real store's; 1M rows (4 GiB) is out of its reach.

    python bench/replicas.py                          # ~8 minutes
    python bench/replicas.py --rounds 1 --duration 1 --rows 20000 --user-rows 2000  # a quick look
    python bench/replicas.py --no-search              # part 1 only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import USER, drain, pooled, seed, seeded_data
from procs import PYTHON, ROOT, Proc, free_port, start_fake_upstream, start_gateway, wait_http

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "memgw"
PG_PASSWORD = "bench-only-password"
BUCKET = "memory-gateway-bench"
S3_KEY = "testing"
S3_REGION = "us-east-1"


class Postgres:
    """A throw-away PostgreSQL 15 cluster on 127.0.0.1 (as tests/postgres.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.run_as: list[str] = []
        self.started = False
        if os.geteuid() == 0:
            # initdb refuses root; the Debian package creates this user.
            shutil.chown(root, "postgres", "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self.run_as, *argv],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            cwd=self.root,
        )

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self.run_as:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        self.started = True
        self._pg_ctl("start")
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE gateway")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=on"
            f" -c unix_socket_directories={self.root} -c max_connections=100"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            *extra,
        )

    def stop(self) -> None:
        if self.started:
            # Its directory is deleted next: no shutdown checkpoint to wait for.
            self._pg_ctl("stop", "-m", "immediate")
            self.started = False

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, background workers)."""
        return tree(int((self.data / "postmaster.pid").read_text().split()[0]))

    def url(self, database: str = "gateway") -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"


def start_moto(workdir: Path) -> tuple[Proc, str, Any]:
    """moto's S3 server on a free port, with the bench's bucket; (process,
    endpoint, boto3 client)."""
    import boto3

    port = free_port()
    proc = Proc(
        "moto",
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        workdir / "moto.log",
    )
    wait_http(proc, f"http://127.0.0.1:{port}/moto-api/", 60)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_KEY,
        region_name=S3_REGION,
    )
    client.create_bucket(Bucket=BUCKET)
    return proc, endpoint, client


def storage_options(endpoint: str) -> dict[str, str]:
    """LanceDB's `storage_options` for moto at `endpoint`."""
    return {
        "endpoint": endpoint,
        "allow_http": "true",
        "aws_access_key_id": S3_KEY,
        "aws_secret_access_key": S3_KEY,
        "region": S3_REGION,
        "virtual_hosted_style_request": "false",
    }


def bucket_mib(client: Any, prefix: str) -> float:
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total / 2**20


def memory_statuses(ports: list[int]) -> dict[str, float]:
    """Chat requests by X-Memory-Status so far, summed over the gateways at `ports`."""
    out: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("memory_gateway_memory_status_total{"):
                labels, _, value = line.rpartition(" ")
                status = labels.split('status="', 1)[1].split('"', 1)[0]
                out[status] = out.get(status, 0.0) + float(value)
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux)."""
    out, todo = [], [pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        with contextlib.suppress(FileNotFoundError):
            todo += map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` so far (processes gone are skipped)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def load(ports: list[int], concurrency: int, stream: bool, duration: float) -> dict:
    """bench/load.py against `ports` (requests round-robined over them)."""
    argv = [
        PYTHON,
        str(ROOT / "bench" / "load.py"),
        "--port",
        *map(str, ports),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--user",
        USER,
        "--raw",
    ]
    if stream:
        argv.append("--stream")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load.py failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def chat_table(results: dict[str, dict[str, dict]]) -> str:
    rows = [
        "| case | target | req/s | x direct | p50 ms | +p50 | p99 ms | +p99 | errors "
        "| degraded | drain s | CPU ms/req: gateways, PostgreSQL, moto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, targets in results.items():
        d = targets["direct"]
        for name, r in targets.items():
            degraded = r.get("degraded")
            cpu = r.get("cpu_ms")
            cpu_cell = "-" if cpu is None else ", ".join(f"{v:.2f}" for v in cpu.values())
            rows.append(
                f"| {case} | {name} | {r['rps']:.0f} | {r['rps'] / d['rps']:.2f} "
                f"| {r['p50_ms']:.2f} | {r['p50_ms'] - d['p50_ms']:+.2f} "
                f"| {r['p99_ms']:.2f} | {r['p99_ms'] - d['p99_ms']:+.2f} | {r['errors']} "
                f"| {'-' if degraded is None else f'{degraded:.0f}'} "
                f"| {'-' if r['drain_s'] is None else format(r['drain_s'], '.1f')} "
                f"| {cpu_cell} |"
            )
    return "\n".join(rows)


def chat_part(
    args: argparse.Namespace, workdir: Path, pg: Postgres, endpoint: str, moto: Proc
) -> tuple[str, list[str]]:
    """Part 1: its table, and notes on the processes' memory."""
    from memory.config import StorageConfig

    procs: list[Proc] = []
    notes: list[str] = []
    try:
        uri = f"s3://{BUCKET}/chat"
        options = storage_options(endpoint)
        t = time.perf_counter()
        storage = StorageConfig(uri=uri, options=options, refresh_seconds=args.refresh)
        asyncio.run(seed(workdir / "seed-shared", args.memories, storage))
        print(f"seeded {args.memories} memories on S3 in {time.perf_counter() - t:.1f} s")

        upstream, up_port = start_fake_upstream(workdir)
        procs.append(upstream)
        memory = {"enabled": True, "llm": {"yield_to_chat": False}}
        embedded = seeded_data(args.memories, workdir, "data-embedded")
        embedded_gw, emb_port = start_gateway(
            "gateway-embedded", workdir, up_port, embedded, memory
        )
        procs.append(embedded_gw)
        replicas: list[Proc] = []
        shared = {
            "storage": {"uri": uri, "options": options, "refresh_seconds": args.refresh},
            "queue": {"url": pg.url()},
        }
        ports: list[int] = []
        for i in range(args.replicas):
            t = time.perf_counter()
            gw, port = start_gateway(
                f"replica-{i}",
                workdir,
                up_port,
                workdir / f"data-replica-{i}",
                memory,
                extra=shared,
            )
            procs.append(gw)
            replicas.append(gw)
            ports.append(port)
            print(
                f"replica {i} ready on port {port} in {time.perf_counter() - t:.1f} s", flush=True
            )

        targets: dict[str, list[int]] = {
            "direct": [up_port],
            "embedded (dir + SQLite)": [emb_port],
        }
        for n in range(1, args.replicas + 1):
            targets[f"{n} replica{'s' if n > 1 else ''} (S3 + PostgreSQL)"] = ports[:n]
        cases = [
            (c, s) for c in args.concurrency for s in ([False, True] if args.stream else [False])
        ]
        raw: dict[str, dict[str, list[dict]]] = {}
        for rnd in range(args.rounds):
            for c, stream in cases:
                case = f"c={c} {'stream' if stream else 'non-stream'}"
                for name, target in targets.items():
                    gateway = name != "direct"
                    # CPU of every process involved, from before the load
                    # until the extraction it left behind is done.
                    gateways = [embedded_gw] if name.startswith("embedded") else replicas
                    groups = {
                        "gateway": lambda g=gateways: [i for p in g for i in tree(p.popen.pid)],
                        "postgres": pg.pids,
                        "moto": lambda: tree(moto.popen.pid),
                    }
                    cpu = {k: cpu_seconds(f()) for k, f in groups.items()}
                    before = memory_statuses(target) if gateway else {}
                    r = load(target, c, stream, args.duration)
                    if gateway:
                        after = memory_statuses(target)
                        r["degraded"] = after.get("degraded", 0) - before.get("degraded", 0)
                        r["drain_s"] = drain(target[0], timeout=300)
                        r["cpu_s"] = {k: cpu_seconds(f()) - cpu[k] for k, f in groups.items()}
                    raw.setdefault(case, {}).setdefault(name, []).append(r)
                    print(
                        f"round {rnd + 1} {case:>14} {name:>30}: {r['rps']:7.0f} req/s "
                        f"p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms "
                        f"errors {r['errors']} degraded {r.get('degraded', '-')} "
                        f"drain {r.get('drain_s', 0):.1f} s",
                        flush=True,
                    )
        results: dict[str, dict[str, dict]] = {}
        for case, by_target in raw.items():
            results[case] = {}
            for name, runs in by_target.items():
                results[case][name] = pooled(runs)
                if name != "direct":
                    results[case][name]["degraded"] = sum(r["degraded"] for r in runs)
                    # CPU ms per measured request, by group.
                    requests = sum(r["requests"] for r in runs) or 1
                    results[case][name]["cpu_ms"] = {
                        k: sum(r["cpu_s"][k] for r in runs) / requests * 1000
                        for k in runs[0]["cpu_s"]
                    }
        for p in procs:
            if p.alive():
                rss, peak = p.rss_mib()
                notes.append(f"RSS of {p.name}: {rss:.0f} MiB now, {peak:.0f} MiB peak")
            else:
                notes.append(f"{p.name} exited during the run")
        if args.out:
            args.out.with_suffix(".chat.json").write_text(json.dumps(results, indent=1))
        return chat_table(results), notes
    finally:
        for p in reversed(procs):
            p.stop()


async def search_case(
    args: argparse.Namespace, root: Path, storage: Any, requests: Callable[[], int]
) -> dict[str, Any]:
    """search_scale.py's table and searches, in `root` or at `storage.uri`;
    `requests()` counts the object store's requests so far."""
    size, user_rows, queries, direct = args.rows, args.user_rows, args.queries, args.direct
    import numpy as np
    from search_scale import RandomEmbedder, build, config, texts
    from search_scale import pct as fraction_pct

    from memory.models import Scope
    from memory.store import MemoryStore

    rng = np.random.default_rng(size)
    write_s, index_s = await build(root, rng, size, user_rows, vector_index=False, storage=storage)

    scope = Scope(user_id="target")
    query_texts = texts(rng, max(queries, direct, args.cold))
    out: dict[str, Any] = {"write_s": write_s, "index_s": index_s}

    async def timed(store: Any, q: str) -> float:
        t = time.perf_counter()
        await store.search(scope, q)
        return (time.perf_counter() - t) * 1e3

    store = await MemoryStore.open(root, RandomEmbedder(1), config(True, False), storage=storage)
    try:
        cold = []
        before = requests()
        for q in query_texts[: args.cold]:
            store._cache.clear()
            cold.append(await timed(store, q))
        out["cold_requests"] = (requests() - before) / len(cold)
        before = requests()
        warm = [await timed(store, q) for q in query_texts[:queries]]
        out["cached_requests"] = requests() - before
    finally:
        await store.close()
    out |= {
        "first_ms": cold[0],
        "cold_p50": statistics.median(cold),
        "cold_max": max(cold),
        "p50": statistics.median(warm),
        "p99": fraction_pct(warm, 0.99),
    }
    if direct:
        store = await MemoryStore.open(
            root, RandomEmbedder(2), config(False, False), storage=storage
        )
        try:
            lat = [await timed(store, q) for q in query_texts[:direct]]
        finally:
            await store.close()
        out |= {"direct_p50": statistics.median(lat), "direct_max": max(lat)}
    return out


def search_part(
    args: argparse.Namespace, workdir: Path, endpoint: str, client: Any, moto: Proc
) -> str:
    from memory.config import StorageConfig

    rows = [
        "| where | rows | user rows | write s | index s | MiB | first search ms "
        "| cold p50 ms | cold max ms | requests per cold load | cache p50 ms | cache p99 ms "
        "| requests, cached searches | LanceDB p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for where in ("local dir", "S3 (moto)"):
        root = workdir / f"search-{where.split()[0]}"
        storage = None
        if where.startswith("S3"):
            prefix = f"search-{args.rows}"
            storage = StorageConfig(
                uri=f"s3://{BUCKET}/{prefix}",
                options=storage_options(endpoint),
                refresh_seconds=args.refresh,
            )
        t = time.perf_counter()

        def requests(local: bool = storage is None, log: Path = workdir / "moto.log") -> int:
            # moto logs one line per request it answered.
            return 0 if local else log.read_text(errors="replace").count(" HTTP/1.1")

        r = asyncio.run(search_case(args, root, storage, requests))
        if storage is None:
            mib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        else:
            mib = bucket_mib(client, prefix)
        direct = "-" if "direct_p50" not in r else f"{r['direct_p50']:.1f}"
        cold_requests = "-" if storage is None else f"{r['cold_requests']:.0f}"
        cached_requests = "-" if storage is None else str(r["cached_requests"])
        rows.append(
            f"| {where} | {args.rows:,} | {min(args.rows, args.user_rows):,} "
            f"| {r['write_s']:.1f} | {r['index_s']:.1f} | {mib:,.0f} | {r['first_ms']:.1f} "
            f"| {r['cold_p50']:.1f} | {r['cold_max']:.1f} "
            f"| {cold_requests} | {r['p50']:.2f} | {r['p99']:.2f} "
            f"| {cached_requests} | {direct} |"
        )
        print(rows[-1], f"({time.perf_counter() - t:.0f} s in all)", flush=True)
        if storage is not None:
            rss, peak = moto.rss_mib()
            print(f"RSS of moto: {rss:.0f} MiB now, {peak:.0f} MiB peak", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--stream", action="store_true", help="also streamed chats")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--memories", type=int, default=1000, help="of the bench user")
    parser.add_argument(
        "--refresh", type=float, default=2.0, help="storage.refresh_seconds of the replicas"
    )
    parser.add_argument("--rows", type=int, default=200_000, help="search part: table rows")
    parser.add_argument("--user-rows", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--direct", type=int, default=2, help="also this many searches with the cache off"
    )
    parser.add_argument("--cold", type=int, default=3, help="cold loads (after a cache drop)")
    parser.add_argument("--no-chat", action="store_true")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--out", type=Path, help="write the chat results as JSON here (.chat.json)")
    args = parser.parse_args()

    import moto

    print(
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores; "
        f"python {platform.python_version()}; moto {moto.__version__}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-replicas-"))
    pg_root = Path(tempfile.mkdtemp(prefix="mg-bench-pg-"))
    pg = Postgres(pg_root)
    moto_proc: Proc | None = None
    chat = search = ""
    notes: list[str] = []
    try:
        pg.start()
        moto_proc, endpoint, client = start_moto(workdir)
        if not args.no_chat:
            chat, notes = chat_part(args, workdir, pg, endpoint, moto_proc)
        if not args.no_search:
            search = search_part(args, workdir, endpoint, client, moto_proc)
        print()
        if chat:
            print(f"rounds: {args.rounds} x {args.duration}s per target and case")
            print(chat)
            for n in notes:
                print(n)
        if search:
            print(search)
    finally:
        if moto_proc is not None:
            moto_proc.stop()
        with contextlib.suppress(Exception):
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)


if __name__ == "__main__":
    main()
