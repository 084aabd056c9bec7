"""Search latency as the memories table grows (issue 5, "scale of retrieval").

    /work/venv/bin/python bench/search_scale.py [--sizes 1000,10000,100000,1000000]
        [--user-rows 10000] [--queries 300] [--real] [--vector-index]

For each size: a fresh table of that many rows over many users (the queried
user holds `--user-rows` of them, the others 100 each), random unit vectors
and random word texts, written in batches of 50k rows and indexed the way the
store does it (FTS n-gram, BTree on user_id/id; IVF-PQ only with
`--vector-index`). Then, on a freshly opened store: search p50/p99 through
the scope cache (cold = first search of the scope, loading it; warm = the
rest) and straight through LanceDB (cache disabled), directory size and RSS.
Query vectors are random, so no embedding is included there.

`--real` adds the end-to-end case: `--user-rows` facts of one user embedded
with the local USE embedder, searched with new queries (embedding included)
and repeated ones (embedding cached).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from memory.config import MaintenanceConfig, MemoryConfig, SearchConfig
from memory.models import Scope
from memory.store import MemoryStore

DIMS = 512
BATCH = 50_000
OTHER_ROWS = 100
WORDS = [
    *(f"w{i}" for i in range(3000)),
    *"咖啡 上海 北京 跑步 游泳 日语 猫 狗 花生 音乐 电影 工程师 医生 女儿 儿子".split(),  # noqa: SIM905
]


class RandomEmbedder:
    """Random unit vectors: the scale runs measure the store, not a model."""

    name = "bench-random"
    dimensions = DIMS

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    async def embed(self, texts: Any) -> np.ndarray:
        v = self._rng.standard_normal((len(texts), DIMS)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    async def close(self) -> None:
        pass


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def texts(rng: np.random.Generator, n: int) -> list[str]:
    picks = rng.integers(0, len(WORDS), size=(n, 8))
    return [" ".join(WORDS[j] for j in row) for row in picks]


def batch(rng: np.random.Generator, users: list[str], schema: pa.Schema) -> pa.Table:
    n = len(users)
    v = rng.standard_normal((n, DIMS)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    now = datetime.now(UTC)
    ts = pa.array([now] * n, type=pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            "id": [str(uuid.uuid4()) for _ in range(n)],
            "user_id": users,
            "agent_id": pa.nulls(n, pa.string()),
            "session_id": pa.nulls(n, pa.string()),
            "text": texts(rng, n),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIMS),
            "hash": [uuid.uuid4().hex for _ in range(n)],
            "metadata": ["{}"] * n,
            "created_at": ts,
            "updated_at": ts,
            "source": pa.nulls(n, pa.string()),
            "superseded_by": pa.nulls(n, pa.string()),
            "superseded_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        },
        schema=schema,
    )


def config(cache: bool, vector_index: bool) -> MemoryConfig:
    return MemoryConfig(
        search=SearchConfig(min_score=-1.0, cache_bytes=(512 * 2**20) if cache else 0),
        maintenance=MaintenanceConfig(
            vector_index_min_rows=100_000 if vector_index else 10**12,
        ),
    )


async def timed(fn: Any) -> float:
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1e3


async def build(
    root: Path,
    rng: np.random.Generator,
    size: int,
    user_rows: int,
    *,
    vector_index: bool,
    storage: Any = None,
) -> tuple[float, float]:
    """The table: `size` rows, `user_rows` of them the target user's, the
    others `OTHER_ROWS` per user; in `root`, or at `storage.uri` (a
    `StorageConfig`: bench/replicas.py). Seconds writing, then indexing."""
    mine = min(user_rows, size)
    others = [f"user-{i // OTHER_ROWS}" for i in range(size - mine)]
    owners = ["target"] * mine + others
    store = await MemoryStore.open(
        root, RandomEmbedder(), config(True, vector_index), storage=storage
    )
    start = time.perf_counter()
    for i in range(0, size, BATCH):
        await store._memories.add(batch(rng, owners[i : i + BATCH], store._schema))
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    await store.optimize()
    index_s = time.perf_counter() - start
    await store.close()
    return write_s, index_s


async def scale(size: int, user_rows: int, queries: int, vector_index: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="search-scale-"))
    rng = np.random.default_rng(size)
    try:
        write_s, index_s = await build(root, rng, size, user_rows, vector_index=vector_index)

        scope = Scope(user_id="target")
        query_texts = texts(rng, queries)
        out: dict[str, Any] = {"size": size, "write_s": write_s, "index_s": index_s}
        for mode, cached in (("cache", True), ("lancedb", False)):
            store = await MemoryStore.open(root, RandomEmbedder(1), config(cached, vector_index))
            cold: list[float] = []
            n = queries if cached else max(20, queries // 10)
            if cached:
                for q in query_texts[:5]:
                    assert store._cache is not None
                    store._cache.clear()
                    cold.append(await timed(lambda q=q, s=store: s.search(scope, q)))
            warm = [await timed(lambda q=q, s=store: s.search(scope, q)) for q in query_texts[:n]]
            out[mode] = {
                "cold_p50": statistics.median(cold) if cold else None,
                "p50": statistics.median(warm),
                "p99": pct(warm, 0.99),
            }
            out[f"rss_{mode}"] = rss_mib()
            if cached:
                assert store._cache is not None
                out["cache_mib"] = store._cache.nbytes / 2**20
            await store.close()
        out["dir_mib"] = dir_mib(root)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


FACT_TEMPLATES = [
    "My {r} is called {n}",
    "I visited {c} in {y}",
    "I work as a {j} in {c}",
    "我在{c}住了{k}年",
    "我的{r}喜欢{h}",
    "I have been learning {h} since {y}",
]
FILL = {
    "r": ["daughter", "son", "dog", "cat", "friend", "boss", "女儿", "儿子"],
    "n": ["Emma", "Max", "Lina", "Tom", "小明", "Ava", "Noah"],
    "c": ["Paris", "Shanghai", "Berlin", "上海", "北京", "Tokyo", "Lima"],
    "y": [str(y) for y in range(1990, 2026)],
    "j": ["nurse", "teacher", "software engineer", "chef", "pilot"],
    "k": [str(k) for k in range(1, 30)],
    "h": ["swimming", "guitar", "Japanese", "跑步", "游泳", "chess", "painting"],
}
QUESTIONS = [
    "Where do I live?",
    "What is my dog called?",
    "我的女儿叫什么名字？",  # noqa: RUF001
    "What do I do for work?",
    "我喜欢什么运动",
    "When did I visit Tokyo?",
    "What instrument am I learning?",
    "我在哪里住过",
]


async def real(user_rows: int, queries: int) -> dict[str, Any]:
    from memory.embedding import LocalEmbedder

    rng = np.random.default_rng(7)
    facts = sorted(
        {
            FACT_TEMPLATES[rng.integers(len(FACT_TEMPLATES))].format(
                **{k: v[rng.integers(len(v))] for k, v in FILL.items()}
            )
            + f" (#{i})"
            for i in range(user_rows)
        }
    )
    root = Path(tempfile.mkdtemp(prefix="search-real-"))
    embedder = LocalEmbedder()
    try:
        store = await MemoryStore.open(root, embedder, MemoryConfig())
        start = time.perf_counter()
        vectors = await embedder.embed(facts)
        embed_s = time.perf_counter() - start
        now = datetime.now(UTC)
        rows = [
            {
                "id": str(uuid.uuid4()),
                "user_id": "target",
                "agent_id": None,
                "session_id": None,
                "text": f,
                "vector": v,
                "hash": uuid.uuid4().hex,
                "metadata": "{}",
                "created_at": now,
                "updated_at": now,
                "source": None,
                "superseded_by": None,
                "superseded_at": None,
            }
            for f, v in zip(facts, vectors, strict=True)
        ]
        await store._memories.add(pa.Table.from_pylist(rows, schema=store._schema))
        await store.optimize()
        scope = Scope(user_id="target")
        await store.search(scope, "warm up")  # loads the scope
        fresh = [
            await timed(lambda i=i: store.search(scope, f"{QUESTIONS[i % len(QUESTIONS)]} {i}"))
            for i in range(queries)
        ]
        repeated = [
            await timed(lambda i=i: store.search(scope, QUESTIONS[i % len(QUESTIONS)]))
            for i in range(queries)
        ]
        hits = await store.search(scope, "Where do I live?", limit=3)
        await store.close()
        return {
            "rows": len(facts),
            "embed_s": embed_s,
            "new_p50": statistics.median(fresh),
            "new_p99": pct(fresh, 0.99),
            "repeat_p50": statistics.median(repeated),
            "repeat_p99": pct(repeated, 0.99),
            "rss": rss_mib(),
            "example": [h.memory.text for h in hits],
        }
    finally:
        await embedder.close()
        shutil.rmtree(root, ignore_errors=True)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--user-rows", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--vector-index", action="store_true")
    args = parser.parse_args()
    print(
        f"# {datetime.now(UTC):%Y-%m-%d} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(
        "| rows | user rows | write s | index s | dir MiB | cache cold p50 | cache p50 | "
        "cache p99 | LanceDB p50 | LanceDB p99 | cache MiB | RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",") if s):
        r = await scale(size, args.user_rows, args.queries, args.vector_index)
        c, lance = r["cache"], r["lancedb"]
        print(
            f"| {size:,} | {min(size, args.user_rows):,} | {r['write_s']:.1f} | "
            f"{r['index_s']:.1f} | {r['dir_mib']:.0f} | {fmt(c['cold_p50'])} | "
            f"{fmt(c['p50'])} | {fmt(c['p99'])} | {fmt(lance['p50'])} | {fmt(lance['p99'])} | "
            f"{r['cache_mib']:.0f} | {r['rss_cache']:.0f} |",
            flush=True,
        )
    if args.real:
        r = await real(args.user_rows, args.queries)
        print(
            f"\nUSE embedder, {r['rows']:,} memories of one user (bulk embedding "
            f"{r['embed_s']:.0f} s): new queries p50 {r['new_p50']:.1f} ms / p99 "
            f"{r['new_p99']:.1f} ms; repeated (embedding cached) p50 {r['repeat_p50']:.1f} ms "
            f"/ p99 {r['repeat_p99']:.1f} ms; RSS {r['rss']:.0f} MiB; "
            f"'Where do I live?' -> {r['example']}"
        )
    print(f"\nmax RSS {max_rss_mib():.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
