"""Shared fixtures of the memory engine tests: a store in a temporary
directory, a fast deterministic embedder, and the real local one."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from memory.config import MemoryConfig
from memory.embedding import LocalEmbedder, normalize
from memory.models import Exchange, Memory, Scope
from memory.store import MemoryStore


class HashEmbedder:
    """Bag of hashed words and character bigrams: texts sharing words are
    close, unrelated texts are nearly orthogonal. Deterministic and instant."""

    def __init__(self, dimensions: int = 256, name: str = "test-hash") -> None:
        self.name = name
        self.dimensions = dimensions
        self.calls: list[list[str]] = []
        self.closed = False

    def _features(self, text: str) -> list[str]:
        text = text.lower()
        words = re.findall(r"\w+", text)
        chars = [c for c in text if not c.isspace()]
        return words + ["".join(p) for p in itertools.pairwise(chars)]

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text) or ["<empty>"]:
                h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest())
                out[row, h % self.dimensions] += 1.0 if (h >> 32) & 1 else -1.0
        return normalize(out)

    async def close(self) -> None:
        self.closed = True


def chinese(n: int, seed: int = 1) -> str:
    """`n` random common CJK characters (repeatable by `seed`): text that costs
    small models ~1.9 tokens a character."""
    rng = random.Random(seed)
    return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(n))


def stored(memory_id: str, text: str, at: datetime = datetime(2026, 3, 13, tzinfo=UTC)) -> Memory:
    """A stored memory of user "u", as the extractor is shown it."""
    return Memory(
        id=memory_id,
        user_id="u",
        agent_id=None,
        session_id=None,
        text=text,
        metadata={},
        created_at=at,
        updated_at=at,
    )


def exchange(user: str, text: str = "hello", agent: str | None = None) -> Exchange:
    """A one-turn exchange of `user`, as the spool stores it."""
    return Exchange(
        scope=Scope(user_id=user, agent_id=agent),
        messages=[{"role": "user", "content": text}],
        reply="ok",
        at=datetime(2026, 3, 13, tzinfo=UTC),
    )


@pytest.fixture
def embedder() -> HashEmbedder:
    return HashEmbedder()


@pytest.fixture
def memory_config() -> MemoryConfig:
    return MemoryConfig()


@pytest.fixture
async def store(
    tmp_path: Path, embedder: HashEmbedder, memory_config: MemoryConfig
) -> AsyncIterator[MemoryStore]:
    store = await MemoryStore.open(tmp_path / "memory", embedder, memory_config)
    yield store
    await store.close()


@pytest.fixture(scope="session")
def local_embedder() -> LocalEmbedder:
    """The real default embedder, loaded once for the whole run (~2 s)."""
    return LocalEmbedder()
