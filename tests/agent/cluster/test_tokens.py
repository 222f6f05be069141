"""Join tokens: format, precise parse errors, the leader's checks, the CA pin."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cluster.pki import ClusterCA
from agent.cluster.tokens import (
    DEFAULT_TOKEN_TTL_SECONDS,
    JoinToken,
    TokenError,
    TokenRecord,
    TokenRecordError,
    check,
    check_pin,
    pins,
)

HASH = "0123456789abcdef" * 4
TOKEN_ID = "a1b2c3"
SECRET = base64.b32encode(bytes(range(32))).decode().rstrip("=").lower()
TEXT = f"K10{HASH}::{TOKEN_ID}.{SECRET}"
SHAPE = re.compile(r"^K10[0-9a-f]{64}::[0-9a-f]{6}\.[a-z2-7]{52}$")
NOW = 1_750_000_000.0


@pytest.fixture(scope="module")
def ca() -> ClusterCA:
    return ClusterCA.create("stack-1")


def test_generated_token_has_the_documented_shape_and_pins_the_ca(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.fingerprint)
    assert SHAPE.fullmatch(str(token))
    assert token.ca_hash == ca.fingerprint.removeprefix("sha256:")
    assert token.ca_fingerprint == ca.fingerprint
    assert len(token.secret_bytes) == 32
    assert JoinToken.parse(str(token)) == token


def test_generate_accepts_a_bare_hex_hash_and_makes_fresh_secrets() -> None:
    first, second = JoinToken.generate(HASH), JoinToken.generate("sha256:" + HASH)
    assert first.ca_hash == second.ca_hash == HASH
    assert first.secret != second.secret


def test_parse_gives_the_parts_and_str_gives_the_text_back() -> None:
    token = JoinToken.parse(TEXT)
    assert (token.ca_hash, token.token_id, token.secret) == (HASH, TOKEN_ID, SECRET)
    assert token.secret_bytes == bytes(range(32))
    assert str(token) == TEXT


def test_parse_forgives_surrounding_space_and_letter_case() -> None:
    assert JoinToken.parse(f"  {TEXT.upper()}\n") == JoinToken.parse(TEXT)


def test_secret_never_shows_in_repr() -> None:
    assert SECRET not in repr(JoinToken.parse(TEXT))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "join token is empty"),
        ("   \n", "join token is empty"),
        (f"K11{HASH}::{TOKEN_ID}.{SECRET}", "join token must start with 'K10'"),
        (f"{TOKEN_ID}.{SECRET}", "join token must start with 'K10'"),
        (f"K10{HASH}{TOKEN_ID}.{SECRET}", "join token has no '::' between the CA hash and the credentials"),
        (f"K10{HASH}:{TOKEN_ID}.{SECRET}", "join token has no '::'"),
        (f"K10{HASH[:-1]}::{TOKEN_ID}.{SECRET}", "CA hash (after 'K10') must be 64 hex digits, got 63 characters"),
        (f"K10{HASH}0::{TOKEN_ID}.{SECRET}", "must be 64 hex digits, got 65 characters"),
        (f"K10{HASH[:9]}g{HASH[10:]}::{TOKEN_ID}.{SECRET}", "not a hex digit (0-9, a-f) at position 13: 'g'"),
        (f"K10{HASH}::{TOKEN_ID}{SECRET}", "credentials (after '::') must read '<token id>.<secret>'; there is no '.'"),
        (f"K10{HASH}::{TOKEN_ID[:5]}.{SECRET}", "id (between '::' and '.') must be 6 hex digits, got 5 characters"),
        (f"K10{HASH}::a1b2cz.{SECRET}", "id (between '::' and '.') must be 6 hex digits (0-9, a-f), got another"),
        (f"K10{HASH}::{TOKEN_ID}.{SECRET[:-1]}", "secret (after '.') must be 52 base32 characters, got 51"),
        (f"K10{HASH}::{TOKEN_ID}.{SECRET}a", "secret (after '.') must be 52 base32 characters, got 53"),
        (f"K10{HASH}::{TOKEN_ID}.{SECRET[:4]}1{SECRET[5:]}", "not base32 (a-z, 2-7) at position 5 of the secret"),
        (f"K10{HASH}::{TOKEN_ID}.{SECRET[:4]}-{SECRET[5:]}", "not base32 (a-z, 2-7) at position 5 of the secret"),
        (f"K10{HASH}::{TOKEN_ID}.{SECRET[:-1]}b", "secret is not a valid encoding (its last character is wrong)"),
    ],
)
def test_every_malformed_token_gets_its_own_message(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=re.escape(message)) as caught:
        JoinToken.parse(text)
    assert caught.value.code == "token_malformed"
    assert caught.value.message == str(caught.value)
    assert SECRET[:20] not in str(caught.value)


def test_constructing_a_bad_token_directly_is_refused() -> None:
    with pytest.raises(TokenError, match="must be 6 hex digits"):
        JoinToken(HASH, "xyz", SECRET)
    with pytest.raises(TokenError, match="must be 64 hex digits"):
        JoinToken.generate("sha256:abc")


# The leader's record and checks.


def _record(token: JoinToken, **changes: object) -> TokenRecord:
    record = TokenRecord.for_token(token, ttl_seconds=600, now=NOW)
    return TokenRecord.from_json(json.dumps({**json.loads(record.to_json()), **changes}))


def test_record_stores_only_the_hash_of_the_secret() -> None:
    token = JoinToken.parse(TEXT)
    record = TokenRecord.for_token(token, ttl_seconds=DEFAULT_TOKEN_TTL_SECONDS, now=NOW)
    assert record == TokenRecord(TOKEN_ID, hashlib.sha256(bytes(range(32))).hexdigest(), NOW, NOW + 3600, False)
    assert SECRET not in record.to_json()
    assert TokenRecord.from_json(record.to_json()) == record
    assert TokenRecord.from_json(record.to_json().encode()) == record
    assert record.mark_used() == TokenRecord(record.token_id, record.secret_hash, NOW, NOW + 3600, True)


def test_record_needs_a_positive_lifetime() -> None:
    with pytest.raises(ValueError, match="token lifetime must be positive, not 0"):
        TokenRecord.for_token(JoinToken.parse(TEXT), ttl_seconds=0, now=NOW)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not JSON"),
        ("[]", "must be an object with exactly the keys"),
        ('{"token_id":"a1b2c3"}', "must be an object with exactly the keys"),
        (
            '{"token_id":"A1","secret_hash":"' + "0" * 64 + '","created":1,"expires":2,"used":false}',
            "token_id is invalid: 'A1'",
        ),
        ('{"token_id":"a1b2c3","secret_hash":"xyz","created":1,"expires":2,"used":false}', "secret_hash must be"),
        (
            '{"token_id":"a1b2c3","secret_hash":"' + "0" * 64 + '","created":"1","expires":2,"used":false}',
            "created must be a number of unix seconds, not '1'",
        ),
        (
            '{"token_id":"a1b2c3","secret_hash":"' + "0" * 64 + '","created":1,"expires":true,"used":false}',
            "expires must be a number of unix seconds, not True",
        ),
        (
            '{"token_id":"a1b2c3","secret_hash":"' + "0" * 64 + '","created":1,"expires":2,"used":0}',
            "used must be true or false, not 0",
        ),
    ],
)
def test_damaged_record_is_refused_precisely(text: str, message: str) -> None:
    with pytest.raises(TokenRecordError, match=re.escape(message)):
        TokenRecord.from_json(text)


def test_check_passes_a_fresh_token_until_just_before_expiry() -> None:
    token = JoinToken.parse(TEXT)
    record = _record(token)
    check(record, token, NOW)
    check(record, token, NOW + 599.9)


def _refusal(record: TokenRecord | None, token: JoinToken, now: float) -> TokenError:
    with pytest.raises(TokenError) as caught:
        check(record, token, now)
    return caught.value


def test_unknown_token_is_refused() -> None:
    token = JoinToken.parse(TEXT)
    error = _refusal(None, token, NOW)
    assert error.code == "token_unknown"
    assert str(error) == "join token a1b2c3 is not known to this cluster; ask for a new token"
    assert _refusal(_record(token, token_id="ffffff"), token, NOW).code == "token_unknown"


def test_wrong_secret_is_refused() -> None:
    token = JoinToken.parse(TEXT)
    other = JoinToken(HASH, TOKEN_ID, SECRET[:10] + ("b" if SECRET[10] != "b" else "c") + SECRET[11:])
    error = _refusal(_record(token), other, NOW)
    assert error.code == "token_invalid"
    assert "has the wrong secret" in str(error)


def test_used_token_is_refused() -> None:
    token = JoinToken.parse(TEXT)
    error = _refusal(_record(token).mark_used(), token, NOW)
    assert error.code == "token_used"
    assert "was already used; each token admits one node" in str(error)


@pytest.mark.parametrize("late", [0.0, 30.0])
def test_expired_token_is_refused(late: float) -> None:
    token = JoinToken.parse(TEXT)
    error = _refusal(_record(token), token, NOW + 600 + late)
    assert error.code == "token_expired"
    assert f"expired {int(late)} s ago" in str(error)


def test_only_a_holder_of_the_secret_learns_that_a_token_was_used_or_expired() -> None:
    token = JoinToken.parse(TEXT)
    guess = JoinToken.generate(HASH)
    guess = JoinToken(HASH, TOKEN_ID, guess.secret)
    assert _refusal(_record(token).mark_used(), guess, NOW + 10_000).code == "token_invalid"


def test_secret_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    original = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    token = JoinToken.parse(TEXT)
    record = _record(token)
    check(record, token, NOW)
    assert calls == [(record.secret_hash, record.secret_hash)]


# The CA pin.


def test_pin_matches_the_right_ca_only(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.fingerprint)
    other = ClusterCA.create("stack-1")
    assert pins(token, ca.cert_pem)
    check_pin(token, ca.cert_pem)
    assert not pins(token, other.cert_pem)
    with pytest.raises(TokenError, match="is not the one this join token pins") as caught:
        check_pin(token, other.cert_pem)
    assert caught.value.code == "ca_mismatch"
    assert other.fingerprint in str(caught.value) and ca.fingerprint in str(caught.value)
    assert token.secret not in str(caught.value)


def test_pin_refuses_an_unreadable_ca_certificate(ca: ClusterCA) -> None:
    token = JoinToken.generate(ca.fingerprint)
    assert not pins(token, b"garbage")
    with pytest.raises(TokenError, match="the cluster sent an unreadable CA certificate") as caught:
        check_pin(token, b"garbage")
    assert caught.value.code == "ca_mismatch"


# Properties.


@given(st.binary(min_size=32, max_size=32))
def test_generated_tokens_round_trip(ca_digest: bytes) -> None:
    token = JoinToken.generate("sha256:" + ca_digest.hex())
    assert JoinToken.parse(str(token)) == token


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=3, max_size=3))
def test_every_secret_round_trips(secret: bytes, token_id: bytes) -> None:
    text = base64.b32encode(secret).decode().rstrip("=").lower()
    token = JoinToken.parse(f"K10{HASH}::{token_id.hex()}.{text}")
    assert token.secret_bytes == secret
    assert str(token) == f"K10{HASH}::{token_id.hex()}.{text}"


@given(st.text(max_size=200))
def test_parse_never_fails_other_than_with_token_error(text: str) -> None:
    outcome: JoinToken | TokenError
    try:
        outcome = JoinToken.parse(text)
    except TokenError as exc:
        outcome = exc
    if isinstance(outcome, TokenError):
        assert outcome.code == "token_malformed"
    else:
        assert JoinToken.parse(str(outcome)) == outcome
