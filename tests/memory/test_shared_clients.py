"""The extraction and embedding clients are shared by every user (and, for
extraction, by every user's key): they must never carry one user's cookies to
another. The proxy's client is checked in tests/test_proxy_chat.py."""

from __future__ import annotations

from datetime import UTC, datetime

from memory.config import LLMConfig, MemoryConfig
from memory.embedding import OpenAIEmbedder
from memory.extraction import Extractor
from memory.models import Exchange, Scope
from tests.extraction import llm_answer
from tests.upstream import JSONReply, Recorded, ScriptedUpstream, default_embeddings


def _with_cookie(reply: JSONReply) -> JSONReply:
    reply.headers["set-cookie"] = "lb=node-for-the-last-caller; Path=/"
    return reply


async def test_the_extraction_client_keeps_no_cookie_between_users(upstream: ScriptedUpstream):
    upstream.script(
        lambda r: _with_cookie(llm_answer([])) if r.path.endswith("/chat/completions") else None
    )
    extractor = Extractor(MemoryConfig(llm=LLMConfig(api_key=None)), default_base_url=upstream.url)
    try:
        for user, key in (("ann", "sk-ann-key"), ("ben", "sk-ben-key")):
            exchange = Exchange(
                scope=Scope(user_id=user),
                messages=[{"role": "user", "content": "hello"}],
                reply="hi",
                at=datetime.now(UTC),
            )
            assert await extractor.decide(exchange, [], api_key=key) == []
    finally:
        await extractor.close()
    last = upstream.last()
    assert last.headers["authorization"] == "Bearer sk-ben-key"
    assert "cookie" not in last.headers


async def test_the_embedding_client_keeps_no_cookies(upstream: ScriptedUpstream):
    def embeddings(request: Recorded) -> JSONReply | None:
        if not request.path.endswith("/embeddings"):
            return None
        reply = default_embeddings(request)
        assert isinstance(reply, JSONReply)
        return _with_cookie(reply)

    upstream.script(embeddings)
    embedder = OpenAIEmbedder(base_url=upstream.url, model="test-embed")
    try:
        await embedder.embed(["first text"])
        await embedder.embed(["second text"])
    finally:
        await embedder.close()
    assert "cookie" not in upstream.last().headers
