"""What the extractor learned about its endpoint, kept across restarts.

Probing the structured-output modes costs a refused call per mode, and a
one-slot local server answers each refusal slowly; so the mode that worked is
stored per (endpoint, model) in a small JSON file in the data dir, with the
endpoint and model in use, for the stats page of any process to read
(`read_state`):

    {
      "version": 1,
      "endpoint": "http://127.0.0.1:8080/v1",
      "model": "/models/SmolLM2-135M-Instruct.gguf",
      "updated_at": 1760000000.0,
      "modes": [
        {"endpoint": "http://127.0.0.1:8080/v1",
         "model": "/models/SmolLM2-135M-Instruct.gguf",
         "mode": "json_object", "learned_at": 1760000000.0}
      ]
    }

No key is ever stored; endpoints are stored without user info or query
string, where a key could hide. The file is a cache: missing or corrupt, it is
started afresh (the modes are probed again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, get_args

import msgspec

from memory.redaction import public_url

Mode = Literal["json_schema", "json_object", "text"]
MODES: tuple[Mode, ...] = get_args(Mode)
# Its name in the data dir.
STATE_FILE = "extraction.json"
VERSION = 1

log = logging.getLogger("memory.extraction")


class ExtractionState:
    """The learned modes and the endpoint and model in use; saved only when changed."""

    def __init__(self, path: Path | None = None) -> None:
        # None: kept in memory only.
        self.path = path
        self.endpoint: str | None = None
        self.model: str | None = None
        self._modes: dict[tuple[str, str], tuple[Mode, float]] = {}
        self._changes = 0
        self._saved = 0
        # One save at a time, so an older snapshot never replaces a newer one.
        self._saving = asyncio.Lock()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            entries = _parse(raw)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("extraction state %s is unreadable (%s): starting afresh", path, exc)
            return
        self.endpoint, self.model, self._modes = entries

    def mode(self, endpoint: str, model: str) -> Mode | None:
        found = self._modes.get((public_url(endpoint), model))
        return found[0] if found else None

    def set_mode(self, endpoint: str, model: str, mode: Mode) -> Mode | None:
        """Remember `mode`; returns the mode it replaces (None: first learned)."""
        key = (public_url(endpoint), model)
        before = self._modes.get(key)
        if before is None or before[0] != mode:
            self._modes[key] = (mode, time.time())
            self._changes += 1
        return before[0] if before else None

    def use(self, endpoint: str, model: str) -> None:
        """The endpoint and model extraction calls go to now."""
        endpoint = public_url(endpoint)
        if (self.endpoint, self.model) != (endpoint, model):
            self.endpoint, self.model = endpoint, model
            self._changes += 1

    @property
    def dirty(self) -> bool:
        return self._changes != self._saved

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "endpoint": self.endpoint,
            "model": self.model,
            "updated_at": time.time(),
            "modes": [
                {"endpoint": e, "model": m, "mode": mode, "learned_at": at}
                for (e, m), (mode, at) in self._modes.items()
            ],
        }

    async def save(self) -> None:
        """Write the file if anything changed, atomically and off the event loop.
        A failure is logged, never raised: the state is only a cache."""
        if self.path is None or not self.dirty:
            return
        async with self._saving:
            changes = self._changes
            if changes == self._saved:
                return
            data = self.to_dict()
            try:
                await asyncio.to_thread(_write_atomically, self.path, data)
            except OSError as exc:
                log.warning("cannot save the extraction state to %s: %s", self.path, exc)
                return
            self._saved = changes


class SavedState(msgspec.Struct, frozen=True, kw_only=True):
    """The state file as another process reads it (`read_state`)."""

    # The endpoint and model extraction calls went to last.
    endpoint: str | None
    model: str | None
    # The mode learned for them (None: not learned yet).
    mode: Mode | None
    # The modes learned at `endpoint`, by model.
    modes: dict[str, Mode]
    updated_at: float | None


def read_state(path: Path) -> SavedState | None:
    """What the process running the extraction saved; None when the file is
    missing or unreadable. For the stats page of any process."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        endpoint, model, modes = _parse(raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    updated_at = raw.get("updated_at")
    here = {m: mode for (e, m), (mode, _) in modes.items() if e == endpoint}
    return SavedState(
        endpoint=endpoint,
        model=model,
        mode=here.get(model) if model else None,
        modes=here,
        updated_at=float(updated_at) if isinstance(updated_at, int | float) else None,
    )


def _parse(
    raw: Any,
) -> tuple[str | None, str | None, dict[tuple[str, str], tuple[Mode, float]]]:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    endpoint, model = raw.get("endpoint"), raw.get("model")
    if not isinstance(endpoint, str | None) or not isinstance(model, str | None):
        raise ValueError("endpoint and model must be strings")
    entries = raw.get("modes", [])
    if not isinstance(entries, list):
        raise ValueError("`modes` is not a list")
    modes: dict[tuple[str, str], tuple[Mode, float]] = {}
    for entry in entries:
        # An entry this version does not understand is skipped, not fatal.
        if not isinstance(entry, dict):
            continue
        e, m, mode, at = entry.get("endpoint"), entry.get("model"), entry.get("mode"), 0.0
        if isinstance(entry.get("learned_at"), int | float):
            at = float(entry["learned_at"])
        if isinstance(e, str) and isinstance(m, str) and mode in MODES:
            modes[(e, m)] = (mode, at)
    return endpoint, model, modes


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    """A reader (or a crash) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
