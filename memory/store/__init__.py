"""The memory store: per-user facts in LanceDB (see `memory.store.facade`).

Modules, one concern each: `facade` (`MemoryStore`: open and the CRUD API),
`reads`, `commit` (the commit protocol), `tables` (table lifecycle),
`apply` (the grouped apply queue), `plan` (the extraction plan, pure),
`imports`. Search and its cache are `memory.search`; row shapes `memory.rows`.
"""

from memory.rows import normalized_hash
from memory.schema import EmbedderMismatch
from memory.store.commit import CHANGES_FILE, WRITES_LOCK
from memory.store.facade import MemoryStore

__all__ = ["CHANGES_FILE", "WRITES_LOCK", "EmbedderMismatch", "MemoryStore", "normalized_hash"]
