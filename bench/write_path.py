"""How many exchanges per second the write path sustains: spool, workers, store.

The extraction model is bench/fake_upstream.py answering instantly (with
`--add`, one new fact per exchange, so every job really writes to LanceDB).
The engine runs in this process exactly as the gateway runs it (same config,
local embedder). Two phases are timed:

- enqueue: `record_exchange` for every exchange (redaction + durable SQLite
  insert), as the gateway does after each completion, from `--producers`
  concurrent callers (the gateway's concurrent requests; 1 = one at a time);
- drain: from the first enqueue until the spool is empty (the workers' LLM
  call, related-memory search, embedding and store writes).

The fake upstream counts the extraction calls and the characters of their
prompts, hence LLM calls and prompt tokens (~chars/4) per exchange.

    python bench/write_path.py --exchanges 1000 --users 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import start_fake_upstream

from gateway.config import HTTPConfig
from gateway.transport import upstream_client
from memory.config import LLMConfig, MemoryConfig, SpoolConfig
from memory.engine import MemoryEngine
from memory.models import Exchange, Scope

CITIES = ["Paris", "Lisbon", "Kyoto", "Oslo", "Lima", "Cairo", "Austin", "Hanoi", "Quito", "Perth"]


def exchange(i: int, users: int) -> Exchange:
    city = CITIES[i % len(CITIES)]
    return Exchange(
        scope=Scope(user_id=f"writer-{i % users}"),
        messages=[
            {"role": "user", "content": f"I'm moving to {city} next month, trip number {i}."}
        ],
        reply=f"Congratulations on the move to {city}! Do you need help with the paperwork?",
        at=datetime.now(UTC),
    )


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        return json.loads(r.read())


async def measure(args: argparse.Namespace, port: int, data: Path) -> dict:
    config = MemoryConfig(
        llm=LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench-fake"),
        spool=SpoolConfig(concurrency=args.workers),
    )
    # The extraction model is called through the gateway's upstream client, as in `serve`.
    client = upstream_client(HTTPConfig(transport=args.transport))
    engine = await MemoryEngine.open(config, data, http_client=client)
    await engine.start()
    try:
        # Pay the embedder's and the table's lazy loading before the clock starts.
        await engine.store.search(Scope(user_id="warm-up"), "warm-up")
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/stats/reset", method="POST")
        ).close()
        items = [exchange(i, args.users) for i in range(args.exchanges)]
        queue = iter(items)

        async def produce() -> None:
            for e in queue:
                await engine.record_exchange(e)

        t0 = time.perf_counter()
        await asyncio.gather(*(produce() for _ in range(args.producers)))
        enqueued = time.perf_counter() - t0
        if not await engine.drain(timeout=args.timeout):
            raise SystemExit(f"the spool did not drain within {args.timeout}s")
        drained = time.perf_counter() - t0
        s = await engine.stats()
        counts = await asyncio.to_thread(stats, port)
    finally:
        await engine.close()
        await client.aclose()
    n = args.exchanges
    return {
        "exchanges": n,
        "users": args.users,
        "workers": args.workers,
        "producers": args.producers,
        "enqueue_per_s": n / enqueued,
        "end_to_end_per_s": n / drained,
        "seconds": drained,
        "llm_calls_per_exchange": counts["extraction"] / n,
        "prompt_tokens_per_exchange_est": counts["extraction_prompt_tokens_est"] / n,
        "prompt_chars_per_exchange": counts["extraction_prompt_chars"] / n,
        "memories_stored": s.memories,
        "jobs_failed": s.spool.failed,
        "jobs_done": s.spool.done,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=1000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--workers", type=int, default=SpoolConfig().concurrency)
    parser.add_argument("--producers", type=int, default=16, help="concurrent record_exchange")
    parser.add_argument("--no-add", action="store_true", help="the LLM answers no operation")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--transport", choices=["aiohttp", "httpx"], default="aiohttp", help="http.transport"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-write-"))
    upstream, port = start_fake_upstream(workdir, *([] if args.no_add else ["--add"]))
    try:
        result = asyncio.run(measure(args, port, workdir / "data"))
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
