"""Bounding text by size: token estimates, clipping, and the memory-search query.

A user can paste megabytes into a chat. Everything downstream has a budget:
the extraction model's context window (tokens), the spool and redaction (time
proportional to characters), the search (time proportional to the query). The
functions here keep each text inside its budget, in time linear in its length
and without a Python loop over its characters, so they are safe on 20 MB.

Clipping keeps the head and, larger, the tail: the end of a long paste is
usually what the user is asking about.
"""

from __future__ import annotations

from typing import Any

import msgspec

from memory.models import Exchange

# Token estimate, in hundredths of a token. Not any one tokenizer's count: an
# upper bound meant to hold for the small models people run locally, whose
# vocabularies are the least efficient. English is ~0.25 tokens a character
# on them; SmolLM2 spends 1.86 tokens on a Chinese character (13,030 for
# 7,000), so 0.63 per UTF-8 byte (1.89 a Chinese character), which also
# covers other scripts (2-byte Cyrillic or Greek at 1.26); and several tokenizers (SmolLM2's,
# Llama 2's) give every digit its own token.
ASCII_COST = 30
DIGIT_COST = 100
NON_ASCII_BYTE_COST = 63

# Between the head and the tail of a clipped text.
OMISSION_MARKER = "\n[... {} characters left out ...]\n"
# Of what a clipped text keeps, the head gets this share; the tail the rest.
HEAD_SHARE = 1 / 3

# The memory-search query of a long user text: a short head (what the paste
# is) and a long tail (usually the question), so search time is bounded.
SEARCH_QUERY_HEAD_CHARS = 200
SEARCH_QUERY_TAIL_CHARS = 1800
SEARCH_QUERY_SEPARATOR = "\n…\n"

_DIGITS = b"0123456789"
_NON_ASCII = bytes(range(128, 256))
# How much of a text's ends is looked at per step when skipping whitespace.
_STRIP_CHUNK = 4096

__all__ = [
    "ASCII_COST",
    "DIGIT_COST",
    "HEAD_SHARE",
    "NON_ASCII_BYTE_COST",
    "OMISSION_MARKER",
    "SEARCH_QUERY_HEAD_CHARS",
    "SEARCH_QUERY_SEPARATOR",
    "SEARCH_QUERY_TAIL_CHARS",
    "clip_chars",
    "clip_exchange_texts",
    "clip_middle",
    "estimate_tokens",
    "search_query",
]


def estimate_tokens(text: str) -> int:
    """A conservative token count of `text` for any common tokenizer.

    0.3 a non-digit ASCII character, 1 a digit, 0.63 per UTF-8 byte of the
    others (1.89 a Chinese character). Linear, in C: ~0.1 s for 20 MB.
    """
    if not text:
        return 0
    if text.isascii():
        data = text.encode("ascii")
        non_ascii = 0
    else:
        # surrogatepass: a lone surrogate (from JSON's "\ud800") counts as 3 bytes.
        data = text.encode("utf-8", "surrogatepass")
        non_ascii = len(data) - len(data.translate(None, _NON_ASCII))
    digits = len(data) - len(data.translate(None, _DIGITS))
    other = len(data) - non_ascii - digits
    return (ASCII_COST * other + DIGIT_COST * digits + NON_ASCII_BYTE_COST * non_ascii + 99) // 100


def _marker(left_out: int) -> str:
    return OMISSION_MARKER.format(left_out)


