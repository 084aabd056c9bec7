"""The subset of mem0's `filters` language the mem0 API (gateway/mem0_api.py) understands.

mem0 clients send entity ids inside `filters` (`{"user_id": "alice"}`,
`{"AND": [{"user_id": "alice"}, {"agent_id": {"in": ["a", "b"]}}]}`). We accept
entity equality and `in` (user_id, agent_id, run_id, app_id), `AND` (also the
implicit AND of several keys) and `created_at` bounds. Anything else is a
400 naming what is unsupported: silently ignoring a filter would answer with
memories the caller asked to exclude.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gateway.errors import GatewayError
from memory.models import Memory

ENTITIES = ("user_id", "agent_id", "run_id", "app_id")
DATE_OPS = ("gte", "lte", "gt", "lt")
SUPPORTED = (
    "entity equality or 'in' (user_id, agent_id, run_id, app_id), AND, created_at gte/lte/gt/lt"
)


def unsupported(what: str) -> GatewayError:
    return GatewayError(
        400, f"filters: {what} is not supported here (supported: {SUPPORTED})", param="filters"
    )


@dataclass(slots=True)
class Criteria:
    """What the filters allow: per entity the values it may take (None: any),
    and created_at bounds as (operator, instant)."""

    entities: dict[str, frozenset[str]] = field(default_factory=dict)
    dates: list[tuple[str, datetime]] = field(default_factory=list)

    def restrict(self, name: str, values: frozenset[str]) -> None:
        """AND: a second condition on the same entity narrows the first."""
        known = self.entities.get(name)
        self.entities[name] = values if known is None else known & values

    def only(self, name: str) -> str | None:
        """The one value `name` must have, if the filters pin it to one."""
        values = self.entities.get(name)
        return next(iter(values)) if values is not None and len(values) == 1 else None

    def matches(self, memory: Memory) -> bool:
        return all(
            entity_of(memory, name) in allowed for name, allowed in self.entities.items()
        ) and all(_compare(_utc(memory.created_at), op, at) for op, at in self.dates)


def entity_of(memory: Memory, name: str) -> str | None:
    """A memory's mem0 entity: run_id is our session_id, app_id lives in metadata."""
    if name == "user_id":
        return memory.user_id
    if name == "agent_id":
        return memory.agent_id
    if name == "run_id":
        return memory.session_id
    app = memory.metadata.get("app_id")
    return app if isinstance(app, str) else None


def parse(filters: Any, criteria: Criteria | None = None) -> Criteria:
    """Criteria from a mem0 `filters` object (None or {} allows everything)."""
    criteria = Criteria() if criteria is None else criteria
    if filters is None:
        return criteria
    if not isinstance(filters, Mapping):
        raise GatewayError(400, "filters must be a JSON object", param="filters")
    for key, value in filters.items():
        _clause(str(key), value, criteria)
    return criteria


def _clause(key: str, value: Any, criteria: Criteria) -> None:
    if key == "AND":
        if not isinstance(value, list):
            raise GatewayError(400, "filters: AND takes a list of filter objects", param="filters")
        for part in value:
            parse(part, criteria)
    elif key in ENTITIES:
        criteria.restrict(key, _entity_values(key, value))
    elif key == "created_at":
        criteria.dates.extend(_date_bounds(value))
    elif key in ("OR", "NOT"):
        raise unsupported(f"the {key} operator")
    else:
        raise unsupported(f"the field {key!r}")


def _entity_values(key: str, value: Any) -> frozenset[str]:
    if isinstance(value, str):
        if value == "*":
            raise unsupported(f"the wildcard '*' on {key}")
        return frozenset({value})
    if isinstance(value, Mapping) and list(value) == ["in"]:
        values = value["in"]
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            return frozenset(values)
        raise GatewayError(
            400, f"filters: {key} 'in' takes a non-empty list of strings", param="filters"
        )
    if isinstance(value, Mapping):
        ops = ", ".join(repr(k) for k in value)
        raise unsupported(f"the operator {ops} on {key}")
    raise GatewayError(400, f"filters: {key} must be a string or {{'in': [...]}}", param="filters")


def _date_bounds(value: Any) -> list[tuple[str, datetime]]:
    if not isinstance(value, Mapping) or not value:
        raise GatewayError(
            400,
            "filters: created_at takes an object such as {'gte': '2026-01-31'}",
            param="filters",
        )
    bounds = []
    for op, raw in value.items():
        if op not in DATE_OPS:
            raise unsupported(f"the operator {op!r} on created_at")
        bounds.append(bound(str(op), raw, "created_at"))
    return bounds


def bound(op: str, raw: Any, name: str) -> tuple[str, datetime]:
    """One date bound. A bare date means the whole day: `lte 2026-01-31`
    includes that day, `gt 2026-01-31` starts the next one."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise GatewayError(400, f"{name} must be an ISO 8601 date or time", param="filters")
    if not isinstance(raw, str):
        return op, datetime.fromtimestamp(raw, UTC)
    try:
        if len(raw) == 10:
            day = datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC)
            return _whole_day(op, day)
        return op, _utc(datetime.fromisoformat(raw))
    except ValueError:
        raise GatewayError(
            400, f"{name}: {raw!r} is not an ISO 8601 date or time", param="filters"
        ) from None


def _whole_day(op: str, day: datetime) -> tuple[str, datetime]:
    if op == "lte":
        return "lt", day + timedelta(days=1)
    if op == "gt":
        return "gte", day + timedelta(days=1)
    return op, day


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _compare(value: datetime, op: str, at: datetime) -> bool:
    if op == "gte":
        return value >= at
    if op == "lte":
        return value <= at
    if op == "gt":
        return value > at
    return value < at
