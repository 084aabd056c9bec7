# ruff: noqa: RUF001 - full-width CJK punctuation is meant literally here.
"""The extraction prompt fits the model's context window, whatever was pasted."""

import json
from datetime import UTC, datetime

from memory.clipping import estimate_tokens
from memory.models import Exchange, Memory, Scope
from memory.prompts import (
    MAX_MESSAGE_CHARS,
    NO_MEMORIES,
    build_messages,
    build_prompt,
    conversation_lines,
    prompt_budget,
)
from tests.memory.helpers import EXISTING, chinese, stored, user_turn

AT = datetime(2026, 3, 13, 9, 30, tzinfo=UTC)


def exchange(*texts: str, reply: str | None = "好的，我记住了。") -> Exchange:
    return Exchange(
        scope=Scope(user_id="u"),
        messages=[{"role": "user", "content": t} for t in texts],
        reply=reply,
        at=AT,
    )


def memory(i: int, text: str) -> Memory:
    return stored(f"id-{i}", text, AT)


def estimated(messages: list[dict[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) for m in messages)


def small_model_tokens(messages: list[dict[str, str]]) -> float:
    """What SmolLM2's tokenizer spends, about: 1.86 a Chinese character
    (13,030 tokens for 7,000), 0.25 an ASCII one."""
    return sum(sum(1.86 if ord(c) > 127 else 0.25 for c in m["content"]) for m in messages)


def conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The JSON lines of the conversation in the user message."""
    lines = []
    for line in messages[1]["content"].splitlines():
        if line.startswith('{"role": '):
            lines.append(json.loads(line))
    return lines


def shown_memories(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [
        json.loads(line)
        for line in messages[1]["content"].splitlines()
        if line.startswith('{"id": ')
    ]


PASTE = "我住在柏林，在医院当护士。" + chinese(7000) + "我下周五要去里昂看我妹妹。"


def test_a_long_chinese_paste_fits_a_4k_window():
    messages = build_messages(exchange(PASTE), [], context_tokens=4096, max_tokens=384)

    assert estimated(messages) <= prompt_budget(4096, 384) < 4096 - 384
    assert small_model_tokens(messages) < 4096 - 384
    user, reply = conversation(messages)
    # The newest user turn keeps its head and its end; the reply survives.
    assert user["content"].startswith("我住在柏林")
    assert user["content"].endswith("我下周五要去里昂看我妹妹。")
    assert "characters left out" in user["content"]
    assert reply == {"role": "assistant", "content": "好的，我记住了。"}


def test_the_budget_follows_the_context_window():
    small = build_messages(exchange(PASTE), [], context_tokens=4096, max_tokens=384)
    large = build_messages(exchange(PASTE), [], context_tokens=32768, max_tokens=384)
    assert estimated(large) <= prompt_budget(32768, 384)
    assert len(large[1]["content"]) > 2 * len(small[1]["content"])
    # Within a big window, the whole paste is there.
    assert conversation(large)[0]["content"] == PASTE


def test_memories_beyond_a_quarter_are_left_out_from_the_end():
    existing = [memory(i, f"用户的第{i}个事实：" + chinese(40, seed=i)) for i in range(40)]
    prompt = build_prompt(exchange(PASTE), existing, context_tokens=4096, max_tokens=384)

    shown = shown_memories(prompt.messages)
    k = prompt.memories_shown
    assert 0 < k < len(existing)
    assert [m["id"] for m in shown] == [str(i) for i in range(k)]
    assert [m["text"] for m in shown] == [m.text for m in existing[:k]]
    cost = sum(estimate_tokens(json.dumps(m, ensure_ascii=False)) + 1 for m in shown)
    room = prompt_budget(4096, 384) - estimate_tokens(prompt.messages[0]["content"])
    assert cost <= room / 4
    assert estimated(prompt.messages) <= prompt_budget(4096, 384)
    # The conversation got the rest and still ends with the question and the reply.
    user, reply = conversation(prompt.messages)
    assert user["content"].endswith("我下周五要去里昂看我妹妹。")
    assert reply["role"] == "assistant"


def test_a_small_exchange_and_few_memories_are_shown_whole():
    existing = [memory(0, "User lives in Berlin"), memory(1, "User likes green tea")]
    ex = exchange("I moved to Rome.", "And I adopted a cat.", reply="Congratulations!")
    prompt = build_prompt(ex, existing, context_tokens=4096, max_tokens=384)

    assert prompt.memories_shown == 2
    assert shown_memories(prompt.messages) == [
        {"id": "0", "text": "User lives in Berlin"},
        {"id": "1", "text": "User likes green tea"},
    ]
    assert conversation(prompt.messages) == [
        {"role": "user", "content": "I moved to Rome."},
        {"role": "user", "content": "And I adopted a cat."},
        {"role": "assistant", "content": "Congratulations!"},
    ]
    assert build_messages(ex, existing, None) == prompt.messages


def test_older_lines_are_left_out_before_the_newest_turn_is_clipped():
    old = [f"旧消息{i}：" + chinese(400, seed=i) for i in range(6)]
    newest = "最新的问题：我养了一只猫，叫咪咪。"
    messages = build_messages(
        exchange(*old, newest, reply="真好！"), [], context_tokens=4096, max_tokens=384
    )

    lines = conversation(messages)
    assert lines[-2:] == [
        {"role": "user", "content": newest},
        {"role": "assistant", "content": "真好！"},
    ]
    kept = [line["content"] for line in lines[:-2]]
    assert len(kept) < len(old)
    # Whatever older lines remain are the newest of them, in order.
    assert old[-1].startswith(kept[-1][:5])
    assert not any(k.startswith("旧消息0") for k in kept)
    assert estimated(messages) <= prompt_budget(4096, 384)


def test_a_long_reply_is_clipped_too_and_the_user_turn_gets_more():
    messages = build_messages(
        exchange(PASTE, reply="回答开头" + chinese(7000, seed=2) + "回答结尾"),
        [],
        context_tokens=4096,
        max_tokens=384,
    )
    user, reply = conversation(messages)
    assert user["content"].endswith("我下周五要去里昂看我妹妹。")
    assert reply["content"].endswith("回答结尾")
    assert len(user["content"]) > len(reply["content"])
    assert estimated(messages) <= prompt_budget(4096, 384)


def test_text_that_json_escapes_expensively_still_fits():
    text = '"\n\\' * 20_000 + "END"
    messages = build_messages(exchange(text), [], context_tokens=4096, max_tokens=384)
    assert estimated(messages) <= prompt_budget(4096, 384)
    assert conversation(messages)[0]["content"].endswith("END")


def test_a_line_never_exceeds_max_message_chars_even_in_a_huge_window():
    text = "word " * 50_000 + "the question?"
    messages = build_messages(exchange(text), [], context_tokens=200_000, max_tokens=384)
    user = conversation(messages)[0]["content"]
    assert len(user) <= MAX_MESSAGE_CHARS
    assert user.endswith("the question?")


def test_a_window_too_small_for_the_system_prompt_still_gives_a_prompt():
    prompt = build_prompt(
        exchange(PASTE),
        [memory(0, "User lives in Berlin")],
        context_tokens=256,
        max_tokens=128,
    )
    assert prompt.memories_shown == 0
    assert NO_MEMORIES in prompt.messages[1]["content"]
    user = conversation(prompt.messages)[0]["content"]
    assert user.endswith("看我妹妹。")
    assert estimate_tokens(user) < 100


def test_overridden_templates_are_budgeted_per_placeholder_use():
    overrides = {
        "extraction_system": "SYS",
        "extraction_user": "$conversation\n---\n$conversation\n${memories}",
    }
    messages = build_messages(exchange(PASTE), [], overrides, context_tokens=4096, max_tokens=384)
    assert messages[0] == {"role": "system", "content": "SYS"}
    assert estimated(messages) <= prompt_budget(4096, 384)
    assert messages[1]["content"].endswith(NO_MEMORIES)


def test_a_template_without_memories_shows_none():
    overrides = {"extraction_user": "$conversation"}
    prompt = build_prompt(exchange("hi"), [memory(0, "User lives in Berlin")], overrides)
    assert prompt.memories_shown == 0
    assert prompt.messages[1]["content"] == '{"role": "user", "content": "hi"}\n' + (
        '{"role": "assistant", "content": "好的，我记住了。"}'
    )


def test_assistant_messages_of_a_conversation_given_to_the_api_are_shown_in_place():
    e = Exchange(
        scope=Scope(user_id="u"),
        messages=[
            {"role": "user", "content": "Where should I move?"},
            {"role": "assistant", "content": "You said you love the sea: Lisbon?"},
            {"role": "user", "content": "Yes, I moved to Lisbon."},
        ],
        reply=None,
        at=datetime(2026, 12, 6, tzinfo=UTC),
    )
    assert [line["role"] for line in conversation_lines(e)] == ["user", "assistant", "user"]
    assert "You said you love the sea" in build_messages(e, [])[1]["content"]


def test_prompt_templates_can_be_overridden_from_config():
    messages = build_messages(
        user_turn("hello"),
        EXISTING,
        {
            "extraction_system": "SYS",
            "extraction_user": 'On $date: {"x": 1}\n$memories\n$conversation',
        },
    )
    assert messages[0] == {"role": "system", "content": "SYS"}
    assert messages[1]["content"].startswith('On 2026-03-13: {"x": 1}\n{"id": "0"')