def _longest_prefix(text: str, limit: int, budget: int) -> int:
    """The most characters of `text[:limit]`, from its start, that estimate within `budget`."""
    # Every character costs at least ASCII_COST hundredths.
    lo, hi = 0, min(limit, budget * 100 // ASCII_COST)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _longest_suffix(text: str, limit: int, budget: int) -> int:
    """The most characters of `text[-limit:]`, from its end, that estimate within `budget`."""
    n = len(text)
    lo, hi = 0, min(limit, budget * 100 // ASCII_COST)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_tokens(text[n - mid :]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def clip_middle(text: str, max_tokens: int) -> str:
    """`text` if it fits `max_tokens` (estimated), else its head and tail around
    a marker saying how many characters were left out, fitting `max_tokens`.

    The tail gets about two thirds: what a user asked last matters most. Below
    the marker's own cost, only the tail is kept, without a marker.
    """
    if max_tokens <= 0:
        return ""
    if estimate_tokens(text) <= max_tokens:
        return text
    n = len(text)
    # The count in the marker has at most as many digits as len(text).
    budget = max_tokens - estimate_tokens(_marker(n))
    if budget <= 0:
        keep = _longest_suffix(text, n, max_tokens)
        return text[n - keep :] if keep else ""
    head_budget = int(budget * HEAD_SHARE)
    head = _longest_prefix(text, n, head_budget)
    # Whatever the head did not use goes to the tail.
    tail = _longest_suffix(text, n - head, budget - estimate_tokens(text[:head]))
    # The estimate is subadditive (each part rounds up), so the whole fits.
    return f"{text[:head]}{_marker(n - head - tail)}{text[n - tail :]}"


def clip_chars(text: str, max_chars: int) -> str:
    """`text` if it has at most `max_chars` characters, else its head and tail
    (two thirds) around the omission marker, `max_chars` characters in all.

    Below the marker's own length, only the tail is kept, without a marker.
    """
    n = len(text)
    if n <= max_chars:
        return text
    if max_chars <= 0:
        return ""
    keep = max_chars - len(_marker(n))
    if keep <= 0:
        return text[n - max_chars :]
    head = int(keep * HEAD_SHARE)
    tail = keep - head
    return f"{text[:head]}{_marker(n - head - tail)}{text[n - tail :]}"


def _clip_content(content: Any, max_chars: int) -> Any:
    if isinstance(content, str):
        return clip_chars(content, max_chars)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = part["text"]
                clipped = clip_chars(text, max_chars)
                if clipped is not text:
                    part = {**part, "text": clipped}
            parts.append(part)
        return parts
    return content


def clip_exchange_texts(exchange: Exchange, max_chars: int) -> Exchange:
    """A copy of the exchange whose message texts (string contents and the text
    of list parts) and reply each have at most `max_chars` characters.

    Used when an exchange is recorded, so that redaction, the spool and
    extraction work on bounded text whatever the user pasted. Message dicts
    are copied only where a text changes; other fields are shared.
    """
    messages = []
    for message in exchange.messages:
        if isinstance(message, dict) and "content" in message:
            content = message["content"]
            clipped = _clip_content(content, max_chars)
            if clipped is not content:
                message = {**message, "content": clipped}
        messages.append(message)
    reply = clip_chars(exchange.reply, max_chars) if exchange.reply is not None else None
    return msgspec.structs.replace(exchange, messages=messages, reply=reply)


def _content_start(text: str) -> int:
    """Index of the first non-whitespace character (len(text) if none)."""
    start, n = 0, len(text)
    while start < n:
        chunk = text[start : start + _STRIP_CHUNK]
        stripped = chunk.lstrip()
        if stripped:
            return start + len(chunk) - len(stripped)
        start += len(chunk)
    return n


def _content_end(text: str) -> int:
    """Index after the last non-whitespace character (0 if none)."""
    end = len(text)
    while end > 0:
        chunk = text[max(0, end - _STRIP_CHUNK) : end]
        stripped = chunk.rstrip()
        if stripped:
            return end - len(chunk) + len(stripped)
        end -= len(chunk)
    return 0


def search_query(text: str) -> str:
    """The memory-search query for a user text: the text, stripped, if short;
    else its first SEARCH_QUERY_HEAD_CHARS and last SEARCH_QUERY_TAIL_CHARS
    characters joined by SEARCH_QUERY_SEPARATOR.

    Search time grows with the query, so this bounds it whatever was pasted;
    the question is usually at the end of a long paste. Cost does not depend
    on the text's length.
    """
    start, end = _content_start(text), _content_end(text)
    if end <= start:
        return ""
    if end - start <= SEARCH_QUERY_HEAD_CHARS + SEARCH_QUERY_TAIL_CHARS:
        return text[start:end]
    head = text[start : start + SEARCH_QUERY_HEAD_CHARS].rstrip()
    tail = text[end - SEARCH_QUERY_TAIL_CHARS : end].lstrip()
    return f"{head}{SEARCH_QUERY_SEPARATOR}{tail}"
