"""What an API key is: the secret's shape, names and scopes, salted hashes, the record users see, the errors.

A generated secret reads `thox_<8 hex>_<43 chars of urlsafe base64 of 32 random bytes>`; the 8 hex digits are the
public part of the record id (`key_<8 hex>`). Keys installed with `thox config set api.key VALUE` may have any
shape (32+ visible ASCII characters with some variety). Storage (the file, its lock, reloading) is
`agent.security.keys`; this module does no I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal, cast, get_args

from agent.errors import ThoxError

Scope = Literal["inference", "admin"]
Source = Literal["generated", "installed"]
SCOPES: tuple[str, ...] = get_args(Scope)
SOURCES: tuple[str, ...] = get_args(Source)
SECRET_PREFIX = "thox_"
ID_PREFIX = "key_"
MIN_INSTALLED_LENGTH = 32
MAX_INSTALLED_LENGTH = 512
# Fewer distinct characters than this is a pattern ("aaaa...", "abababab..."), not a secret.
MIN_INSTALLED_DISTINCT = 8
MAX_NAME_LENGTH = 64
HASH_ALGORITHM = "hmac-sha256"
SALT_BYTES = 16
_SECRET = re.compile(r"^thox_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class KeyStoreError(ThoxError):
    """Base of the key store's errors; messages name the file or the key and say what to do."""


class KeyNotFoundError(KeyStoreError):
    """No key with that id."""


class KeyStoreCorruptError(KeyStoreError):
    """The store file exists but cannot be read or parsed; it is never replaced by an empty store."""


class KeyInputError(KeyStoreError):
    """A name, scope or installed secret that cannot be accepted."""


@dataclass(frozen=True)
class KeyRecord:
    """One API key as `thox api-key list` shows it: never the secret, never its hash."""

    id: str
    name: str
    scope: Scope
    source: Source
    created: str
    last_used: str | None

    def allows(self, needed: Scope) -> bool:
        """Whether this key may call an API that needs `needed` (admin keys may do everything)."""
        return self.scope == "admin" or needed == "inference"

    def as_dict(self) -> dict[str, str | None]:
        """The record as JSON-ready fields (for `list` output and the admin API)."""
        return dataclasses.asdict(self)


def digest(salt: bytes, secret: bytes) -> bytes:
    """The salted hash stored for a secret."""
    # Why a keyed SHA-256 (HMAC with a random per-key salt) and not scrypt/PBKDF2: generated keys carry 256 random
    # bits, so offline guessing from a stolen file is hopeless whatever the hash; a slow KDF would add nothing for
    # them but cost tens of milliseconds of a Jetson's CPU on every request, and would hand unauthenticated clients
    # a CPU-exhaustion lever (each wrong key forces a slow hash). Installed keys are held to 32+ characters with
    # some variety for the same reason. The per-key salt keeps equal secrets from having equal hashes across
    # records and stores. The file itself is mode 0600 and owned by the agent's user.
    return hmac.new(salt, secret, hashlib.sha256).digest()


def format_time(epoch: float) -> str:
    """A record's time stamp (UTC, seconds)."""
    return time.strftime(TIME_FORMAT, time.gmtime(epoch))


def new_secret(key_id: str) -> str:
    """A fresh generated secret naming `key_id`."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return f"{SECRET_PREFIX}{key_id.removeprefix(ID_PREFIX)}_{body}"


def parse_key_id(secret: str) -> str | None:
    """The record id a generated-format secret names (`thox_ab12cd34_...` -> `key_ab12cd34`), else None."""
    match = _SECRET.match(secret)
    return f"{ID_PREFIX}{match.group(1)}" if match else None


def normalize_id(key_id: str) -> str:
    """`AB12cd34` or `key_ab12cd34` -> `key_ab12cd34`."""
    value = key_id.strip().lower()
    return value if value.startswith(ID_PREFIX) else f"{ID_PREFIX}{value}"


def check_name(name: str) -> str:
    """The name, if it is one a key may carry; KeyInputError otherwise."""
    if len(name) > MAX_NAME_LENGTH:
        raise KeyInputError(f"key name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    if any(not ch.isprintable() for ch in name):
        raise KeyInputError(f"key name {name!r} contains control characters")
    return name


def check_scope(scope: str) -> Scope:
    """The scope, if it is one; KeyInputError otherwise."""
    if scope not in SCOPES:
        raise KeyInputError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    return cast(Scope, scope)


def check_installed_secret(secret: str) -> None:
    """Pass if `secret` is strong and clean enough to install as a key; KeyInputError saying why not."""
    if secret != secret.strip():
        raise KeyInputError("the API key starts or ends with whitespace (a copy-paste slip?); remove it")
    if len(secret) < MIN_INSTALLED_LENGTH:
        raise KeyInputError(
            f"the API key is {len(secret)} characters long; use at least {MIN_INSTALLED_LENGTH} random characters "
            f"(or `thox api-key generate`)"
        )
    if len(secret) > MAX_INSTALLED_LENGTH:
        raise KeyInputError(f"the API key is {len(secret)} characters long; at most {MAX_INSTALLED_LENGTH} are allowed")
    bad = sorted({ch for ch in secret if not "\x21" <= ch <= "\x7e"})
    if bad:
        raise KeyInputError(
            f"the API key contains {', '.join(repr(ch) for ch in bad[:5])}; an HTTP Authorization header carries "
            f"only visible ASCII characters without spaces"
        )
    if len(set(secret)) < MIN_INSTALLED_DISTINCT:
        raise KeyInputError(
            f"the API key uses only {len(set(secret))} distinct characters; that is a pattern, not a random secret"
        )
