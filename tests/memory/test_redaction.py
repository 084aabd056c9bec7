# ruff: noqa: RUF001 - full-width CJK punctuation is meant literally here.
"""Secrets never reach the extraction LLM, the spool or the store."""

from datetime import UTC, datetime

import pytest

from memory.models import Exchange, Scope
from memory.redaction import REDACTED, redact, redact_exchange

SECRETS = [
    "sk-abcdefghijklmnopqrstuvwxyz0123456789",
    "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz_0123456789-xyz",
    "sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "xoxb-1234567890-abcdefghijklmnop",
    "sk_live_51H8abcdefghijklmnopqrstuv",
    "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
]


@pytest.mark.parametrize("secret", SECRETS)
def test_tokens_with_a_known_shape_are_masked(secret):
    out = redact(f"here you go: {secret} thanks")
    assert secret not in out
    assert out == f"here you go: {REDACTED} thanks"


def test_bearer_tokens_keep_the_word_but_lose_the_token():
    out = redact("curl -H 'Authorization: Bearer abc123def456ghi789jkl'")
    assert "abc123def456ghi789jkl" not in out
    assert f"Bearer {REDACTED}" in out


def test_pem_private_keys_are_masked_whole():
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----"
    assert redact(f"key:\n{key}\nend") == f"key:\n{REDACTED}\nend"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my password is hunter2!", f"my password is {REDACTED}"),
        ("Password: correct-horse-battery", f"Password: {REDACTED}"),
        ("set api_key=abc123 in the env", f"set api_key={REDACTED} in the env"),
        ('"client_secret": "s3cr3t"', f'"client_secret": "{REDACTED}"'),
        ("my PIN is 4821, don't tell", f"my PIN is {REDACTED}, don't tell"),
        ("token: abcdef", f"token: {REDACTED}"),
        ("我的密码是abc123，别告诉别人", f"我的密码是{REDACTED}，别告诉别人"),
        ("支付密码：889900。", f"支付密码：{REDACTED}。"),
        ("WiFi 密码为 qwerty2024", f"WiFi 密码为 {REDACTED}"),
    ],
)
def test_secret_assignments_keep_the_sentence_but_not_the_value(text, expected):
    assert redact(text).rstrip("!") == expected


def test_card_numbers_are_masked_only_when_luhn_valid():
    assert redact("card 4111 1111 1111 1111 exp 12/29") == f"card {REDACTED} exp 12/29"
    assert redact("card 4111-1111-1111-1111") == f"card {REDACTED}"
    # Same length, checksum wrong: an order number, not a card.
    assert redact("order 4111 1111 1111 1112") == "order 4111 1111 1111 1112"


def test_iban_is_masked_when_its_checksum_holds():
    assert redact("IBAN DE89 3704 0044 0532 0130 00 please") == f"IBAN {REDACTED} please"
    assert redact("ref DE00 3704 0044 0532 0130 00 please") == (
        "ref DE00 3704 0044 0532 0130 00 please"
    )


@pytest.mark.parametrize(
    "text",
    [
        "I moved to Berlin in 2023 and my phone is +49 30 1234567.",
        "My secret is that I love pineapple pizza.",
        "我住在上海，喜欢喝乌龙茶。",
        "The meeting is on 2026-03-14 at 10:30.",
        "I have a token collection from arcades.",
    ],
)
def test_ordinary_facts_are_left_alone(text):
    assert redact(text) == text


def test_redaction_is_idempotent():
    once = redact("password: hunter2 and sk-abcdefghijklmnopqrstuvwxyz0123")
    assert redact(once) == once


def test_exchange_messages_parts_and_reply_are_redacted():
    exchange = Exchange(
        scope=Scope(user_id="u"),
        messages=[
            {"role": "user", "content": "my password is hunter2"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "key sk-abcdefghijklmnopqrstuvwxyz0123"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                ],
            },
        ],
        reply="Saved AKIAIOSFODNN7EXAMPLE for you",
        at=datetime(2026, 3, 14, tzinfo=UTC),
    )
    out = redact_exchange(exchange)
    assert out.messages[0]["content"] == f"my password is {REDACTED}"
    assert out.messages[1]["content"][0]["text"] == f"key {REDACTED}"
    assert out.messages[1]["content"][1] == exchange.messages[1]["content"][1]
    assert out.reply == f"Saved {REDACTED} for you"
    # The original is untouched: the caller's request body is not ours to change.
    assert exchange.messages[0]["content"] == "my password is hunter2"
