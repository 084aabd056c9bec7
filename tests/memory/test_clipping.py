# ruff: noqa: RUF001 - full-width CJK punctuation is meant literally here.
"""Bounding text by size: token estimates, clipping, the memory-search query."""

from datetime import UTC, datetime

from memory.clipping import (
    OMISSION_MARKER,
    SEARCH_QUERY_HEAD_CHARS,
    SEARCH_QUERY_SEPARATOR,
    SEARCH_QUERY_TAIL_CHARS,
    clip_chars,
    clip_exchange_texts,
    clip_middle,
    estimate_tokens,
    search_query,
)
from memory.models import Exchange, Scope
from tests.memory.helpers import chinese

AT = datetime(2026, 3, 13, 9, 30, tzinfo=UTC)


def left_out(clipped: str) -> int:
    """The count the omission marker reports."""
    return int(clipped.split("[... ", 1)[1].split(" characters left out", 1)[0])


# --- estimate_tokens ---------------------------------------------------------


def test_estimate_is_at_least_what_a_small_model_spends_on_chinese():
    # SmolLM2's tokenizer: 7,000 Chinese characters are 13,030 tokens.
    assert estimate_tokens(chinese(7000)) >= 13030


def test_estimate_is_at_least_what_a_small_model_spends_on_english():
    text = "I moved to Berlin last spring and I work as a nurse at the hospital. " * 100
    # ~0.25 tokens a character on SmolLM2.
    assert 0.25 * len(text) <= estimate_tokens(text) <= 0.35 * len(text)


def test_digits_count_one_token_each():
    # Several tokenizers give every digit its own token.
    assert estimate_tokens("1234567890" * 10) >= 100


def test_estimate_of_nothing_is_zero_and_of_a_lone_surrogate_is_finite():
    assert estimate_tokens("") == 0
    assert estimate_tokens("\ud800") >= 1


def test_estimate_is_subadditive_so_parts_can_be_budgeted_apart():
    parts = ["abc", "中文", "12", "é", "x" * 7]
    whole = "".join(parts)
    assert estimate_tokens(whole) <= sum(estimate_tokens(p) for p in parts)


def test_estimate_takes_a_20_mb_paste():
    assert estimate_tokens("a" * 10_000_000 + "中" * 3_000_000) > 0


# --- clip_middle -------------------------------------------------------------


def test_clip_middle_leaves_a_text_that_fits_unchanged():
    text = "short text 中文"
    assert clip_middle(text, estimate_tokens(text)) is text


def test_clip_middle_fits_the_budget_and_keeps_more_tail_than_head():
    text = "HEAD " + "filler words " * 2000 + " TAIL?"
    clipped = clip_middle(text, 300)
    assert estimate_tokens(clipped) <= 300
    assert clipped.startswith("HEAD ")
    assert clipped.endswith(" TAIL?")
    head, tail = clipped.split("\n[... ", 1)[0], clipped.split("left out ...]\n", 1)[1]
    assert len(tail) > len(head) * 1.5
    assert len(head) + len(tail) + left_out(clipped) == len(text)


def test_clip_middle_fits_chinese_and_mixed_text():
    for text in (chinese(7000), ("word 中文 123 " * 3000)):
        for budget in (50, 333, 2000):
            clipped = clip_middle(text, budget)
            assert estimate_tokens(clipped) <= budget
            assert clipped[-5:] == text[-5:]


def test_clip_middle_below_the_marker_keeps_only_the_tail():
    text = "x" * 1000 + "END"
    assert clip_middle(text, 3) == text[-10:]
    assert clip_middle(text, 0) == ""


# --- clip_chars / clip_exchange_texts ---------------------------------------


def test_clip_chars_bounds_characters_and_reports_what_it_left_out():
    text = "a" * 50_000 + "QUESTION?"
    clipped = clip_chars(text, 1000)
    assert len(clipped) <= 1000
    assert clipped.endswith("QUESTION?")
    assert clip_chars(text, len(text)) is text
    assert clip_chars(text, 5) == "TION?"
    marker = OMISSION_MARKER.format(left_out(clipped))
    assert marker in clipped
    assert len(clipped) - len(marker) + left_out(clipped) == len(text)


def test_clip_exchange_texts_bounds_every_text_and_keeps_the_rest():
    big = "x" * 200_000 + "the end"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500}}
    original = Exchange(
        scope=Scope(user_id="u"),
        messages=[
            {"role": "system", "content": big},
            {"role": "user", "content": [{"type": "text", "text": big}, image]},
            {"role": "user", "content": "short"},
            {"role": "user"},
        ],
        reply=big,
        at=AT,
        source="job-1",
    )
    clipped = clip_exchange_texts(original, 1000)

    assert len(clipped.messages[0]["content"]) <= 1000
    assert clipped.messages[0]["content"].endswith("the end")
    text_part, image_part = clipped.messages[1]["content"]
    assert len(text_part["text"]) <= 1000
    assert text_part["type"] == "text"
    assert image_part is image
    assert clipped.messages[2] is original.messages[2]
    assert clipped.messages[3] == {"role": "user"}
    assert clipped.reply is not None and len(clipped.reply) <= 1000
    assert clipped.reply.endswith("the end")
    assert (clipped.scope, clipped.at, clipped.source) == (original.scope, AT, "job-1")
    # The original is untouched.
    assert original.messages[0]["content"] is big
    assert original.messages[1]["content"][0]["text"] is big


def test_clip_exchange_texts_keeps_a_small_exchange_equal():
    small = Exchange(
        scope=Scope(user_id="u"), messages=[{"role": "user", "content": "hi"}], reply=None, at=AT
    )
    assert clip_exchange_texts(small, 100) == small


# --- search_query ------------------------------------------------------------


def test_search_query_of_a_short_text_is_the_text():
    assert search_query("  Where do I live?\n") == "Where do I live?"
    assert search_query(" \n\t ") == ""


def test_search_query_keeps_the_question_at_the_end_of_a_long_paste():
    paste = "Log file of my server:\n" + "line of log output\n" * 100_000
    text = paste + "Why does my server in Lyon crash?\n\n" + " " * 10_000
    query = search_query(text)
    assert query.startswith("Log file of my server:")
    assert query.endswith("Why does my server in Lyon crash?")
    assert SEARCH_QUERY_SEPARATOR in query
    limit = SEARCH_QUERY_HEAD_CHARS + len(SEARCH_QUERY_SEPARATOR) + SEARCH_QUERY_TAIL_CHARS
    assert len(query) <= limit


def test_search_query_of_chinese_paste_is_bounded_by_characters():
    text = chinese(20_000) + "我住在哪里？"
    query = search_query(text)
    assert query.endswith("我住在哪里？")
    assert query.startswith(text[:SEARCH_QUERY_HEAD_CHARS])
