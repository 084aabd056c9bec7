"""The only place that writes LanceDB filter strings.

LanceDB filters are DataFusion SQL. A string literal is delimited by single
quotes, a quote inside it is written twice, and backslashes are plain
characters (no escape processing) - checked against LanceDB 0.40 in
tests/memory/test_filters.py. Every value that reaches a filter goes through
`literal`.

Every store query is narrowed to one scope by `scope_filter` (the rule itself
is in memory/scope.py), except the few named in `UNSCOPED`, which must look
past one user and say why. They are built by `unscoped(name, ...)`, which
refuses a name not listed; tests/memory/test_filters.py runs the store's
whole API and fails on any query that is neither scoped nor listed.
"""

from __future__ import annotations

from collections.abc import Sequence

from memory.models import Scope


class UnsafeFilterValue(ValueError):
    """A value that cannot be written as a SQL string literal."""


# The queries that are not narrowed to one scope, reviewed one by one: name ->
# why it may look past one user, and why what it learns never reaches a user.
UNSCOPED: dict[str, str] = {
    "ready": "matches no row: it only checks that the table answers (/ready)",
    "index_size": "counts every row to decide when the vector index pays off",
    "users": "the user list with counts; the management API shows it to the admin only",
    "count": "active memories of every user, for the admin's stats",
    "import_owners": (
        "which user holds an id an import would take, to keep the import off"
        " other users' rows; the importer is never told whose it is or whether"
        " it exists (memory/store/imports.py)"
    ),
    "id_owner": (
        "which user holds one memory id, for an id-only call of the mem0"
        " Platform API (gateway/mem0_api.py) that names no user; only the admin"
        " reaches it (a per-user key is scoped to its own user), and the call"
        " then runs in the owner's scope"
    ),
}


class Unscoped(str):
    """A filter string that looks past one scope, tagged with its `UNSCOPED` name."""

    name: str

    def __new__(cls, name: str, text: str) -> Unscoped:
        made = super().__new__(cls, text)
        made.name = name
        return made


def literal(value: str) -> str:
    """Quote `value` as a DataFusion string literal."""
    if not isinstance(value, str):
        raise UnsafeFilterValue(f"filter values must be str, not {type(value).__name__}")
    if "\x00" in value:
        raise UnsafeFilterValue("filter values must not contain NUL")
    return "'" + value.replace("'", "''") + "'"


def _in_list(column: str, values: Sequence[str]) -> str:
    if not values:
        return "false"
    if len(values) == 1:
        return f"{column} = {literal(values[0])}"
    return f"{column} IN ({', '.join(literal(v) for v in values)})"


def _conditions(
    *,
    user_id: str | None = None,
    agent_id: str | None = None,
    ids: Sequence[str] | None = None,
    memory_ids: Sequence[str] | None = None,
    hashes: Sequence[str] | None = None,
    superseded_by: Sequence[str] | None = None,
    source: str | None = None,
    active_only: bool = False,
) -> str:
    """Join the given conditions with AND; `None` means "no condition".

    `ids` matches the `id` column, `memory_ids` the history table's
    `memory_id`, `superseded_by` the rows replaced by those ids, `source` the
    rows (and history entries) one job or call wrote. An empty sequence
    matches nothing. `active_only` keeps rows no later fact replaced.
    """
    parts: list[str] = []
    if user_id is not None:
        parts.append(f"user_id = {literal(user_id)}")
    if agent_id is not None:
        parts.append(f"agent_id = {literal(agent_id)}")
    if ids is not None:
        parts.append(_in_list("id", ids))
    if memory_ids is not None:
        parts.append(_in_list("memory_id", memory_ids))
    if hashes is not None:
        parts.append(_in_list("hash", hashes))
    if superseded_by is not None:
        parts.append(_in_list("superseded_by", superseded_by))
    if source is not None:
        parts.append(f"source = {literal(source)}")
    if active_only:
        parts.append("superseded_by IS NULL")
    if not parts:
        return "true"
    return " AND ".join(f"({p})" for p in parts)


def unscoped(
    name: str,
    *,
    ids: Sequence[str] | None = None,
    active_only: bool = False,
) -> Unscoped:
    """The filter of the unscoped query `name` (a key of `UNSCOPED`)."""
    if name not in UNSCOPED:
        raise KeyError(f"{name!r} is not a reviewed unscoped query (memory/filters.py UNSCOPED)")
    return Unscoped(name, _conditions(ids=ids, active_only=active_only))


def scope_filter(
    scope: Scope,
    *,
    ids: Sequence[str] | None = None,
    memory_ids: Sequence[str] | None = None,
    hashes: Sequence[str] | None = None,
    superseded_by: Sequence[str] | None = None,
    source: str | None = None,
    active_only: bool = False,
) -> str:
    """The filter of everything `scope` may see: its user, narrowed to its agent
    when one is given. `session_id` is provenance, not a boundary: a user's
    long-term memories follow them across sessions."""
    return _conditions(
        user_id=scope.user_id,
        agent_id=scope.agent_id,
        ids=ids,
        memory_ids=memory_ids,
        hashes=hashes,
        superseded_by=superseded_by,
        source=source,
        active_only=active_only,
    )
