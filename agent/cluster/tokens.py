"""k3s-style join tokens: a pin on the cluster CA plus a one-time secret.

A token reads `K10<ca hash>::<token id>.<secret>`:

- `ca hash`: 64 hex digits, the SHA-256 of the cluster CA certificate's DER bytes (`ClusterCA.fingerprint` without
  its "sha256:" prefix). The joiner fetches the CA certificate without verification, checks it against this hash
  (`check_pin`) and only then talks TLS to the cluster and sends the secret, so a man in the middle learns nothing.
- `token id`: 6 hex digits, public; it lets the leader find the one record to check.
- `secret`: 32 random bytes as 52 characters of lowercase RFC 4648 base32 without padding (a-z, 2-7). Base32
  rather than base64 because a person may type it from a label: one case, no look-alike '-'/'_', no 0/1/8.

Parsing strips surrounding whitespace and ignores letter case (caps lock), normalising to the canonical form that
`str()` gives back. A secret never appears in a repr or an error message.

The leader stores a `TokenRecord` per outstanding token: only the SHA-256 of the secret. A plain hash suffices (no
salt, no slow KDF) because the secret is 256 random bits: there is no dictionary to precompute against.
Consuming a token (`TokenRecord.mark_used`) must be written with a compare-and-swap (an etcd transaction on the
record's revision) so two joiners racing with one token cannot both pass.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from agent.cluster.pki import FINGERPRINT_PREFIX, PkiError, ca_fingerprint
from agent.errors import ThoxError

PREFIX = "K10"
SEPARATOR = "::"
ID_SEPARATOR = "."
TOKEN_ID_CHARS = 6
SECRET_BYTES = 32
SECRET_CHARS = 52  # ceil(32 * 8 / 5): 256 bits in base32 without padding
CA_HASH_CHARS = 64

# Tokens a person types (`thox cluster join <token>`) get an hour: time to walk to the other box, find the
# command, and retry a typo. Offers carried over NFC at the moment two boxes are stacked are consumed within
# seconds; the NFC path passes NFC_OFFER_TTL_SECONDS so that an offer left on a tag is soon worthless.
DEFAULT_TOKEN_TTL_SECONDS = 3600
NFC_OFFER_TTL_SECONDS = 600

_HEX = re.compile(r"^[0-9a-f]*$")
_BASE32 = re.compile(r"^[a-z2-7]*$")


class TokenError(ThoxError):
    """A join token is malformed, unknown, expired, used, wrong, or pins another CA; `code` says which."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class TokenRecordError(ThoxError, ValueError):
    """A stored TokenRecord is damaged (a fault on the leader's side, not the joiner's)."""


def _malformed(message: str) -> TokenError:
    return TokenError(message, code="token_malformed")


def _check_ca_hash(ca_hash: str) -> None:
    if len(ca_hash) != CA_HASH_CHARS:
        raise _malformed(
            f"join token's CA hash (after '{PREFIX}') must be {CA_HASH_CHARS} hex digits, got {len(ca_hash)} "
            "characters; copy the whole token"
        )
    if not _HEX.fullmatch(ca_hash):
        position = next(i for i, c in enumerate(ca_hash) if c not in "0123456789abcdef")
        raise _malformed(
            f"join token's CA hash has a character that is not a hex digit (0-9, a-f) at position "
            f"{position + len(PREFIX) + 1}: {ca_hash[position]!r}"
        )


def _check_token_id(token_id: str) -> None:
    # Neither message quotes the id: with a mangled token, secret characters may have landed in it.
    where = f"join token's id (between {SEPARATOR!r} and {ID_SEPARATOR!r})"
    if len(token_id) != TOKEN_ID_CHARS:
        raise _malformed(f"{where} must be {TOKEN_ID_CHARS} hex digits, got {len(token_id)} characters")
    if not _HEX.fullmatch(token_id):
        raise _malformed(f"{where} must be {TOKEN_ID_CHARS} hex digits (0-9, a-f), got another character")


