"""Search over memories: where a request gets its memories.

- `scope_index`: one scope's active rows, vectors and n-gram BM25 in memory;
  `arrow_rows` reads its loaded rows lazily from their Arrow table.
- `scope_cache`: the LRU of scope indexes, bounded by bytes.
- `ngram_index`: BM25 over 1-3 character n-grams (the full-text side).
- `fusion`: merging the cosine and full-text top lists.
- `searcher`: `MemoryStore.search` and `related` (cache or LanceDB).
- `coherence`: keeping the cache equal to the table across processes.
- `recent`: the recent-search memo that answers the extraction's `related`.

The last three are mixins of `memory.store.MemoryStore`: they share its
tables, writer lock and cache state.
"""
