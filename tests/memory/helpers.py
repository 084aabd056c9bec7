"""Test doubles and builders shared by the memory engine tests: a fast
deterministic embedder, stored memories, exchanges and long non-ASCII text."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from memory.embedding import normalize
from memory.models import Exchange, Memory, Scope


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
