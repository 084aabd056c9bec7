"""Test doubles and builders shared by the memory engine tests: a fast
deterministic embedder, stored memories, exchanges, long non-ASCII text, the
scopes, facts, rows and configurations of the search cache tests, and the
upstream errors and refusals of the extraction tests."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
import numpy as np
from scripted_llm import Call, Reply, ops

from memory.config import MemoryConfig, SearchConfig
from memory.embedding import normalize
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


# ---------- the search cache (tests/memory/test_search_*.py) ----------

ALICE = Scope(user_id="alice")
ALICE_BOT = Scope(user_id="alice", agent_id="bot")
BOB = Scope(user_id="bob")

FACTS = [
    "Enjoys hiking in the mountains",
    "Works as a nurse in Lyon",
    "Allergic to peanuts",
    "Plays the violin",
    "我住在上海",
    "喜欢喝咖啡",
    "每天早上跑步",
    "Café au lait every morning",
    "Has a golden retriever named Max",
    "Birthday is in October",
]
QUERIES = ["violin", "上海", "咖啡", "cafe", "Where does she work?", "Max the dog", "peanut"]


def uncached() -> MemoryConfig:
    """A store that searches straight through LanceDB, with no cut-off."""
    return MemoryConfig(search=SearchConfig(cache_bytes=0, min_score=-1.0))


def cached() -> MemoryConfig:
    """A store that searches through its scope cache, with no cut-off."""
    return MemoryConfig(search=SearchConfig(min_score=-1.0))


async def texts(store: MemoryStore, scope: Scope, query: str) -> list[str]:
    """The texts of the scope's top five hits for `query`."""
    return [h.memory.text for h in await store.search(scope, query, limit=5)]


def row(memory_id: str, text: str, user: str = "u", agent: str | None = None) -> dict:
    """An active memory row as a `ScopeIndex` holds it."""
    return {
        "id": memory_id,
        "user_id": user,
        "agent_id": agent,
        "text": text,
        "superseded_by": None,
    }


def unit(seed: int, dims: int = 8) -> np.ndarray:
    """A random unit vector, repeatable by `seed`."""
    v = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


# ---------- extraction (tests/memory/test_extraction*.py) ----------

EXTRACTED_AT = datetime(2026, 3, 13, 9, 30, tzinfo=UTC)  # a Friday

EXISTING = [
    stored("id-berlin", "User lives in Berlin", EXTRACTED_AT),
    stored("id-tea", "User likes green tea", EXTRACTED_AT),
]


def user_turn(text: str, reply: str | None = "Noted!") -> Exchange:
    """An exchange of user "u" on `EXTRACTED_AT`: one user turn and the reply."""
    return Exchange(
        scope=Scope(user_id="u"),
        messages=[{"role": "user", "content": text}],
        reply=reply,
        at=EXTRACTED_AT,
    )


class ModelServer(Protocol):
    """A scripted model server an `Extractor` can be given a client of."""

    def client(self) -> httpx.AsyncClient: ...


def error(status: int, message: str, code: str | None = None, **extra: Any) -> httpx.Response:
    """An upstream error in OpenAI's shape."""
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return httpx.Response(status, json={"error": body | extra})


def llama_refuses_json_schema() -> httpx.Response:
    """llama-cpp-python's answer to `response_format: json_schema`: a 500
    carrying pydantic's validation error."""
    return error(
        500,
        "1 validation error for CreateChatCompletionRequest\nresponse_format\n"
        "  Input tag 'json_schema' found using 'type' does not match any of the expected"
        " tags: 'text', 'json_object' [type=union_tag_invalid]",
        type="internal_server_error",
    )


def refusing(
    *modes: str | None,
    answer: Reply = None,
    refusal: Callable[[], httpx.Response] = llama_refuses_json_schema,
) -> Callable[[Call], Reply]:
    """A responder that refuses the given response_format types (None: plain text)."""

    def respond(call: Call) -> Reply:
        if call.response_format in modes:
            return refusal()
        return answer if answer is not None else ops()

    return respond
