"""The key store: secrets, hashing at rest, constant-time verification, reloads, batching, precise errors."""

from __future__ import annotations

import hmac
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.security import keys as keys_module
from agent.security.key_rules import (
    KeyInputError,
    KeyNotFoundError,
    KeyRecord,
    KeyStoreCorruptError,
    KeyStoreError,
    digest,
    parse_key_id,
)
from agent.security.keys import KeyStore

SECRET_SHAPE = re.compile(r"^thox_[0-9a-f]{8}_[A-Za-z0-9_-]{43}$")
INSTALLED = "my-own-key-0123456789-abcdefghijklmnop"


class FakeClocks:
    def __init__(self) -> None:
        self.wall = 1_750_000_000.0  # 2025-06-15T15:06:40Z
        self.mono = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clocks() -> FakeClocks:
    return FakeClocks()


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "api-keys.json"


@pytest.fixture
def make_store(store_path: Path, clocks: FakeClocks) -> Callable[[], KeyStore]:
    def make() -> KeyStore:
        store = KeyStore(store_path, flush_interval=60.0, wall_clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
        store.load()
        return store

    return make


@pytest.fixture
def store(make_store: Callable[[], KeyStore]) -> KeyStore:
    return make_store()


def test_generate_returns_a_secret_once_and_stores_only_a_salted_hash(store: KeyStore, store_path: Path) -> None:
    record, secret = store.generate("laptop", "inference")
    assert SECRET_SHAPE.match(secret)
    assert record.id == parse_key_id(secret) and record.id.startswith("key_")
    assert record == KeyRecord(record.id, "laptop", "inference", "generated", "2025-06-15T15:06:40Z", None)
    text = store_path.read_text()
    # The random part is the 43 characters after "thox_<8 hex>_" (it may itself contain "_").
    assert secret not in text and secret[len("thox_12345678_") :] not in text
    doc = json.loads(text)
    assert doc["version"] == 1
    (stored,) = doc["keys"]
    assert stored["id"] == record.id and stored["hash"].startswith("hmac-sha256$")
    assert store.verify(secret) == record


def test_two_keys_with_the_same_secret_would_not_share_a_hash(store: KeyStore, store_path: Path) -> None:
    store.install(INSTALLED, "a")
    store.revoke(store.list()[0].id)
    store.install(INSTALLED, "a")
    hashes = {json.loads(store_path.read_text())["keys"][0]["hash"]}
    store.revoke(store.list()[0].id)
    store.install(INSTALLED, "a")
    hashes.add(json.loads(store_path.read_text())["keys"][0]["hash"])
    assert len(hashes) == 2


def test_the_file_is_private_to_the_agent_user_and_no_temp_files_remain(store: KeyStore, store_path: Path) -> None:
    store.generate()
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in store_path.parent.iterdir()) == [".api-keys.json.lock", "api-keys.json"]


def test_verify_refuses_wrong_secrets(store: KeyStore) -> None:
    record, secret = store.generate()
    id_part = record.id.removeprefix("key_")
    other_body = "A" * 43
    for wrong in [
        "",
        "x",
        secret[:-1],
        secret + "A",
        f"thox_{id_part}_{other_body}",
        f"thox_00000000_{secret[-43:]}",  # the right body under an id that does not exist
        secret.upper(),
        "é" * 50,
        "\ud800" * 40,  # lone surrogates (cannot even be encoded)
        "k" * 100_000,
    ]:
        assert store.verify(wrong) is None, wrong[:40]


