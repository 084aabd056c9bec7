"""The channel from serving processes to the extraction process
(`server.extraction: process`): what one message carries, and what an
exchange hands over."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import numpy as np

from memory.config import LLMConfig, MemoryConfig
from memory.engine import MemoryEngine
from memory.handoff import MAX_MESSAGE, HandoffReceiver, HandoffSender, channel
from memory.models import Exchange, Scope

ALICE = Scope(user_id="alice")


async def received(receiver_end, count: int) -> list[tuple]:
    messages: list[tuple] = []
    receiver = HandoffReceiver(receiver_end)
    receiver.start(lambda *message: messages.append(message))
    try:
        for _ in range(200):
            if len(messages) >= count:
                break
            await asyncio.sleep(0.01)
    finally:
        receiver.close()
    return messages


async def test_a_message_carries_a_key_and_an_embedding_or_only_wakes():
    sender_end, receiver_end = channel()
    sender = HandoffSender(sender_end)
    vector = np.linspace(-1, 1, 512, dtype=np.float32)
    sender.send("alice", "sk-alice", ("I moved to Lisbon", vector))
    sender.send()
    sender.send("bob", None, ("x" * MAX_MESSAGE, vector))  # too long to carry its embedding
    messages = await received(receiver_end, 3)
    sender.close()
    (user, key, text, got), wake, long = messages
    assert (user, key, text) == ("alice", "sk-alice", "I moved to Lisbon")
    np.testing.assert_array_equal(got, vector)
    assert wake == (None, None, None, None)
    assert long == ("bob", None, None, None)


def test_messages_a_stalled_receiver_cannot_take_are_dropped_and_reported(caplog):
    sender_end, receiver_end = channel()  # nobody reads receiver_end
    sender = HandoffSender(sender_end)
    vector = np.zeros(512, dtype=np.float32)
    with caplog.at_level("WARNING", logger="memory.handoff"):
        for _ in range(5000):
            sender.send("alice", None, ("I moved to Lisbon", vector))
            if sender.dropped >= 12:
                break
    sender.close()
    receiver_end.close()
    assert sender.dropped >= 12  # sending never blocked
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 2  # the 1st and the 10th drop, not every one
    assert reports[0].startswith("1 message(s)") and reports[1].startswith("10 message(s)")


async def test_an_exchange_hands_over_the_embedding_its_search_computed(tmp_path, embedder):
    sender_end, receiver_end = channel()
    engine = await MemoryEngine.open(
        MemoryConfig(llm=LLMConfig(api_key="sk-config")),
        tmp_path / "data",
        default_base_url="http://llm.test/v1",
        embedder=embedder,
        handoff=HandoffSender(sender_end),
    )
    try:
        await engine.store.search(Scope(user_id="warm-up"), "warm-up")  # as the gateway's start-up
        turn = "I moved to Lisbon last spring"
        await engine.store.search(ALICE, turn)
        exchange = Exchange(
            scope=ALICE,
            messages=[{"role": "user", "content": turn}],
            reply="Lovely city!",
            at=datetime.now(UTC),
        )
        await engine.record_exchange(exchange)
        # Nobody searched with bob's turn here: nothing to hand over but the wake-up.
        await engine.record_exchange(msgspec.structs.replace(exchange, scope=Scope(user_id="bob")))
        searched, unsearched = await received(receiver_end, 2)
    finally:
        await engine.close()
    user, key, text, vector = searched
    assert (user, key, text) == ("alice", None, turn)  # the configured key is not handed over
    np.testing.assert_allclose(vector, (await embedder.embed([turn]))[0])
    assert unsearched == ("bob", None, None, None)
