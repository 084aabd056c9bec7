"""How an extraction call fails (memory/extraction_errors.py): each upstream
refusal gets its category, whatever server worded it; a refusal of our
`response_format` falls through to the next mode, the rest are final."""

from __future__ import annotations

import httpx
import pytest
from scripted_llm import ScriptedLLM

from memory.extraction_errors import FOR_GOOD_CATEGORIES, ExtractionError, ExtractionUnavailable
from tests.memory.helpers import error, refusing
from tests.memory.helpers import user_turn as exchange


async def test_server_errors_are_outages_for_the_spool_to_wait_out(make):
    llm = ScriptedLLM([httpx.Response(503, json={"error": {"message": "overloaded"}})])
    with pytest.raises(ExtractionUnavailable, match="503") as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "unavailable"
    assert len(llm.calls) == 1  # no SDK retries: the spool owns retrying


async def test_a_5xx_whose_plain_text_body_names_the_format_is_a_refusal_too(make):
    def grammar_crash() -> httpx.Response:
        return httpx.Response(500, text="Internal error: failed to parse grammar from schema")

    llm = ScriptedLLM(responder=refusing("json_schema", refusal=grammar_crash))
    assert await make(llm).decide(exchange("a"), [], api_key=None) == []
    assert [c.response_format for c in llm.calls] == ["json_schema", "json_object"]


async def test_a_422_that_names_nothing_is_still_taken_as_a_refusal(make):
    llm = ScriptedLLM(
        responder=refusing("json_schema", refusal=lambda: httpx.Response(422, json={"detail": []}))
    )
    assert await make(llm).decide(exchange("a"), [], api_key=None) == []
    assert [c.response_format for c in llm.calls] == ["json_schema", "json_object"]


@pytest.mark.parametrize(
    "reply",
    [
        # llama-cpp-python
        error(
            400,
            "This model's maximum context length is 4096 tokens. However, you requested"
            " 13060 tokens (12676 in the messages, 384 in the completion).",
            code="context_length_exceeded",
        ),
        error(400, "the request exceeds the available context size (n_ctx: 4096)"),
        error(400, "too many tokens in the prompt"),
        error(400, "prompt is too long: 210000 tokens > 200000 maximum"),
        # Worded as a 500 that also names the schema: still not a format problem.
        error(500, "context length exceeded while applying the json_schema grammar"),
    ],
)
async def test_a_prompt_too_long_is_final_and_never_tried_in_other_modes(make, reply):
    llm = ScriptedLLM([reply])
    with pytest.raises(ExtractionError) as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "context_length"
    assert "memory.llm.context_tokens" in caught.value.reason
    assert len(llm.calls) == 1


@pytest.mark.parametrize(
    "reply",
    [
        # OpenAI
        error(404, "The model `gpt-4o-mini` does not exist", code="model_not_found"),
        # Ollama
        httpx.Response(404, json={"error": 'model "gpt-4o-mini" not found, try pulling it first'}),
        # vLLM
        error(404, "The model `gpt-4o-mini` does not exist.", type="NotFoundError"),
        # LiteLLM
        error(400, "Invalid model name passed in model=gpt-4o-mini"),
    ],
)
async def test_a_missing_model_is_final_and_names_the_settings_to_change(make, reply):
    llm = ScriptedLLM([reply])
    with pytest.raises(ExtractionError) as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "model_not_found"
    assert "'gpt-4o-mini' not found at http://upstream.test/v1/chat/completions" in str(
        caught.value
    )
    for setting in ("memory.llm.model", "--extraction-model", "MEMORY_LLM_MODEL"):
        assert setting in str(caught.value)
    assert len(llm.calls) == 1


async def test_a_404_that_names_no_model_suggests_the_missing_v1(make):
    llm = ScriptedLLM([httpx.Response(404, text="404 page not found")])
    with pytest.raises(ExtractionError) as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == "endpoint_not_found"
    assert "http://upstream.test/v1/chat/completions" in str(caught.value)
    assert "/v1" in str(caught.value).split("404")[1]
    assert len(llm.calls) == 1


@pytest.mark.parametrize(
    ("status", "category"), [(401, "auth"), (403, "auth"), (429, "unavailable")]
)
async def test_a_refused_key_or_a_rate_limit_never_falls_through_the_modes(make, status, category):
    llm = ScriptedLLM([error(status, "response_format is fine, your key is not")])
    with pytest.raises(ExtractionError) as caught:
        await make(llm).decide(exchange("a"), [], api_key=None)
    assert caught.value.category == category
    assert len(llm.calls) == 1


async def test_a_rate_limit_counting_tokens_is_an_outage_not_a_long_prompt(make):
    llm = ScriptedLLM([error(429, "Too many tokens per minute, please slow down")])
    with pytest.raises(ExtractionUnavailable):
        await make(llm).decide(exchange("a"), [], api_key=None)


def test_the_categories_that_no_retry_can_fix():
    assert set(FOR_GOOD_CATEGORIES) == {
        "context_length",
        "model_not_found",
        "endpoint_not_found",
        "auth",
    }
    assert ExtractionError("x").category == "error"
    assert ExtractionUnavailable("x").category == "unavailable"