def test_verify_uses_a_constant_time_comparison(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = store.generate()
    store.install(INSTALLED)
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def observing(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", observing)
    assert store.verify(secret) is not None
    assert store.verify(secret[:-1] + ("B" if secret[-1] != "B" else "C")) is None
    assert store.verify(INSTALLED) is not None
    assert store.verify("z" * 40) is None
    assert len(seen) == 4 and all(len(a) == len(b) == 32 for a, b in seen)


def test_an_unknown_id_costs_a_hash_too(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = digest  # the function keys_module imported and calls by that name

    def counting(salt: bytes, secret: bytes) -> bytes:
        calls.append(salt)
        return real(salt, secret)

    monkeypatch.setattr(keys_module, "digest", counting)
    assert store.verify("thox_00000000_" + "A" * 43) is None
    assert len(calls) == 1


def test_verify_never_touches_the_file(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = store.generate()

    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("file I/O on the hot path")

    # `os` is the one shared module: patch it only around the calls, so pytest's own file work is unaffected.
    with monkeypatch.context() as patched:
        for name in ("open", "stat", "fstat", "read", "replace"):
            patched.setattr(os, name, no_io)
        verified = store.verify(secret)
        store.touch_last_used("key_00000000")
    assert verified is not None


def test_installed_keys_verify_and_are_validated(store: KeyStore) -> None:
    record = store.install(INSTALLED, "config", "admin")
    assert record.source == "installed" and record.scope == "admin"
    assert store.verify(INSTALLED) == record
    assert store.verify(INSTALLED + "x") is None
    for bad, message in [
        ("short-key", "9 characters long; use at least 32"),
        ("x" * 600, "600 characters long; at most 512"),
        (" " + INSTALLED, "whitespace"),
        (INSTALLED + "\n", "whitespace"),
        ("contains a space" + INSTALLED, r"contains ' '; an HTTP Authorization header"),
        ("ünïcödé" + INSTALLED, "visible ASCII"),
        ("ab" * 20, "only 2 distinct characters"),
        (INSTALLED, "already installed as key_"),
    ]:
        with pytest.raises(KeyInputError, match=message):
            store.install(bad)


def test_install_with_replace_swaps_the_named_key_in_one_write(store: KeyStore, clocks: FakeClocks) -> None:
    first = store.install(INSTALLED, "config")
    clocks.advance(1)
    kept, kept_secret = store.generate("laptop")
    clocks.advance(1)
    second = store.install(INSTALLED[::-1], "config", replace=True)
    assert store.verify(INSTALLED) is None and store.verify(INSTALLED[::-1]) == second
    assert store.verify(kept_secret) == kept
    assert [r.id for r in store.list()] == [kept.id, second.id] and first.id != second.id


def test_installing_a_generated_format_key_keeps_its_id(store: KeyStore, tmp_path: Path) -> None:
    other = KeyStore(tmp_path / "other-box.json")
    other.load()
    record, secret = other.generate("from another box")
    installed = store.install(secret, "copied")
    assert installed.id == record.id and store.verify(secret) == installed
    # The same id with a different secret cannot go in: verify() finds records by that id.
    clash = f"thox_{record.id[4:]}_{'Q' * 43}"
    with pytest.raises(KeyInputError, match=f"a different key already has id {record.id}"):
        store.install(clash)


def test_names_and_scopes_are_validated(store: KeyStore) -> None:
    with pytest.raises(KeyInputError, match="scope 'root' is not one of inference, admin"):
        store.generate("x", "root")
    with pytest.raises(KeyInputError, match="at most 64"):
        store.generate("n" * 65)
    with pytest.raises(KeyInputError, match="control characters"):
        store.generate("bad\nname")
    assert store.list() == []


def test_scopes(store: KeyStore) -> None:
    inference, _ = store.generate("i", "inference")
    admin, _ = store.generate("a", "admin")
    assert inference.allows("inference") and not inference.allows("admin")
    assert admin.allows("inference") and admin.allows("admin")


def test_list_shows_everything_but_secrets(store: KeyStore, clocks: FakeClocks) -> None:
    a, secret_a = store.generate("a")
    clocks.advance(10)
    b, secret_b = store.generate("b", "admin")
    listed = store.list()
    assert listed == [a, b]
    dumped = json.dumps([r.as_dict() for r in listed])
    assert secret_a not in dumped and secret_b not in dumped and "hash" not in dumped
    assert listed[1].as_dict() == {
        "id": b.id,
        "name": "b",
        "scope": "admin",
        "source": "generated",
        "created": "2025-06-15T15:06:50Z",
        "last_used": None,
    }


def test_revoke_stops_the_key_at_once(store: KeyStore) -> None:
    record, secret = store.generate()
    other, other_secret = store.generate()
    assert store.revoke(record.id) == record
    assert store.verify(secret) is None and store.verify(other_secret) == other
    with pytest.raises(KeyNotFoundError, match=f"no API key with id '{record.id}' in .*api-keys.json"):
        store.revoke(record.id)
    assert store.revoke(other.id.removeprefix("key_")) == other  # the bare id part works too


def test_regenerate_replaces_the_secret_under_the_same_id(store: KeyStore, clocks: FakeClocks) -> None:
    record, old = store.install(INSTALLED, "config", "admin"), INSTALLED
    clocks.advance(5)
    renewed, new = store.regenerate(record.id)
    assert SECRET_SHAPE.match(new) and parse_key_id(new) == record.id
    assert (renewed.id, renewed.name, renewed.scope, renewed.source) == (record.id, "config", "admin", "generated")
    assert renewed.created == "2025-06-15T15:06:45Z"
    assert store.verify(old) is None and store.verify(new) == renewed
    with pytest.raises(KeyNotFoundError):
        store.regenerate("key_00000000")


def test_another_process_revoke_is_seen_after_reload_if_changed(make_store: Callable[[], KeyStore]) -> None:
    agent, cli = make_store(), make_store()
    record, secret = cli.generate("laptop")
    assert agent.verify(secret) is None  # not seen yet: verify never reads the file
    assert agent.reload_if_changed() is True
    assert agent.verify(secret) == record
    assert agent.reload_if_changed() is False  # unchanged file: one stat, no read

    cli.revoke(record.id)
    assert agent.reload_if_changed() is True
    assert agent.verify(secret) is None

    renewed, new_secret = cli.generate("again")
    rotated, rotated_secret = cli.regenerate(renewed.id)
    agent.reload_if_changed()
    assert agent.verify(new_secret) is None and agent.verify(rotated_secret) == rotated


def test_a_replacement_never_reuses_the_loaded_files_inode(
    make_store: Callable[[], KeyStore], store_path: Path
) -> None:
    # Filesystems recycle a freed inode number at once (ext4 alternates between two on rename loops), and a
    # regenerate keeps the file's size; only holding the loaded file open makes (dev, inode) a reliable identity.
    agent, cli = make_store(), make_store()
    record, old_secret = cli.generate()
    agent.reload_if_changed()
    loaded = store_path.stat().st_ino
    for _ in range(10):
        _, secret = cli.regenerate(record.id)
        assert store_path.stat().st_ino != loaded
    assert agent.reload_if_changed() is True
    assert agent.verify(old_secret) is None and agent.verify(secret) is not None
    agent.close()
    cli.close()


def test_deleting_the_file_revokes_everything(store: KeyStore, store_path: Path) -> None:
    _, secret = store.generate()
    store_path.unlink()
    assert store.reload_if_changed() is True
    assert store.verify(secret) is None and store.list() == []


def test_last_used_is_batched_and_flushed_at_most_once_per_interval(
    store: KeyStore, store_path: Path, clocks: FakeClocks, make_store: Callable[[], KeyStore]
) -> None:
    record, _ = store.generate()
    writes_before = store_path.stat().st_ino
    clocks.advance(1)
    store.touch_last_used(record.id)
    # Visible at once in this process, without a write.
    assert store.list()[0].last_used == "2025-06-15T15:06:41Z"
    assert store_path.stat().st_ino == writes_before
    assert store.flush_last_used() is True
    assert make_store().list()[0].last_used == "2025-06-15T15:06:41Z"

    for _ in range(100):
        clocks.advance(0.5)
        store.touch_last_used(record.id)
        assert store.flush_last_used() is False  # within the interval: nothing written
    inode = store_path.stat().st_ino
    clocks.advance(10)
    store.touch_last_used(record.id)
    assert store.flush_last_used() is True
    assert store_path.stat().st_ino != inode
    assert make_store().list()[0].last_used == "2025-06-15T15:07:41Z"
    assert store.flush_last_used(force=True) is False  # nothing pending


def test_force_flush_ignores_the_interval(store: KeyStore, clocks: FakeClocks) -> None:
    record, _ = store.generate()
    store.touch_last_used(record.id)
    assert store.flush_last_used() is True
    clocks.advance(1)
    store.touch_last_used(record.id)
    assert store.flush_last_used() is False
    assert store.flush_last_used(force=True) is True


def test_a_flush_never_undoes_another_process_revoke(make_store: Callable[[], KeyStore], clocks: FakeClocks) -> None:
    agent, cli = make_store(), make_store()
    record, secret = agent.generate("k")
    kept, _ = agent.generate("kept")
    agent.touch_last_used(record.id)
    agent.touch_last_used(kept.id)
    cli.revoke(record.id)  # the agent has not reloaded yet
    assert agent.flush_last_used(force=True) is True
    fresh = make_store()
    assert [r.id for r in fresh.list()] == [kept.id]
    assert fresh.list()[0].last_used is not None
    assert agent.verify(secret) is None  # the flush re-read the file, so the agent now knows too


def test_a_failed_flush_keeps_the_pending_times(store: KeyStore, store_path: Path) -> None:
    record, _ = store.generate()
    store.touch_last_used(record.id)
    good = store_path.read_bytes()
    store_path.write_text("{broken")
    with pytest.raises(KeyStoreCorruptError):
        store.flush_last_used(force=True)
    assert store_path.read_text() == "{broken"
    store_path.write_bytes(good)  # repaired
    assert store.flush_last_used(force=True) is True
    assert KeyStore(store_path).list()[0].last_used == "2025-06-15T15:06:40Z"


def test_touches_of_a_key_that_is_gone_write_nothing(make_store: Callable[[], KeyStore], store_path: Path) -> None:
    agent, cli = make_store(), make_store()
    record, _ = agent.generate()
    agent.touch_last_used(record.id)
    cli.revoke(record.id)
    inode = store_path.stat().st_ino
    assert agent.flush_last_used(force=True) is False
    assert store_path.stat().st_ino == inode


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"  \n", "the file is empty"),
        (b"{not json", r"not valid JSON \(Expecting property name enclosed in double quotes at line 1, column 2\)"),
        (b"\xff\xfe", r"not UTF-8 text \(byte 0\)"),
        (b"[]", "expected a JSON object at the top, found list"),
        (b'{"keys": []}', 'no "version" field'),
        (b'{"version": "1", "keys": []}', '"version" must be an integer'),
        (b'{"version": true, "keys": []}', '"version" must be an integer'),
        (b'{"version": 2, "keys": []}', r"written by a newer thox \(file version 2; this one reads version 1\)"),
        (b'{"version": 0, "keys": []}', "unknown file version 0"),
        (b'{"version": 1, "keys": [], "extra": 1}', "unexpected top-level field"),
        (b'{"version": 1, "keys": {}}', '"keys" must be a list, found dict'),
        (b'{"version": 1, "keys": [1]}', r"keys\[0\]: expected an object, found int"),
    ],
)
def test_corrupt_files_are_reported_with_path_and_problem(store_path: Path, content: bytes, problem: str) -> None:
    store_path.parent.mkdir(parents=True)
    store_path.write_bytes(content)
    store = KeyStore(store_path)
    with pytest.raises(KeyStoreCorruptError, match=f"key store {re.escape(str(store_path))} is unusable: {problem}"):
        store.load()
    assert store_path.read_bytes() == content


def _good_record() -> dict[str, object]:
    return {
        "id": "key_ab12cd34",
        "name": "n",
        "scope": "inference",
        "source": "generated",
        "created": "2025-01-31T12:00:00Z",
        "last_used": None,
        "hash": "hmac-sha256$" + "00" * 16 + "$" + "11" * 32,
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"scope": "root"}, r"keys\[0\]: scope 'root' is not one of inference, admin"),
        ({"id": "ab12cd34"}, r"keys\[0\]: id 'ab12cd34' is not of the form key_<8 hex digits>"),
        ({"source": "magic"}, "source 'magic'"),
        ({"name": 3}, "name must be a string"),
        ({"created": "yesterday"}, "created 'yesterday' is not a time like 2025-01-31T12:00:00Z"),
        ({"last_used": 5}, "last_used must be a time"),
        ({"hash": "sha1$00$11"}, r"hash must read hmac-sha256\$<salt hex>\$<digest hex>"),
        ({"hash": "hmac-sha256$zz$11"}, "not hexadecimal"),
        ({"hash": "hmac-sha256$00$11"}, "salt must be 16 bytes"),
        ({"hash": None}, "hash must read"),
        ({"lastused": None}, "unexpected field"),
    ],
)
def test_malformed_records_are_reported(store_path: Path, change: dict[str, object], problem: str) -> None:
    record = _good_record() | change
    store_path.parent.mkdir(parents=True)
    store_path.write_text(json.dumps({"version": 1, "keys": [record]}))
    with pytest.raises(KeyStoreCorruptError, match=problem):
        KeyStore(store_path).load()


