"""Shared fixtures of the memory engine tests: a store in a temporary
directory, a fast deterministic embedder, the real local one, one set of
memories searched through the scope cache and straight through LanceDB, and
extractors talking to scripted model servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from memory.config import LLMConfig, MemoryConfig
from memory.embedding import LocalEmbedder
from memory.extraction import CallGate, Extractor
from memory.store import MemoryStore
from tests.memory.helpers import (
    ALICE,
    BOB,
    FACTS,
    HashEmbedder,
    ModelServer,
    cached,
    uncached,
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


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[MemoryStore, MemoryStore]]:
    """The same data searched through the cache and straight through LanceDB."""
    fast = await MemoryStore.open(tmp_path / "m", HashEmbedder(), cached())
    for text in FACTS:
        await fast.add(ALICE, text)
    await fast.add(BOB, "Plays the violin in Shanghai")
    slow = await MemoryStore.open(tmp_path / "m", HashEmbedder(), uncached())
    yield fast, slow
    await slow.close()
    await fast.close()


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Extractor]]:
    """Builds an `Extractor` calling a scripted model server; closes their clients."""
    clients: list[httpx.AsyncClient] = []

    def make(
        server: ModelServer,
        *,
        api_key: str | None = "sk-config-key",
        state_path: Path | None = None,
        call_gate: CallGate | None = None,
        **llm_config: Any,
    ) -> Extractor:
        client = server.client()
        clients.append(client)
        config = MemoryConfig(llm=LLMConfig(api_key=api_key, **llm_config))
        return Extractor(
            config,
            default_base_url="http://upstream.test/v1",
            http_client=client,
            state_path=state_path,
            call_gate=call_gate,
        )

    yield make
    for c in clients:
        await c.aclose()
