"""Cluster PKI: the CA, node certificates, verification, real mutual-TLS handshakes, identity files on disk."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cluster import pki
from agent.cluster.pki import ClusterCA, NodeKey, PkiError, make_csr, verify_node_cert

UTC = datetime.timezone.utc


@dataclass(frozen=True)
class Node:
    node_id: str
    key_pem: bytes
    cert_pem: bytes


def _node(
    ca: ClusterCA,
    node_id: str,
    addresses: tuple[str, ...] = ("127.0.0.1",),
    days: int = 825,
    now: datetime.datetime | None = None,
) -> Node:
    key = NodeKey.create()
    cert = ca.issue(make_csr(key, node_id), node_id, list(addresses), ["thox.local"], days, now=now)
    return Node(node_id, key, cert)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


@pytest.fixture(scope="module")
def ca() -> ClusterCA:
    return ClusterCA.create("stack-1")


@pytest.fixture(scope="module")
def other_ca() -> ClusterCA:
    return ClusterCA.create("stack-2")


# The CA.


def test_ca_certificate_is_a_p256_path_length_zero_ca_naming_its_cluster(ca: ClusterCA) -> None:
    cert = _cert(ca.cert_pem)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "thox cluster stack-1 CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "thox cluster stack-1"
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public_key)
    now = datetime.datetime.now(UTC)
    assert now - datetime.timedelta(minutes=6) < cert.not_valid_before_utc < now - datetime.timedelta(minutes=4)
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=20 * 365 - 1)
    assert pki.cluster_id_of(ca.cert_pem) == ca.cluster_id == "stack-1"


def test_fingerprint_is_sha256_of_the_der_certificate_and_stable_across_load(ca: ClusterCA) -> None:
    der = _cert(ca.cert_pem).public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    loaded = ClusterCA.load(ca.cert_pem, ca.key_pem)
    assert loaded == ca
    assert loaded.fingerprint == ca.fingerprint
    # DER, not PEM text: the same certificate with other line endings pins the same CA.
    assert pki.ca_fingerprint(ca.cert_pem.replace(b"\n", b"\r\n")) == ca.fingerprint


def test_two_cas_have_different_fingerprints_even_for_the_same_cluster_id(ca: ClusterCA) -> None:
    assert ClusterCA.create("stack-1").fingerprint != ca.fingerprint


def test_ca_repr_hides_the_private_key(ca: ClusterCA) -> None:
    assert "PRIVATE" not in repr(ca)
    assert "key_pem" not in repr(ca)


def test_load_refuses_a_key_that_does_not_match(ca: ClusterCA, other_ca: ClusterCA) -> None:
    with pytest.raises(PkiError, match="CA private key does not match the CA certificate"):
        ClusterCA.load(ca.cert_pem, other_ca.key_pem)


def test_load_refuses_a_node_certificate(ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    with pytest.raises(PkiError, match=r"not a CA \(BasicConstraints ca=True is missing\)"):
        ClusterCA.load(node.cert_pem, node.key_pem)


def test_load_refuses_garbage(ca: ClusterCA) -> None:
    with pytest.raises(PkiError, match="CA certificate is not a valid PEM certificate"):
        ClusterCA.load(b"not a certificate", ca.key_pem)
    with pytest.raises(PkiError, match="CA private key is not a valid unencrypted PEM private key"):
        ClusterCA.load(ca.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


@pytest.mark.parametrize("cluster_id", ["", "-lead", "has space", "x" * 49, "ünï"])
def test_create_refuses_an_invalid_cluster_id(cluster_id: str) -> None:
    with pytest.raises(PkiError, match="cluster id .* is invalid"):
        ClusterCA.create(cluster_id)


def test_cluster_id_of_refuses_a_foreign_ca() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some Other CA")])
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PkiError, match="'Some Other CA' is not a thox cluster CA"):
        pki.cluster_id_of(cert.public_bytes(serialization.Encoding.PEM))


# Node certificates.


def test_issue_then_verify_round_trip(ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    assert verify_node_cert(ca.cert_pem, node.cert_pem) == "node-a"


def test_issued_certificate_is_a_tls_server_and_client_leaf_for_the_csr_key(ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    cert = _cert(node.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-a"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "thox cluster stack-1"
    assert cert.issuer == _cert(ca.cert_pem).subject
    key = serialization.load_pem_private_key(node.key_pem, password=None)
    assert cert.public_key() == key.public_key()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not usage.value.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = _cert(ca.cert_pem).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=825, minutes=5)


def test_san_holds_exactly_the_addresses_and_names_given(ca: ClusterCA) -> None:
    node = _node(ca, "node-a", addresses=("192.168.7.20", "fe80::1"))
    san = _cert(node.cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.7.20"),
        ipaddress.ip_address("fe80::1"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["thox.local"]


def test_issue_refuses_a_bad_address_or_no_names(ca: ClusterCA) -> None:
    csr = make_csr(NodeKey.create(), "node-a")
    with pytest.raises(PkiError, match="address '10.0.0.300' is not an IPv4 or IPv6 address"):
        ca.issue(csr, "node-a", ["10.0.0.300"], [])
    with pytest.raises(PkiError, match="DNS name 'has space' is invalid"):
        ca.issue(csr, "node-a", [], ["has space"])
    with pytest.raises(PkiError, match="needs at least one IP address or DNS name"):
        ca.issue(csr, "node-a", [], [])


def test_issue_refuses_a_csr_for_another_node(ca: ClusterCA) -> None:
    csr = make_csr(NodeKey.create(), "node-b")
    with pytest.raises(PkiError, match="certificate signing request is for node 'node-b', not 'node-a'"):
        ca.issue(csr, "node-a", ["127.0.0.1"], [])


def test_issue_refuses_a_csr_whose_signature_does_not_verify(ca: ClusterCA) -> None:
    csr = x509.load_pem_x509_csr(make_csr(NodeKey.create(), "node-a"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature does not verify"):
        ca.issue(tampered, "node-a", ["127.0.0.1"], [])


def test_issue_ignores_extensions_the_csr_asks_for(ca: ClusterCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = _cert(ca.issue(csr, "node-a", ["127.0.0.1"], []))
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []


def test_issue_refuses_a_non_ec_key(ca: ClusterCA) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")]))
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PkiError, match="must carry an EC P-256 or P-384 public key"):
        ca.issue(csr, "node-a", ["127.0.0.1"], [])


def test_node_certificate_never_outlives_its_ca(ca: ClusterCA) -> None:
    cert = _cert(_node(ca, "node-a", days=30 * 365).cert_pem)
    assert cert.not_valid_after_utc == _cert(ca.cert_pem).not_valid_after_utc


def test_certificate_from_another_cluster_is_refused(ca: ClusterCA, other_ca: ClusterCA) -> None:
    foreign = _node(other_ca, "node-a")
    with pytest.raises(PkiError, match="issued by 'O=thox cluster stack-2,CN=thox cluster stack-2 CA', not by this"):
        verify_node_cert(ca.cert_pem, foreign.cert_pem)


def test_certificate_from_another_ca_with_the_same_name_is_refused(ca: ClusterCA) -> None:
    impostor = ClusterCA.create("stack-1")
    forged = _node(impostor, "node-a")
    with pytest.raises(PkiError, match="signature does not verify with this cluster's CA key"):
        verify_node_cert(ca.cert_pem, forged.cert_pem)


def test_expired_certificate_is_refused() -> None:
    issued = datetime.datetime.now(UTC) - datetime.timedelta(days=10)
    ca = ClusterCA.create("old", now=issued - datetime.timedelta(days=1))
    node = _node(ca, "node-a", days=3, now=issued)
    with pytest.raises(PkiError, match=r"node certificate expired at \d{4}-\d\d-\d\dT.*rejoin the cluster"):
        verify_node_cert(ca.cert_pem, node.cert_pem)
    # It was valid in its window.
    assert verify_node_cert(ca.cert_pem, node.cert_pem, now=issued + datetime.timedelta(days=1)) == "node-a"


def test_not_yet_valid_certificate_is_refused(ca: ClusterCA) -> None:
    node = _node(ca, "node-a", now=datetime.datetime.now(UTC) + datetime.timedelta(days=1))
    with pytest.raises(PkiError, match="not valid before .* check this device's clock"):
        verify_node_cert(ca.cert_pem, node.cert_pem)


def test_the_ca_certificate_itself_is_not_a_node_certificate(ca: ClusterCA) -> None:
    with pytest.raises(PkiError, match="node certificate is a CA certificate"):
        verify_node_cert(ca.cert_pem, ca.cert_pem)


def test_verify_refuses_a_time_before_the_ca_existed(ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    before = _cert(ca.cert_pem).not_valid_before_utc - datetime.timedelta(seconds=1)
    with pytest.raises(PkiError, match="not valid before"):
        verify_node_cert(ca.cert_pem, node.cert_pem, now=before)
    backdated = _node(ca, "node-a", now=before - datetime.timedelta(days=1))
    with pytest.raises(PkiError, match="cluster CA certificate is valid only from"):
        verify_node_cert(ca.cert_pem, backdated.cert_pem, now=before)


def test_times_without_a_zone_are_refused(ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    with pytest.raises(PkiError, match="must carry a time zone"):
        verify_node_cert(ca.cert_pem, node.cert_pem, now=datetime.datetime(2030, 1, 1))


def test_verify_refuses_garbage(ca: ClusterCA) -> None:
    with pytest.raises(PkiError, match="node certificate is not a valid PEM certificate"):
        verify_node_cert(ca.cert_pem, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_make_csr_names_the_node_and_refuses_bad_ids() -> None:
    csr = x509.load_pem_x509_csr(make_csr(NodeKey.create(), "node-a"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-a"
    with pytest.raises(PkiError, match="node id 'bad id' is invalid"):
        make_csr(NodeKey.create(), "bad id")


# Real TLS handshakes over a loopback socket pair.


def _files(directory: Path, ca: ClusterCA, node: Node) -> Path:
    pki.write_identity(directory, ca.cert_pem, node.cert_pem, node.key_pem, None)
    return directory


@dataclass
class Outcome:
    server: str | BaseException | None = None
    client: bytes | BaseException | None = None
    server_seen_by_client: str | None = None


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Outcome:
    """Connect `client` to `server`; the server answers with the node id it saw, or the error it hit."""
    outcome = Outcome()
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                try:
                    seen = pki.peer_node_id(tls)
                except PkiError:
                    seen = "<no certificate>"
                outcome.server = seen
                tls.sendall(seen.encode())
        except (OSError, ssl.SSLError) as exc:
            outcome.server = exc
        finally:
            left.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(right, do_handshake_on_connect=False) as tls:
            tls.do_handshake()
            outcome.server_seen_by_client = pki.peer_node_id(tls)
            outcome.client = tls.recv(100)
    except (OSError, ssl.SSLError) as exc:
        outcome.client = exc
    finally:
        right.close()
        thread.join(timeout=20)
    assert not thread.is_alive()
    return outcome


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory: pytest.TempPathFactory, ca: ClusterCA, other_ca: ClusterCA) -> dict[str, Path]:
    return {
        "server": _files(tmp_path_factory.mktemp("server"), ca, _node(ca, "node-a")),
        "client": _files(tmp_path_factory.mktemp("client"), ca, _node(ca, "node-b")),
        "foreign": _files(tmp_path_factory.mktemp("foreign"), other_ca, _node(other_ca, "node-x")),
    }


def _server(directory: Path, *, require_client_cert: bool) -> ssl.SSLContext:
    pems = ((directory / name).read_bytes() for name in ("ca.pem", "node.pem", "node-key.pem"))
    return pki.server_context_from_pem(*pems, require_client_cert=require_client_cert)


def _client(ca_dir: Path, cert_dir: Path | None) -> ssl.SSLContext:
    if cert_dir is None:
        return pki.client_context_from_pem((ca_dir / "ca.pem").read_bytes(), None, None)
    pems = ((cert_dir / name).read_bytes() for name in ("node.pem", "node-key.pem"))
    return pki.client_context_from_pem((ca_dir / "ca.pem").read_bytes(), *pems)


def test_mutual_tls_accepts_a_node_of_the_cluster(tls_dirs: dict[str, Path]) -> None:
    outcome = _handshake(
        _server(tls_dirs["server"], require_client_cert=True), _client(tls_dirs["client"], tls_dirs["client"])
    )
    assert outcome.server == "node-b"
    assert outcome.client == b"node-b"
    assert outcome.server_seen_by_client == "node-a"


def test_mutual_tls_refuses_a_client_without_a_certificate(tls_dirs: dict[str, Path]) -> None:
    outcome = _handshake(_server(tls_dirs["server"], require_client_cert=True), _client(tls_dirs["client"], None))
    assert isinstance(outcome.server, ssl.SSLError)
    assert outcome.server.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert isinstance(outcome.client, ssl.SSLError)


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(tls_dirs: dict[str, Path]) -> None:
    outcome = _handshake(
        _server(tls_dirs["server"], require_client_cert=True), _client(tls_dirs["client"], tls_dirs["foreign"])
    )
    assert isinstance(outcome.server, ssl.SSLCertVerificationError)
    assert outcome.server.reason == "CERTIFICATE_VERIFY_FAILED"
    assert isinstance(outcome.client, ssl.SSLError)
    assert outcome.client.reason == "TLSV1_ALERT_UNKNOWN_CA"


def test_client_refuses_a_server_from_another_ca(tls_dirs: dict[str, Path]) -> None:
    outcome = _handshake(
        _server(tls_dirs["foreign"], require_client_cert=False), _client(tls_dirs["client"], tls_dirs["client"])
    )
    assert isinstance(outcome.client, ssl.SSLCertVerificationError)
    assert outcome.client.reason == "CERTIFICATE_VERIFY_FAILED"
    assert outcome.server_seen_by_client is None


def test_optional_client_certificate_admits_a_joiner_but_still_refuses_a_foreign_one(
    tls_dirs: dict[str, Path],
) -> None:
    join_server = _server(tls_dirs["server"], require_client_cert=False)
    outcome = _handshake(join_server, _client(tls_dirs["client"], None))
    assert outcome.server == "<no certificate>"
    assert outcome.client == b"<no certificate>"
    outcome = _handshake(join_server, _client(tls_dirs["client"], tls_dirs["foreign"]))
    assert isinstance(outcome.server, ssl.SSLCertVerificationError)


def test_contexts_trust_only_the_cluster_ca_and_tls_1_2_up(tls_dirs: dict[str, Path]) -> None:
    client = _client(tls_dirs["client"], tls_dirs["client"])
    server = _server(tls_dirs["server"], require_client_cert=True)
    for context in (client, server):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert [ca["subject"] for ca in context.get_ca_certs()] == [
            ((("commonName", "thox cluster stack-1 CA"),), (("organizationName", "thox cluster stack-1"),))
        ]
    assert not client.check_hostname
    assert _server(tls_dirs["server"], require_client_cert=False).verify_mode == ssl.CERT_OPTIONAL


def test_client_context_needs_both_certificate_and_key(tls_dirs: dict[str, Path]) -> None:
    ca_pem, cert_pem = (tls_dirs["client"] / "ca.pem").read_bytes(), (tls_dirs["client"] / "node.pem").read_bytes()
    with pytest.raises(PkiError, match="needs both its certificate and its key"):
        pki.client_context_from_pem(ca_pem, cert_pem, None)


# Identity files.


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_identity_is_written_private_and_read_back(tmp_path: Path, ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    directory = tmp_path / "cluster"
    directory.mkdir(mode=0o755)
    pki.write_identity(directory, ca.cert_pem, node.cert_pem, node.key_pem, ca.key_pem)
    assert _mode(directory) == 0o700
    assert _mode(directory / "node-key.pem") == 0o600
    assert _mode(directory / "ca-key.pem") == 0o600
    assert _mode(directory / "ca.pem") == 0o644
    assert _mode(directory / "node.pem") == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca-key.pem", "ca.pem", "node-key.pem", "node.pem"]
    identity = pki.read_identity(directory)
    assert identity is not None
    assert (identity.ca_pem, identity.cert_pem, identity.key_pem) == (ca.cert_pem, node.cert_pem, node.key_pem)
    assert identity.ca_key_pem == ca.key_pem
    assert identity.cert_path == directory / "node.pem"
    assert identity.key_path == directory / "node-key.pem"
    assert identity.ca_key_path == directory / "ca-key.pem"
    assert (identity.node_id, identity.cluster_id) == ("node-a", "stack-1")
    assert identity.ca() == ca
    assert "PRIVATE" not in repr(identity)


def test_identity_without_ca_key_removes_a_stale_one(tmp_path: Path, ca: ClusterCA, other_ca: ClusterCA) -> None:
    (tmp_path / "ca-key.pem").write_bytes(other_ca.key_pem)
    node = _node(ca, "node-b")
    pki.write_identity(tmp_path, ca.cert_pem, node.cert_pem, node.key_pem, None)
    assert not (tmp_path / "ca-key.pem").exists()
    identity = pki.read_identity(tmp_path)
    assert identity is not None
    assert identity.ca_key_path is None and identity.ca_key_pem is None and identity.ca() is None


def test_no_identity_yet_reads_as_none(tmp_path: Path) -> None:
    assert pki.read_identity(tmp_path / "missing") is None
    assert pki.read_identity(tmp_path) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ca.pem", "is not a valid PEM certificate"),
        ("node.pem", "is not a valid PEM certificate"),
        ("node-key.pem", "is not a valid unencrypted PEM private key"),
        ("ca-key.pem", "is not a valid unencrypted PEM private key"),
    ],
)
def test_corrupt_identity_file_is_named(tmp_path: Path, ca: ClusterCA, name: str, message: str) -> None:
    node = _node(ca, "node-a")
    pki.write_identity(tmp_path, ca.cert_pem, node.cert_pem, node.key_pem, ca.key_pem)
    (tmp_path / name).write_bytes(b"-----BEGIN X-----\ngarbage\n")
    with pytest.raises(PkiError, match=re.escape(f"{tmp_path / name} {message}")):
        pki.read_identity(tmp_path)


def test_unreadable_or_missing_identity_file_is_named(tmp_path: Path, ca: ClusterCA) -> None:
    node = _node(ca, "node-a")
    pki.write_identity(tmp_path, ca.cert_pem, node.cert_pem, node.key_pem, None)
    (tmp_path / "node-key.pem").unlink()
    (tmp_path / "node-key.pem").mkdir()
    with pytest.raises(PkiError, match=re.escape(f"cannot read {tmp_path / 'node-key.pem'}")):
        pki.read_identity(tmp_path)
    (tmp_path / "ca.pem").unlink()
    with pytest.raises(PkiError, match=re.escape(f"{tmp_path / 'ca.pem'} is missing although")):
        pki.read_identity(tmp_path)


def test_identity_files_that_do_not_belong_together_are_refused(
    tmp_path: Path, ca: ClusterCA, other_ca: ClusterCA
) -> None:
    node = _node(ca, "node-a")
    pki.write_identity(tmp_path, ca.cert_pem, node.cert_pem, NodeKey.create(), None)
    with pytest.raises(PkiError, match=re.escape(f"{tmp_path / 'node-key.pem'} does not match the certificate")):
        pki.read_identity(tmp_path)
    pki.write_identity(tmp_path, other_ca.cert_pem, node.cert_pem, node.key_pem, None)
    with pytest.raises(PkiError, match=re.escape(f"{tmp_path / 'node.pem'} was not issued by the CA in")):
        pki.read_identity(tmp_path)
    pki.write_identity(tmp_path, ca.cert_pem, node.cert_pem, node.key_pem, other_ca.key_pem)
    with pytest.raises(PkiError, match=re.escape(f"{tmp_path / 'ca-key.pem'} does not match the CA certificate")):
        pki.read_identity(tmp_path)