def test_missing_fields_and_duplicate_ids_are_reported(store_path: Path) -> None:
    store_path.parent.mkdir(parents=True)
    partial = {k: v for k, v in _good_record().items() if k != "hash"}
    store_path.write_text(json.dumps({"version": 1, "keys": [partial]}))
    with pytest.raises(KeyStoreCorruptError, match=r"keys\[0\]: missing field\(s\) hash"):
        KeyStore(store_path).load()
    store_path.write_text(json.dumps({"version": 1, "keys": [_good_record(), _good_record()]}))
    with pytest.raises(KeyStoreCorruptError, match=r"keys\[1\]: id key_ab12cd34 appears twice"):
        KeyStore(store_path).load()


def test_a_hand_written_valid_file_loads(store_path: Path) -> None:
    store_path.parent.mkdir(parents=True)
    store_path.write_text(json.dumps({"version": 1, "keys": [_good_record()]}))
    os.chmod(store_path, 0o600)
    store = KeyStore(store_path)
    store.load()
    assert [r.id for r in store.list()] == ["key_ab12cd34"]


def test_writes_refuse_to_replace_a_corrupt_file(store: KeyStore, store_path: Path) -> None:
    store.generate()
    store_path.write_text('{"version": 1, "keys": [')
    for action in (lambda: store.generate("new"), lambda: store.install(INSTALLED), lambda: store.revoke("key_1")):
        with pytest.raises(KeyStoreCorruptError, match="not valid JSON"):
            action()
    assert store_path.read_text() == '{"version": 1, "keys": ['


