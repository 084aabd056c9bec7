"""Which key a user's extraction jobs send: the configured one, or theirs."""

from types import SimpleNamespace

from memory.extraction_keys import ExtractionKeys


class Handoff:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def send(self, user_id, api_key, embedded=None) -> None:
        self.sent.append((user_id, api_key))


def keys(configured=None, *, needs_key=True, handoff=None):
    woken: list[int] = []
    k = ExtractionKeys(
        configured,
        SimpleNamespace(needs_key=needs_key),
        handoff=handoff,
        wake=lambda: woken.append(1),
    )
    return k, woken


def test_a_users_latest_key_is_used_and_a_new_user_wakes_the_workers():
    k, woken = keys()
    assert k.needs_user_keys()
    assert k.claimable_users() == []
    k.provide("alice", "sk-a")
    k.provide("alice", "sk-a")
    k.provide("alice", "sk-a2")
    assert woken == [1]  # only the first key made her jobs claimable
    assert k.key_for("alice") == "sk-a2"
    assert k.key_for("bob") is None
    assert k.claimable_users() == ["alice"]
    k.forget("alice")
    assert not k.knows("alice")


def test_a_configured_key_is_used_for_everyone_and_user_keys_are_not_kept():
    k, woken = keys("sk-conf")
    k.provide("alice", "sk-a")
    assert not k.knows("alice")
    assert k.key_for("alice") == "sk-conf"
    assert not k.needs_user_keys()
    assert k.claimable_users() is None
    assert k.to_hand_over("sk-a") is None
    assert woken == []


def test_an_endpoint_that_answers_without_a_key_lets_everyone_claim():
    k, _ = keys(needs_key=False)
    assert k.claimable_users() is None


def test_with_an_extraction_process_a_new_or_changed_key_is_handed_over():
    handoff = Handoff()
    k, woken = keys(handoff=handoff)
    k.provide("alice", "sk-a")
    k.provide("alice", "sk-a")
    k.provide("alice", "sk-b")
    assert handoff.sent == [("alice", "sk-a"), ("alice", "sk-b")]
    assert woken == []
    assert k.to_hand_over("sk-b") == "sk-b"
    assert k.to_hand_over(None) is None
