"""What the gateway adds to a chat call: against the upstream itself and against LiteLLM.

One run starts an instant fake upstream (bench/fake_upstream.py) and, in front
of it: the gateway with memory off, the gateway with memory on (10k memories
for the queried user, local embedder), and LiteLLM's proxy (from a throw-away
virtualenv under /tmp, installed on first use; never a dependency of ours).
The same load (bench/load.py, its own process) is then sent to each target in
turn, round after round, so that a noisy neighbour hurts every target alike.
Latencies are pooled over the rounds; "added" is the target's percentile minus
the direct one, "ratio" is the target's requests/s over direct's. After each
memory-on measurement the run waits until that gateway's extraction backlog is
drained, so it does not run during the next target's measurement; "drain s"
is how long that took: extraction work the measurement left behind (with
`server.extraction: process` it yields the CPU to requests, see
docs/benchmarks.md).
`--workers N` adds both gateways again with `server.workers: N`;
`--extraction-process` adds memory on with `server.extraction: process`
(with `--workers N` too, also N workers and the extraction process).

    python bench/overhead.py                   # everything, ~5 minutes
    python bench/overhead.py --no-litellm --rounds 2 --duration 2
    python bench/overhead.py --workers 2       # also with two processes each
    python bench/overhead.py --fresh           # every question new: no cached embedding
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import pct
from procs import PYTHON, ROOT, Proc, free_port, start_fake_upstream, start_gateway, wait_http

USER = "bench-user"
LITELLM_VENV = Path(tempfile.gettempdir()) / "mg-bench-litellm-venv"
SEED_CACHE = Path(tempfile.gettempdir()) / "mg-bench-seed"

RELATIONS = ["sister", "brother", "friend", "colleague", "neighbour", "cousin", "dentist", "coach"]
NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
CITIES = ["Paris", "Lisbon", "Kyoto", "Oslo", "Lima", "Cairo", "Austin", "Hanoi", "Quito", "Perth"]
LIKES = ["chess", "sushi", "jazz", "hiking", "pottery", "tennis", "opera", "kayaks", "tea", "maps"]


def memory_texts(n: int) -> list[str]:
    """`n` distinct, plausible facts (not one text repeated)."""
    out = []
    i = 0
    while len(out) < n:
        r, nm = RELATIONS[i % len(RELATIONS)], NAMES[(i // 8) % len(NAMES)]
        c, lk = CITIES[(i // 96) % len(CITIES)], LIKES[(i // 960) % len(LIKES)]
        out.append(f"The user's {r} {nm} #{i} lives in {c} and loves {lk}.")
        i += 1
    return out


async def seed(data_dir: Path, n: int, storage: Any = None) -> None:
    """`n` memories of the bench user and 20 other users, in `data_dir`'s
    tables or at `storage.uri` (a `StorageConfig`: bench/replicas.py)."""
    from memory.config import MemoryConfig
    from memory.engine import MemoryEngine
    from memory.models import Memory, Scope

    engine = await MemoryEngine.open(MemoryConfig(), data_dir, storage=storage)
    try:
        scope = Scope(user_id=USER)
        now = datetime.now(UTC)
        memories = [
            Memory(
                id=f"bench-{i:07d}",
                user_id=USER,
                agent_id=None,
                session_id=None,
                text=t,
                metadata={},
                created_at=now,
                updated_at=now,
            )
            for i, t in enumerate(memory_texts(n))
        ]
        await engine.store.import_memories(scope, memories)
        # Some other users, so that the user filter has something to filter.
        for u in range(20):
            other = Scope(user_id=f"other-{u}")
            await engine.store.add(other, f"Other user {u} likes {LIKES[u % len(LIKES)]}.")
        await engine.store.optimize()
    finally:
        await engine.close()


def seeded_data(n: int, workdir: Path, name: str = "data-on") -> Path:
    """A data dir holding `n` memories of the bench user, built once and cached."""
    cache = SEED_CACHE / f"{n}"
    if not (cache / "done").exists():
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        t = time.perf_counter()
        print(f"seeding {n} memories into {cache} (embedding them, once) ...", flush=True)
        asyncio.run(seed(cache, n))
        (cache / "done").write_text(f"{time.perf_counter() - t:.1f}s\n")
    data = workdir / name
    shutil.copytree(cache, data)
    (data / "done").unlink()
    return data


def start_litellm(
    workdir: Path, upstream_port: int, venv: Path, install_timeout: float, master_key: str
) -> tuple[Proc, int]:
    bin_dir = venv / "bin"
    if not (bin_dir / "litellm").exists():
        print(f"installing litellm[proxy] into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(bin_dir / "pip"), "install", "-q", "litellm[proxy]"],
            check=True,
            timeout=install_timeout,
        )
    config = {
        "model_list": [
            {
                "model_name": "bench-model",
                "litellm_params": {
                    "model": "openai/bench-model",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": "sk-fake-upstream",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        # A throw-away key for this run only; LiteLLM refuses to start without one.
        "general_settings": {"master_key": master_key},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = Proc(
        "litellm",
        [
            str(bin_dir / "litellm"),
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        workdir / "litellm.log",
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LITELLM_LOG": "ERROR", "HOME": str(workdir)},
    )
    body = json.dumps(
        {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    wait_http(proc, url, 180, "POST", body, key=master_key)
    return proc, port


def drain(port: int, timeout: float = 120.0) -> float:
    """Wait until a memory-on gateway has no extraction job left: its backlog
    would otherwise run during the next target's measurement and steal its CPU.
    Returns the seconds waited: extraction left behind by the measurement."""
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/memories/stats", timeout=30) as r:
            spool = json.loads(r.read())["spool"]
        if spool["pending"] + spool["running"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise RuntimeError(f"the gateway on port {port} still has extraction jobs after {timeout} s")


def load_command(port: int, concurrency: int, duration: float, *extra: str) -> list[str]:
    """bench/load.py against `port`, as the bench user."""
    return [
        PYTHON,
        str(ROOT / "bench" / "load.py"),
        "--port",
        str(port),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--user",
        USER,
        *extra,
    ]


def load(port: int, concurrency: int, stream: bool, duration: float, extra: list[str]) -> dict:
    argv = load_command(port, concurrency, duration, "--raw", *extra)
    if stream:
        argv.append("--stream")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load.py failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def pooled(runs: list[dict]) -> dict[str, Any]:
    lat = [x / 1000 for r in runs for x in r["latency_ms"]]
    ttfb = [x / 1000 for r in runs for x in r["ttfb_ms"]]
    requests = sum(r["requests"] for r in runs)
    # Requests/s over the rounds: the mean of each round's rate.
    rps = sum(r["rps"] for r in runs) / len(runs)
    drains = [r["drain_s"] for r in runs if "drain_s" in r]
    return {
        "drain_s": sum(drains) / len(drains) if drains else None,
        "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "rps": rps,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "ttfb_p50_ms": pct(ttfb, 50),
        "ttfb_p99_ms": pct(ttfb, 99),
    }


def table(results: dict[str, dict[str, dict]]) -> str:
    rows = [
        "| case | target | req/s | x direct | p50 ms | +p50 | p99 ms | +p99 "
        "| TTFB p50 | TTFB p99 | errors | drain s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, targets in results.items():
        d = targets["direct"]
        for name, r in targets.items():
            rows.append(
                f"| {case} | {name} | {r['rps']:.0f} | {r['rps'] / d['rps']:.2f} "
                f"| {r['p50_ms']:.2f} | {r['p50_ms'] - d['p50_ms']:+.2f} "
                f"| {r['p99_ms']:.2f} | {r['p99_ms'] - d['p99_ms']:+.2f} "
                f"| {r['ttfb_p50_ms']:.2f} | {r['ttfb_p99_ms']:.2f} | {r['errors']} "
                f"| {'-' if r['drain_s'] is None else format(r['drain_s'], '.1f')} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--apis",
        nargs="+",
        choices=["chat", "responses", "messages"],
        default=["chat"],
        help="the APIs to send the load to (LiteLLM is measured on chat only)",
    )
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-on gateway")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also measure the gateways with this many worker processes (server.workers)",
    )
    parser.add_argument(
        "--extraction-process",
        action="store_true",
        help="also measure memory on with server.extraction: process",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="every request asks a new question (bench/load.py --fresh): with memory on,"
        " each one pays its query embedding instead of hitting the query cache",
    )
    parser.add_argument(
        "--metrics-off",
        action="store_true",
        help="also measure each gateway with metrics.enabled: false (the cost of /metrics)",
    )
    parser.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    parser.add_argument("--litellm-install-timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, help="write the pooled results as JSON here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-overhead-"))
    procs: list[Proc] = []
    notes: list[str] = []
    try:
        upstream, up_port = start_fake_upstream(workdir)
        procs.append(upstream)
        targets: dict[str, tuple[int, list[str]]] = {"direct": (up_port, [])}

        def gateway(
            label: str, name: str, data: Path, memory: bool, metrics: bool = True, **server: Any
        ) -> None:
            gw, port = start_gateway(
                name,
                workdir,
                up_port,
                data,
                {"enabled": memory},
                server=server,
                metrics={"enabled": metrics},
            )
            procs.append(gw)
            targets[label] = (port, [])

        on = f"gateway, memory on ({args.memories // 1000}k)"

        def gateways(workers: int) -> None:
            """Memory off, memory on, and memory on with the extraction
            process (`--extraction-process`), with `workers` serving processes."""
            label = "" if workers == 1 else f", {workers} workers"
            tag = "" if workers == 1 else "-workers"
            server: dict[str, Any] = {} if workers == 1 else {"workers": workers}
            off = workdir / f"data-off{tag}"
            gateway(f"gateway, memory off{label}", f"gateway-off{tag}", off, False, **server)
            if args.metrics_off:
                gateway(
                    f"gateway, memory off{label}, metrics off",
                    f"gateway-off{tag}-nometrics",
                    workdir / f"data-off{tag}-nometrics",
                    False,
                    metrics=False,
                    **server,
                )
            if args.no_memory:
                return
            data = seeded_data(args.memories, workdir, f"data-on{tag}")
            gateway(f"{on}{label}", f"gateway-on{tag}", data, True, **server)
            if args.metrics_off:
                data = seeded_data(args.memories, workdir, f"data-on{tag}-nometrics")
                gateway(
                    f"{on}{label}, metrics off",
                    f"gateway-on{tag}-nometrics",
                    data,
                    True,
                    metrics=False,
                    **server,
                )
            if args.extraction_process:
                data = seeded_data(args.memories, workdir, f"data-on{tag}-extraction")
                gateway(
                    f"{on}{label}, extraction process",
                    f"gateway-on{tag}-extraction",
                    data,
                    True,
                    extraction="process",
                    **server,
                )

        gateways(1)
        if args.workers > 1:
            gateways(args.workers)
        if not args.no_litellm:
            try:
                key = "sk-" + secrets.token_hex(24)
                lp, port = start_litellm(
                    workdir, up_port, args.litellm_venv, args.litellm_install_timeout, key
                )
                procs.append(lp)
                targets["litellm proxy"] = (port, ["--key", key])
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                notes.append(f"LiteLLM not measured: {str(exc)[:500]}")
                print(notes[-1], flush=True)

        cases = [(a, c, s) for a in args.apis for c in args.concurrency for s in (False, True)]
        raw: dict[str, dict[str, list[dict]]] = {}
        for rnd in range(args.rounds):
            for api, c, stream in cases:
                case = f"c={c} {'stream' if stream else 'non-stream'}"
                if args.apis != ["chat"]:
                    case = f"{api} {case}"
                for name, (port, extra) in targets.items():
                    if api != "chat" and name == "litellm proxy":
                        continue
                    fresh = ["--fresh"] if args.fresh else []
                    r = load(port, c, stream, args.duration, [*extra, *fresh, "--api", api])
                    if "memory on" in name:
                        r["drain_s"] = drain(port)
                    raw.setdefault(case, {}).setdefault(name, []).append(r)
                    print(
                        f"round {rnd + 1} {case:>18} {name:>26}: {r['rps']:7.0f} req/s "
                        f"p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms "
                        f"errors {r['errors']}",
                        flush=True,
                    )
        results = {case: {n: pooled(rs) for n, rs in t.items()} for case, t in raw.items()}
        print()
        print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}")
        print(f"rounds: {args.rounds} x {args.duration}s per target and case")
        print(table(results))
        for p in procs:
            if not p.alive():
                notes.append(f"{p.name} exited during the run")
                continue
            each = p.processes_rss_mib()
            if len(each) == 1:
                [(rss, peak)] = each.values()
                notes.append(f"RSS of {p.name}: {rss:.0f} MiB now, {peak:.0f} MiB peak")
                continue
            parts = ", ".join(f"{n} {r:.0f} (peak {k:.0f})" for n, (r, k) in each.items())
            total = sum(r for r, _ in each.values())
            notes.append(f"RSS of {p.name}, MiB: {parts}; {total:.0f} in all")
        for n in notes:
            print(n)
        if args.out:
            args.out.write_text(json.dumps({"results": results, "notes": notes}, indent=1))
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
