"""The console's list of recent chats (gateway/recent_requests.py): bounded,
newest first, found by id."""

from __future__ import annotations

from gateway.recent_requests import RecentRequests, RequestRecord


def record(ring: RecentRequests, n: int) -> RequestRecord:
    return RequestRecord(
        id=ring.next_id(),
        at=1_000_000.0 + n,
        path="/v1/chat/completions",
        model="gpt-test",
        upstream="default",
        status=200,
        memory_status="ok",
        injected=n % 3,
        stream=False,
        user_id=f"user-{n}",
        duration_ms=1.5,
    )


def test_the_newest_come_first_and_the_oldest_are_forgotten() -> None:
    ring = RecentRequests(size=3)
    records = [record(ring, n) for n in range(5)]
    for r in records:
        ring.add(r)
    assert ring.latest() == [records[4], records[3], records[2]]
    assert ring.latest(2) == [records[4], records[3]]
    assert ring.latest(0) == []


def test_a_record_is_found_by_its_id_while_it_is_kept() -> None:
    ring = RecentRequests(size=2)
    first, second, third = (record(ring, n) for n in range(3))
    for r in (first, second, third):
        ring.add(r)
    assert ring.get(third.id) == third
    assert ring.get(first.id) is None
    assert ring.get(999) is None
