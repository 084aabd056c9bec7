"""Filter strings: one builder, values escaped, checked against real LanceDB."""

from __future__ import annotations

from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory.filters import UNSCOPED, UnsafeFilterValue, Unscoped, literal, scope_filter, unscoped
from memory.filters import _conditions as build_filter
from memory.models import Scope

HOSTILE = [
    "' OR '1'='1",
    "alice' --",
    "a'b",
    "''",
    "'",
    "\\",
    "x\\",
    "\\'",
    "b\\' OR 1=1 --",
    '"double"',
    "%",
    "_",
    "a%",
    "a_c",
    "用户一",
    "émoji 🎉",
    "a" * 256,
    "1; DROP TABLE memories",
    "user_id",
    "null",
    ") OR (true",
]


def test_literal_doubles_single_quotes():
    assert literal("a'b") == "'a''b'"
    assert literal("' OR '1'='1") == "''' OR ''1''=''1'"


def test_literal_keeps_backslashes_as_plain_characters():
    assert literal("a\\b") == "'a\\b'"


def test_literal_rejects_nul_and_non_strings():
    with pytest.raises(UnsafeFilterValue):
        literal("a\x00b")
    with pytest.raises(UnsafeFilterValue):
        literal(1)  # type: ignore[arg-type]


def test_scope_filter_narrows_to_user_and_agent_but_not_session():
    where = scope_filter(Scope(user_id="u", agent_id="a", session_id="s"))
    assert where == "(user_id = 'u') AND (agent_id = 'a')"


def test_an_unscoped_filter_carries_its_reviewed_name_and_no_other_is_made():
    where = unscoped("users", active_only=True)
    assert isinstance(where, Unscoped) and where.name == "users"
    assert where == "(superseded_by IS NULL)"
    assert all(reason for reason in UNSCOPED.values())
    with pytest.raises(KeyError, match="not a reviewed unscoped query"):
        unscoped("everything")


def test_build_filter_with_nothing_matches_everything_and_empty_list_nothing():
    assert build_filter() == "true"
    assert build_filter(ids=[]) == "(false)"


def test_active_only_excludes_superseded_rows():
    assert build_filter(user_id="u", active_only=True) == (
        "(user_id = 'u') AND (superseded_by IS NULL)"
    )


@pytest.fixture
async def table(tmp_path: Path):
    db = await lancedb.connect_async(str(tmp_path))
    schema = pa.schema([pa.field("id", pa.string()), pa.field("user_id", pa.string())])
    rows = [{"id": f"row-{i}", "user_id": u} for i, u in enumerate(["victim", *HOSTILE])]
    t = await db.create_table("t", data=pa.Table.from_pylist(rows, schema=schema))
    yield t
    t.close()
    db.close()


@pytest.mark.parametrize("value", HOSTILE)
async def test_hostile_value_matches_exactly_its_own_row(table, value):
    rows = await table.query().where(build_filter(user_id=value)).to_list()
    assert [r["user_id"] for r in rows] == [value]


async def test_hostile_values_in_an_in_list_match_exactly_those_rows(table):
    rows = (
        await table.query().where(build_filter(user_id="victim", ids=["row-0", *HOSTILE])).to_list()
    )
    assert [r["id"] for r in rows] == ["row-0"]
    wanted = [f"row-{i}" for i in range(1, 6)]
    rows = await table.query().where(build_filter(ids=[*wanted, "' OR '1'='1"])).to_list()
    assert sorted(r["id"] for r in rows) == wanted


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        max_size=40,
    )
)
async def test_any_string_round_trips_through_a_filter(tmp_path_factory, value):
    db = await lancedb.connect_async(str(tmp_path_factory.mktemp("prop")))
    schema = pa.schema([pa.field("user_id", pa.string())])
    data = pa.Table.from_pylist([{"user_id": value}, {"user_id": "victim"}], schema=schema)
    t = await db.create_table("t", data=data)
    rows = await t.query().where(build_filter(user_id=value)).to_list()
    assert [r["user_id"] for r in rows] == ([value] if value != "victim" else ["victim"])
    t.close()
    db.close()
