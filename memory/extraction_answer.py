"""Reading the extraction model's answer: lenient about the JSON, strict
about the operations.

The JSON is read leniently (raw newlines in strings, code fences, prose
around it, trailing commas): small models' grammars let those through, and
they change nothing about the meaning. The operations are validated all or
nothing: wrong types, unknown ops, aliases the model invented raise
`ExtractionError`, so a confused model can never delete or overwrite a fact
by accident.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from memory.extraction_errors import ExtractionError
from memory.models import Memory, Operation

_OPS = ("ADD", "UPDATE", "DELETE", "NONE")
# A fact is one short sentence; a page of text is a model going off the rails.
MAX_FACT_CHARS = 1000
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
# Whitespace looked past after a comma (more would be a pretty-printer gone wild).
_LOOKAHEAD = 256


def _outside_strings(text: str, start: int = 0) -> Iterator[tuple[int, str]]:
    """(index, character) of `text` from `start`, skipping what is inside
    JSON strings (their quotes are yielded: they open and close them)."""
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                yield i, ch
            continue
        if ch == '"':
            in_string = True
        yield i, ch


def _balanced_object(text: str) -> str | None:
    """The first balanced `{...}` in `text`, aware of JSON strings."""
    start = text.find("{")
    while start != -1:
        depth = 0
        for i, ch in _outside_strings(text, start):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def _without_trailing_commas(text: str) -> str:
    """`text` without the commas that directly precede `}` or `]`, outside strings."""
    dropped = set()
    for i, ch in _outside_strings(text):
        if ch == ",":
            rest = text[i + 1 : i + 1 + _LOOKAHEAD].lstrip()
            if rest[:1] in ("}", "]"):
                dropped.add(i)
    if not dropped:
        return text
    return "".join(ch for i, ch in enumerate(text) if i not in dropped)


def parse_json_answer(text: str) -> Any:
    """Decode the model's answer: bare JSON, fenced JSON or JSON inside prose,
    with raw control characters in strings and trailing commas tolerated."""
    stripped = text.strip()
    candidates = [stripped]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    obj = _balanced_object(text)
    if obj is not None:
        candidates.append(obj)
    for candidate in candidates:
        if not candidate:
            continue
        for attempt in (candidate, _without_trailing_commas(candidate)):
            try:
                # strict=False: llama.cpp's grammar lets raw newlines into strings.
                return json.loads(attempt, strict=False)
            except json.JSONDecodeError:
                continue
    raise ExtractionError(
        "the answer is not valid JSON (truncated or malformed)", category="invalid_answer"
    )


def invalid_answer(reason: str) -> ExtractionError:
    return ExtractionError(reason, category="invalid_answer")


def validate_operations(data: Any, existing: Sequence[Memory]) -> list[Operation]:
    """Check the decoded answer and resolve aliases; all or nothing."""
    if not isinstance(data, dict):
        raise invalid_answer(f"expected a JSON object, got {type(data).__name__}")
    raw = data.get("operations")
    if not isinstance(raw, list):
        raise invalid_answer("`operations` is missing or not a list")
    aliases = {str(i): m.id for i, m in enumerate(existing)}
    touched: set[str] = set()
    ops: list[Operation] = []
    for n, item in enumerate(raw):
        where = f"operations[{n}]"
        if not isinstance(item, dict):
            raise invalid_answer(f"{where} is not an object")
        op = item.get("op")
        if not isinstance(op, str) or op.strip().upper() not in _OPS:
            raise invalid_answer(f"{where}: unknown op {op!r}")
        op = op.strip().upper()
        if op == "NONE":
            continue
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise invalid_answer(f"{where}: text must be a string")
        text = text.strip() if text else None
        if op in ("ADD", "UPDATE"):
            if not text:
                raise invalid_answer(f"{where}: {op} without text")
            if len(text) > MAX_FACT_CHARS:
                raise invalid_answer(f"{where}: text longer than {MAX_FACT_CHARS} characters")
        if op == "ADD":
            ops.append(Operation(op="ADD", text=text))
            continue
        alias = item.get("id")
        if isinstance(alias, int) and not isinstance(alias, bool):
            alias = str(alias)
        if not isinstance(alias, str):
            raise invalid_answer(f"{where}: {op} needs the id of a stored fact")
        alias = alias.strip()
        if alias not in aliases:
            raise invalid_answer(f"{where}: unknown id {alias!r}")
        if alias in touched:
            raise invalid_answer(f"{where}: more than one operation on id {alias!r}")
        touched.add(alias)
        if op == "UPDATE":
            ops.append(Operation(op="UPDATE", memory_id=aliases[alias], text=text))
        else:
            ops.append(Operation(op="DELETE", memory_id=aliases[alias]))
    return ops
