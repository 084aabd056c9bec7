"""Shared fixtures of the memory engine tests: a store in a temporary
directory, a fast deterministic embedder, and the real local one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from memory.config import MemoryConfig
from memory.embedding import LocalEmbedder
from memory.store import MemoryStore
from tests.memory.helpers import HashEmbedder


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
