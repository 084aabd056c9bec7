"""The change log (memory/changelog.py): which rows each committed table
version changed, so other processes' search caches follow without reloading."""

from __future__ import annotations

from memory.changelog import MAX_IDS, ChangeLog, merged


def test_the_change_log_names_rows_up_to_a_bound_then_the_whole_user(tmp_path):
    log = ChangeLog(tmp_path / "changes.sqlite3")
    try:
        log.record(7, {"alice": {"a", "b"}, "bob": None})
        log.record(8, {"alice": {f"m{i}" for i in range(MAX_IDS + 1)}})
        logged = log.logged(1, 10)
        assert logged == {7: {"alice": frozenset({"a", "b"}), "bob": None}, 8: {"alice": None}}
        assert merged({7: logged[7]}) == {"alice": {"a", "b"}, "bob": None}
        assert merged(logged) == {"alice": None, "bob": None}
        log.record_unchanged([9, 10])
        assert log.logged(9, 10) == {9: {}, 10: {}}
    finally:
        log.close()