def test_a_store_that_becomes_corrupt_fails_closed(store: KeyStore, store_path: Path) -> None:
    _, secret = store.generate()
    store_path.write_text("garbage")
    with pytest.raises(KeyStoreCorruptError):
        store.reload_if_changed()
    # No key verifies while the file is broken (a revoked key must never come back), and the reason is on hand.
    assert store.verify(secret) is None
    assert isinstance(store.error, KeyStoreCorruptError)
    assert store.reload_if_changed() is False  # the same broken file is not re-read on every request
    store_path.unlink()
    assert store.reload_if_changed() is True and store.error is None


def test_an_unloaded_store_verifies_nothing_and_says_why(store_path: Path) -> None:
    store = KeyStore(store_path)
    assert store.verify("thox_00000000_" + "A" * 43) is None
    assert isinstance(store.error, KeyStoreError) and "not been loaded" in str(store.error)
    assert store.list() == []  # list() loads on demand
    assert store.error is None


def test_an_unreadable_path_is_reported(tmp_path: Path) -> None:
    directory = tmp_path / "keys.json"
    directory.mkdir()
    with pytest.raises(KeyStoreCorruptError, match="cannot be read: Is a directory"):
        KeyStore(directory).load()


def test_loose_permissions_are_tightened_and_noted(store: KeyStore, store_path: Path) -> None:
    store.generate()
    os.chmod(store_path, 0o644)
    fresh = KeyStore(store_path)
    fresh.load()
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert fresh.notices == [f"key store {store_path} was readable by others (mode 644); set it to 600"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand files to another user")
def test_root_writes_keep_the_agent_user_as_owner(tmp_path: Path) -> None:
    agent_uid, agent_gid = 65534, 65534  # nobody: stands in for the agent's user
    directory = tmp_path / "state"
    directory.mkdir()
    os.chown(directory, agent_uid, agent_gid)
    store = KeyStore(directory / "api-keys.json")
    store.load()
    store.generate()
    for path in (directory / "api-keys.json", directory / ".api-keys.json.lock"):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (agent_uid, agent_gid, 0o600), path


def test_parse_key_id() -> None:
    assert parse_key_id("thox_ab12cd34_" + "A" * 43) == "key_ab12cd34"
    assert parse_key_id("thox_AB12CD34_" + "A" * 43) is None
    assert parse_key_id("thox_ab12cd34_" + "A" * 42) is None
    assert parse_key_id("sk-" + "A" * 48) is None


def test_a_store_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    store = KeyStore(blocker / "api-keys.json")
    with pytest.raises(KeyStoreError, match=r"cannot update key store .*api-keys.json: .*; run this as the agent's"):
        store.generate()
