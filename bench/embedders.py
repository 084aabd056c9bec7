"""Retrieval quality, latency and memory of the local embedder and search modes.

    /work/venv/bin/python bench/embedders.py [--scale 10000]

Reads ../shared/data/{locomo-dev,multilingual-dev}.json (skips with a message
when absent). LoCoMo protocol (../shared/README.md): each speaker's
observations become that speaker's memories (stored as given); each QA of
categories 1-4 is asked as the speaker it names (both speakers when it names
none or both, results merged by score); a hit is a retrieved memory whose
dia_id is in the evidence. The ceiling counts questions whose evidence has any
observation at all. Baseline: plain BM25 over whitespace words.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from memory.config import MemoryConfig, SearchConfig
from memory.embedding import LocalEmbedder
from memory.filters import scope_filter
from memory.models import Scope
from memory.store import MemoryStore

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KS = (5, 8, 10)

MODES: dict[str, SearchConfig] = {
    "USE vector only": SearchConfig(hybrid=False, min_score=-1.0),
    "USE + FTS boost, no cut-off": SearchConfig(fusion="boost", min_score=-1.0),
    "USE + FTS RRF": SearchConfig(fusion="rrf", min_score=-1.0),
    "USE + FTS boost, min_score 0.2": SearchConfig(fusion="boost", min_score=0.2),
    "USE + FTS boost, min_score 0.15 (default)": SearchConfig(fusion="boost"),
}


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BM25:
    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.toks = [self.tokenize(d) for d in docs]
        self.avg = sum(map(len, self.toks)) / max(1, len(self.toks))
        df = Counter(t for doc in self.toks for t in set(doc))
        n = len(docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.tf = [Counter(doc) for doc in self.toks]
        self.k1, self.b = k1, b

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def top(self, query: str, k: int) -> list[int]:
        q = self.tokenize(query)
        scores = []
        for i, tf in enumerate(self.tf):
            norm = self.k1 * (1 - self.b + self.b * len(self.toks[i]) / self.avg)
            s = sum(
                self.idf.get(t, 0) * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in q if t in tf
            )
            scores.append((s, i))
        return [i for s, i in sorted(scores, reverse=True)[:k] if s > 0]


def locomo_tasks() -> tuple[dict[str, list[tuple[str, str]]], list[dict[str, Any]]]:
    """Memories per user ((text, dia_id)) and questions (speakers, evidence)."""
    samples = json.loads((SHARED / "locomo-dev.json").read_text())
    memories: dict[str, list[tuple[str, str]]] = {}
    questions = []
    for sample in samples:
        conv = sample["conversation"]
        speakers = [conv["speaker_a"], conv["speaker_b"]]
        for session in sample["observation"].values():
            for speaker, facts in session.items():
                user = f"{sample['sample_id']}:{speaker}"
                for fact, dia in facts:
                    for d in [dia] if isinstance(dia, str) else dia:
                        memories.setdefault(user, []).append((fact, d))
        for qa in sample["qa"]:
            if qa.get("category") not in (1, 2, 3, 4):
                continue
            named = [s for s in speakers if s.lower() in qa["question"].lower()]
            asked = named if len(named) == 1 else speakers
            questions.append(
                {
                    "q": qa["question"],
                    "users": [f"{sample['sample_id']}:{s}" for s in asked],
                    "evidence": set(qa["evidence"]),
                }
            )
    return memories, questions


async def eval_locomo(embedder: LocalEmbedder) -> list[str]:
    memories, questions = locomo_tasks()
    dia_of: dict[tuple[str, str], set[str]] = {}
    for user, facts in memories.items():
        for text, dia in facts:
            dia_of.setdefault((user, text), set()).add(dia)
    covered = [
        q
        for q in questions
        if any(dia in q["evidence"] for u in q["users"] for _, dia in memories.get(u, []))
    ]
    lines = [
        f"LoCoMo dev: {sum(map(len, memories.values()))} observations, {len(questions)} questions "
        f"(cat. 1-4); ceiling {len(covered)}/{len(questions)} = "
        f"{len(covered) / len(questions):.3f}",
        "",
        "| mode | "
        + " | ".join(f"recall@{k}" for k in KS)
        + " | "
        + " | ".join(f"recall@{k} / ceiling" for k in KS)
        + " |",
        "|---|" + "---|" * (2 * len(KS)),
    ]

    def row(name: str, hits: dict[int, int]) -> str:
        rec = [hits[k] / len(questions) for k in KS]
        rel = [hits[k] / len(covered) for k in KS]
        return f"| {name} | " + " | ".join(f"{r:.3f}" for r in rec + rel) + " |"

    bm25 = {u: BM25([t for t, _ in facts]) for u, facts in memories.items()}
    hits = dict.fromkeys(KS, 0)
    for q in questions:
        ranked: list[tuple[float, str, str]] = []
        for u in q["users"]:
            idx = bm25[u].top(q["q"], max(KS))
            ranked += [(r, u, memories[u][i][0]) for r, i in enumerate(idx)]
        ranked.sort()
        for k in KS:
            if any(dia_of[(u, t)] & q["evidence"] for _, u, t in ranked[:k]):
                hits[k] += 1
    lines.append(row("BM25 baseline (words)", hits))

    with tempfile.TemporaryDirectory() as tmp:
        store = await MemoryStore.open(Path(tmp), embedder, MemoryConfig())
        for user, facts in memories.items():
            for text in dict.fromkeys(t for t, _ in facts):
                await store.add(Scope(user_id=user), text)
        await store.optimize()
        for name, search in [*MODES.items(), ("FTS only (n-gram 1-3)", None)]:
            store._config = MemoryConfig(search=search or SearchConfig())
            hits = dict.fromkeys(KS, 0)
            for q in questions:
                found: list[tuple[float, str, str]] = []
                for u in q["users"]:
                    if search is None:
                        rows = await store._text_candidates(
                            q["q"], scope_filter(Scope(user_id=u), active_only=True), max(KS)
                        )
                        found += [(-r["_score"], u, r["text"]) for r in rows]
                    else:
                        hs = await store.search(Scope(user_id=u), q["q"], limit=max(KS))
                        found += [(-h.score, u, h.memory.text) for h in hs]
                found.sort()
                for k in KS:
                    if any(dia_of[(u, t)] & q["evidence"] for _, u, t in found[:k]):
                        hits[k] += 1
            lines.append(row(name, hits))
        await store.close()
    return lines


async def eval_multilingual(embedder: LocalEmbedder) -> list[str]:
    data = json.loads((SHARED / "multilingual-dev.json").read_text())
    lines = ["| mode | hit@1 | hit@3 | cross-language hit@1 |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        store = await MemoryStore.open(Path(tmp), embedder, MemoryConfig())
        ids: dict[str, list[str]] = {}
        for user, spec in data["users"].items():
            ids[user] = [(await store.add(Scope(user_id=user), f)).id for f in spec["facts"]]
        for name, search in MODES.items():
            store._config = MemoryConfig(search=search)
            h1 = h3 = x1 = xn = n = 0
            for user, spec in data["users"].items():
                zh_facts = bool(re.search(r"[\u4e00-\u9fff]", spec["facts"][0]))
                for q in spec["queries"]:
                    hs = await store.search(Scope(user_id=user), q["q"], limit=3)
                    got = [h.memory.id for h in hs]
                    want = ids[user][q["answer"]]
                    n += 1
                    h1 += got[:1] == [want]
                    h3 += want in got
                    if bool(re.search(r"[\u4e00-\u9fff]", q["q"])) != zh_facts:
                        xn += 1
                        x1 += got[:1] == [want]
            lines.append(f"| {name} | {h1 / n:.3f} | {h3 / n:.3f} | {x1}/{xn} |")
        await store.close()
    return lines


async def latency(embedder: LocalEmbedder, scale: int) -> list[str]:
    base = [t for facts in locomo_tasks()[0].values() for t, _ in facts]
    texts = [f"{base[i % len(base)]} (note {i})" for i in range(scale)]
    queries = [q["q"] for q in locomo_tasks()[1]][:200]
    lines = []
    t0 = time.perf_counter()
    vectors = await embedder.embed(texts[:512])
    rate = 512 / (time.perf_counter() - t0)
    lines.append(f"- bulk embedding: {rate:.0f} texts/s (batches of 32, one thread)")
    times = []
    for q in queries:
        t = time.perf_counter()
        await embedder.embed([q + " ?"])  # defeat the cache
        times.append((time.perf_counter() - t) * 1000)
    lines.append(
        f"- query embedding: p50 {statistics.median(times):.2f} ms, "
        f"p95 {statistics.quantiles(times, n=20)[18]:.2f} ms"
    )
    del vectors
    with tempfile.TemporaryDirectory() as tmp:
        store = await MemoryStore.open(Path(tmp), embedder, MemoryConfig())
        scope = Scope(user_id="big")
        from datetime import UTC, datetime

        from memory.models import Operation

        for i in range(0, scale, 1000):
            ops = [Operation(op="ADD", text=t) for t in texts[i : i + 1000]]
            await store.apply(scope, ops, source=f"bulk-{i}", actor="import", at=datetime.now(UTC))
        await store.add(Scope(user_id="other"), "someone else")
        await store.optimize()
        for name, search in list(MODES.items())[:2]:
            store._config = MemoryConfig(search=search)
            for q in queries[:20]:
                await store.search(scope, q)
            times = []
            for q in queries:
                t = time.perf_counter()
                await store.search(scope, q + " !")
                times.append((time.perf_counter() - t) * 1000)
            lines.append(
                f"- search, {name}, {scale} memories of one user (query embedding included): "
                f"p50 {statistics.median(times):.1f} ms, "
                f"p95 {statistics.quantiles(times, n=20)[18]:.1f} ms"
            )
        await store.close()
    return lines


async def main() -> int:
    parser = argparse.ArgumentParser()
    # 0 skips the latency part (quality only).
    parser.add_argument("--scale", type=int, default=10_000)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipping: {SHARED} not found (the benchmark data lives beside the checkout)")
        return 0
    rss0 = rss_mib()
    embedder = LocalEmbedder()
    t = time.perf_counter()
    await embedder.warm()
    print(
        f"- model load + warm-up: {time.perf_counter() - t:.2f} s; "
        f"max RSS {rss0:.0f} MiB before, {rss_mib():.0f} MiB after"
    )
    print("\n".join(await eval_locomo(embedder)))
    print()
    print("\n".join(await eval_multilingual(embedder)))
    print()
    if args.scale:
        print("\n".join(await latency(embedder, args.scale)))
    print(f"- max RSS at the end: {rss_mib():.0f} MiB")
    await embedder.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
