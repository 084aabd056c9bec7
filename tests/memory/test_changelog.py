"""The change log (memory/changelog.py, and memory/changelog_postgres.py for
replicas): which rows each committed table version changed, so other
processes' search caches follow without reloading."""

from __future__ import annotations

import pytest

from memory.changelog import KEEP_VERSIONS, MAX_IDS, ChangeLog, VersionLog, merged


@pytest.fixture(params=["sqlite", "postgres"])
def log(request, tmp_path):
    """The log on each backend: these tests are its contract."""
    opened: VersionLog
    if request.param == "postgres":
        from memory.changelog_postgres import PostgresChangeLog

        opened = PostgresChangeLog(request.getfixturevalue("postgres_url"))
    else:
        opened = ChangeLog(tmp_path / "changes.sqlite3")
    yield opened
    opened.close()


def test_the_change_log_names_rows_up_to_a_bound_then_the_whole_user(log):
    log.record(7, {"alice": {"a", "b"}, "bob": None})
    log.record(8, {"alice": {f"m{i}" for i in range(MAX_IDS + 1)}})
    logged = log.logged(1, 10)
    assert logged == {7: {"alice": frozenset({"a", "b"}), "bob": None}, 8: {"alice": None}}
    assert merged({7: logged[7]}) == {"alice": {"a", "b"}, "bob": None}
    assert merged(logged) == {"alice": None, "bob": None}
    log.record_unchanged([9, 10])
    assert log.logged(9, 10) == {9: {}, 10: {}}


def test_a_version_logged_twice_keeps_its_first_record_and_old_versions_are_pruned(log):
    log.record(5, {"alice": {"a"}})
    log.record(5, {"alice": {"b"}})
    assert log.logged(5, 5) == {5: {"alice": frozenset({"a"})}}
    log.prune(5 + KEEP_VERSIONS + 1)
    assert log.logged(0, 10) == {}


def test_only_the_postgresql_log_is_shared_by_replicas(tmp_path, postgres_url):
    from memory.changelog_postgres import PostgresChangeLog

    one, other = PostgresChangeLog(postgres_url), PostgresChangeLog(postgres_url)
    local = ChangeLog(tmp_path / "changes.sqlite3")
    try:
        one.record(3, {"alice": {"a"}})
        assert other.logged(3, 3) == {3: {"alice": frozenset({"a"})}}
        assert (one.shared, local.shared) == (True, False)
    finally:
        one.close()
        other.close()
        local.close()