def _decode_secret(secret: str) -> bytes:
    # Messages give lengths and positions, never the secret's characters.
    if len(secret) != SECRET_CHARS:
        raise _malformed(
            f"join token's secret (after '{ID_SEPARATOR}') must be {SECRET_CHARS} base32 characters, "
            f"got {len(secret)}; copy the whole token"
        )
    if not _BASE32.fullmatch(secret):
        position = next(i for i, c in enumerate(secret) if c not in "abcdefghijklmnopqrstuvwxyz234567")
        raise _malformed(
            f"join token's secret has a character that is not base32 (a-z, 2-7) at position {position + 1} "
            "of the secret"
        )
    try:
        raw = base64.b32decode(secret.upper() + "====")
    except binascii.Error:
        raw = b""
    # 52 characters hold 260 bits; the last 4 must be zero or two texts would name one secret.
    if len(raw) != SECRET_BYTES or _encode_secret(raw) != secret:
        raise _malformed("join token's secret is not a valid encoding (its last character is wrong)")
    return raw


def _encode_secret(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token; every instance is well formed (checked on construction)."""

    ca_hash: str
    token_id: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        _check_ca_hash(self.ca_hash)
        _check_token_id(self.token_id)
        _decode_secret(self.secret)

    def __str__(self) -> str:
        return f"{PREFIX}{self.ca_hash}{SEPARATOR}{self.token_id}{ID_SEPARATOR}{self.secret}"

    @property
    def secret_bytes(self) -> bytes:
        """The 32 random bytes the secret encodes."""
        return _decode_secret(self.secret)

    @property
    def ca_fingerprint(self) -> str:
        """The pinned CA in `ClusterCA.fingerprint` form ('sha256:<hex>')."""
        return FINGERPRINT_PREFIX + self.ca_hash

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """A token from its text; TokenError (code token_malformed) saying exactly what is wrong otherwise."""
        text = text.strip()
        if not text:
            raise _malformed("join token is empty")
        if text[: len(PREFIX)].upper() != PREFIX:
            raise _malformed(f"join token must start with {PREFIX!r} (tokens read 'K10<CA hash>::<id>.<secret>')")
        body = text[len(PREFIX) :]
        if SEPARATOR not in body:
            raise _malformed(f"join token has no {SEPARATOR!r} between the CA hash and the credentials")
        ca_hash, credentials = body.split(SEPARATOR, 1)
        _check_ca_hash(ca_hash.lower())
        if ID_SEPARATOR not in credentials:
            raise _malformed(
                f"join token's credentials (after {SEPARATOR!r}) must read '<token id>{ID_SEPARATOR}<secret>'; "
                f"there is no {ID_SEPARATOR!r}"
            )
        token_id, secret = credentials.split(ID_SEPARATOR, 1)
        return cls(ca_hash.lower(), token_id.lower(), secret.lower())

    @classmethod
    def generate(cls, ca_fingerprint: str) -> JoinToken:
        """A fresh token pinning the CA with this fingerprint ('sha256:<hex>' or bare hex)."""
        ca_hash = ca_fingerprint.removeprefix(FINGERPRINT_PREFIX).lower()
        return cls(ca_hash, secrets.token_hex(TOKEN_ID_CHARS // 2), _encode_secret(secrets.token_bytes(SECRET_BYTES)))


def _hash_secret(token: JoinToken) -> str:
    return hashlib.sha256(token.secret_bytes).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """The leader's record of one outstanding token: its id, the SHA-256 of its secret, its lifetime, whether used."""

    token_id: str
    secret_hash: str
    created: float
    expires: float
    used: bool = False

    @classmethod
    def for_token(cls, token: JoinToken, ttl_seconds: float, now: float) -> TokenRecord:
        """The record for a newly generated token, valid for `ttl_seconds` from `now` (unix seconds)."""
        if ttl_seconds <= 0:
            raise ValueError(f"token lifetime must be positive, not {ttl_seconds}")
        return cls(token.token_id, _hash_secret(token), float(now), float(now) + ttl_seconds)

    def mark_used(self) -> TokenRecord:
        """This record after a successful join (store it with a compare-and-swap)."""
        return dataclasses.replace(self, used=True)

    def to_json(self) -> str:
        """The record as compact JSON text."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TokenRecord:
        """A record from `to_json` text; TokenRecordError naming the problem if the stored record is damaged."""
        try:
            data: Any = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenRecordError(f"join token record is not JSON: {exc}") from None
        fields = {"token_id", "secret_hash", "created", "expires", "used"}
        if not isinstance(data, dict) or set(data) != fields:
            raise TokenRecordError(f"join token record must be an object with exactly the keys {sorted(fields)}")
        token_id, secret_hash, used = data["token_id"], data["secret_hash"], data["used"]
        created, expires = data["created"], data["expires"]
        if not isinstance(token_id, str) or len(token_id) != TOKEN_ID_CHARS or not _HEX.fullmatch(token_id):
            raise TokenRecordError(f"join token record's token_id is invalid: {token_id!r}")
        if not isinstance(secret_hash, str) or len(secret_hash) != 64 or not _HEX.fullmatch(secret_hash):
            raise TokenRecordError("join token record's secret_hash must be 64 lowercase hex digits")
        for name, value in (("created", created), ("expires", expires)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TokenRecordError(f"join token record's {name} must be a number of unix seconds, not {value!r}")
        if not isinstance(used, bool):
            raise TokenRecordError(f"join token record's used must be true or false, not {used!r}")
        return cls(token_id, secret_hash, float(created), float(expires), used)


def check(record: TokenRecord | None, token: JoinToken, now: float) -> None:
    """Pass if `token` may join now according to its `record` (None: no record for its id); TokenError otherwise."""
    if record is None or record.token_id != token.token_id:
        raise TokenError(
            f"join token {token.token_id} is not known to this cluster; ask for a new token", code="token_unknown"
        )
    # The secret is checked before the record's state so that only a holder of the secret learns whether the
    # token was used or has expired. Constant-time, although comparing hashes leaks little even if it were not.
    if not hmac.compare_digest(_hash_secret(token), record.secret_hash):
        raise TokenError(
            f"join token {token.token_id} has the wrong secret; check that it was copied exactly", code="token_invalid"
        )
    if record.used:
        raise TokenError(
            f"join token {token.token_id} was already used; each token admits one node, ask for a new one",
            code="token_used",
        )
    if now >= record.expires:
        raise TokenError(
            f"join token {token.token_id} expired {int(now - record.expires)} s ago; ask for a new token",
            code="token_expired",
        )


def pins(token: JoinToken, ca_cert_pem: bytes) -> bool:
    """Whether `ca_cert_pem` is the CA certificate `token` pins (False for an unreadable certificate too)."""
    try:
        fingerprint = ca_fingerprint(ca_cert_pem)
    except PkiError:
        return False
    return hmac.compare_digest(fingerprint, token.ca_fingerprint)


def check_pin(token: JoinToken, ca_cert_pem: bytes) -> None:
    """Pass if `ca_cert_pem` is the pinned CA; TokenError (code ca_mismatch) before any secret is sent otherwise."""
    try:
        fingerprint = ca_fingerprint(ca_cert_pem)
    except PkiError as exc:
        raise TokenError(f"the cluster sent an unreadable CA certificate: {exc}", code="ca_mismatch") from None
    if not hmac.compare_digest(fingerprint, token.ca_fingerprint):
        raise TokenError(
            f"the cluster's CA certificate ({fingerprint}) is not the one this join token pins "
            f"({token.ca_fingerprint}); it belongs to another cluster or someone is intercepting the join. "
            "The secret was not sent",
            code="ca_mismatch",
        )
