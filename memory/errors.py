"""Every error the memory library raises on purpose, and whether waiting helps.

    MemoryLibraryError
    +-- TransientError              it passes: wait and try again
    |   +-- EmbedderError           the embedder unreachable or failing
    |   |                           (memory.embedding; also a RuntimeError)
    |   +-- ExtractionUnavailable   the extraction model unreachable or
    |   |                           overloaded (memory.extraction; also an
    |   |                           ExtractionError, below)
    |   +-- StorageUnavailable      the object store holding the tables
    |                               unreachable or refusing (memory.store)
    +-- RejectedError               the input or the setup is wrong: trying
    |   |                           again gives the same answer
    |   +-- InvalidScope            an id that cannot name a user, agent or
    |   |                           session (memory.models; also a ValueError)
    |   +-- InvalidImport           a line of an import is not a memory
    |   |                           (memory.engine; also a ValueError)
    |   +-- InvalidConfig           a setting cannot be used
    +-- ExtractionError             an extraction call failed or its answer
        |                           cannot be trusted (memory.extraction);
        |                           its `category` says whether a retry can
        |                           help (memory/extraction_errors.py draws it)
        +-- ExtractionUnavailable

`TRANSIENT` is the one spelling of "this passes" for `except`: the transient
errors above plus `OSError` (a disk or socket error is not the library's own
class, but it passes too). Opening the memory retries on it
(`memory.engine.open_when_possible`); any other error is a configuration to
fix and is not waited for.

A spool job's outcome is decided in `memory.workers.WorkerPool._settle`: an
`ExtractionUnavailable` waits without spending an attempt; an
`ExtractionError` whose category is in `FOR_GOOD_CATEGORIES` fails at once;
anything else (an embedder or disk error during a job included) is retried
with backoff until `max_attempts`.
"""

from __future__ import annotations

__all__ = [
    "TRANSIENT",
    "InvalidConfig",
    "InvalidImport",
    "MemoryLibraryError",
    "RejectedError",
    "StorageUnavailable",
    "TransientError",
]


class MemoryLibraryError(Exception):
    """The base of the errors the memory library raises on purpose."""


class TransientError(MemoryLibraryError):
    """A failure that passes (an outage, an overload): waiting and trying again helps."""


class StorageUnavailable(TransientError):
    """The object store holding the tables (`storage.uri`) could not be
    reached or refused a request: LanceDB reports it as a `ValueError`, which
    would read as a configuration to fix rather than an outage to wait out."""


class RejectedError(MemoryLibraryError):
    """The input or the setup is wrong: trying again gives the same answer."""


class InvalidImport(RejectedError, ValueError):
    """A line of an import is not a memory; nothing was imported."""


class InvalidConfig(RejectedError):
    """A setting cannot be used; the message names it."""


# What "this passes, try again" catches.
TRANSIENT: tuple[type[Exception], ...] = (TransientError, OSError)
