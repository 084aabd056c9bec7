# ruff: noqa: RUF001, RUF003 - full-width CJK punctuation is meant literally here.
"""Mask secrets before a conversation reaches the extraction LLM, the spool or the store.

A memory system that remembers "my AWS key is AKIA..." turns one leaked chat into a
permanent leak. Detection is pattern based and deliberately errs on the side of
masking: a lost fact is cheaper than a stored secret. Card numbers and IBANs are
only masked when their checksum holds, so ordinary long numbers survive.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from memory.models import Exchange

REDACTED = "[REDACTED]"

# Tokens with a recognisable shape, masked wherever they appear.
_TOKENS = re.compile(
    "|".join(
        [
            # PEM private keys, whole block.
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
            # OpenAI / Anthropic style: sk-..., sk-proj-..., sk-ant-...
            r"\bsk-[A-Za-z0-9_\-]{16,}",
            # Stripe secret / restricted keys.
            r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,}",
            # AWS access key ids.
            r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b",
            # GitHub tokens.
            r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
            r"\bgithub_pat_[A-Za-z0-9_]{22,}\b",
            # Slack tokens.
            r"\bxox[abposr]-[A-Za-z0-9\-]{10,}",
            # Google API keys.
            r"\bAIza[0-9A-Za-z_\-]{35}",
            # JSON Web Tokens: header.payload.signature, both JSON parts base64url.
            r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
        ]
    )
)

# `Bearer <token>`: keep the word so the sentence still reads.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/\-]{12,}=*")

# "password: x", "my password is x", "api_key=x", "PIN is 1234".
_ASSIGNMENT = re.compile(
    r"(?i)\b("
    r"password|passwd|passcode|passphrase|pwd|pin(?:\s+code)?|"
    r"api[\s_\-]?key|access[\s_\-]?key|secret[\s_\-]?key|client[\s_\-]?secret|"
    r"access[\s_\-]?token|auth[\s_\-]?token|refresh[\s_\-]?token|private[\s_\-]?key"
    r")\b([\"']?\s*(?:is|was|was set to|=|:|：)\s*)([\"']?)([^\s\"',;，。；]+)"
)
# "secret=x", "token: x" only with an explicit `=`/`:` ("my secret is that..." is prose).
_KEY_VALUE = re.compile(r"(?i)\b(secret|token)([\"']?\s*[=:：]\s*)([\"']?)([^\s\"',;，。；]+)")
# 密码是… / 密码：… / 支付密码为… / 密钥=…
_CJK_ASSIGNMENT = re.compile(
    r"(密码|口令|密钥|秘钥|暗码|PIN码|pin码)(\s*(?:是|为|：|:|=)\s*)([^\s，。；！？、,;!?]+)"
)

# 13-19 digits, optionally grouped by spaces or dashes; confirmed by Luhn.
_CARD = re.compile(r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])")
# Country code, check digits, then 11-30 alphanumerics, optionally in groups of 4.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"[ \-]", "", m.group(0))
    if 13 <= len(digits) <= 19 and _luhn_ok(digits) and len(set(digits)) > 1:
        return REDACTED
    return m.group(0)


def _iban(m: re.Match[str]) -> str:
    return REDACTED if _iban_ok(m.group(0)) else m.group(0)


def _assignment(m: re.Match[str]) -> str:
    value = m.group(4)
    if value == REDACTED or value.startswith("[REDACTED"):
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}"


def _cjk_assignment(m: re.Match[str]) -> str:
    if m.group(3).startswith(REDACTED):
        return m.group(0)
    return f"{m.group(1)}{m.group(2)}{REDACTED}"


def redact(text: str) -> str:
    """Return `text` with every detected secret replaced by `[REDACTED]`."""
    if not text:
        return text
    text = _TOKENS.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    text = _ASSIGNMENT.sub(_assignment, text)
    text = _KEY_VALUE.sub(_assignment, text)
    text = _CJK_ASSIGNMENT.sub(_cjk_assignment, text)
    text = _IBAN.sub(_iban, text)
    text = _CARD.sub(_card, text)
    return text


def _redact_content(content: Any) -> Any:
    if isinstance(content, str):
        return redact(content)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part = {**part, "text": redact(part["text"])}
            parts.append(part)
        return parts
    return content


def redact_exchange(exchange: Exchange) -> Exchange:
    """A copy of the exchange whose message texts and reply are redacted."""
    messages = []
    for message in exchange.messages:
        if isinstance(message, dict) and "content" in message:
            message = {**message, "content": _redact_content(message["content"])}
        messages.append(message)
    reply = redact(exchange.reply) if exchange.reply is not None else None
    return msgspec.structs.replace(exchange, messages=messages, reply=reply)


def public_url(url: str) -> str:
    """`url` without user info, query or fragment: safe to log and store."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0].rsplit("@", 1)[-1]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
