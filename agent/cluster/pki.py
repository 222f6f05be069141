"""The cluster's X.509 material: one CA per cluster, one certificate per node, TLS contexts, files on disk.

Every function here is pure or does blocking file I/O and CPU work (key generation, signatures); the agent calls
them through `asyncio.to_thread`, never on the event loop.

Trust model: the cluster CA is the only trust anchor for agent-to-agent and etcd traffic (never the system store).
A node is identified by the common name (CN) of the certificate the CA issued to it; the CA's own subject carries
the cluster id (CN "thox cluster <id> CA", O "thox cluster <id>"), so `cluster_id_of` can read it back.
A joiner pins the CA by `ca_fingerprint` (sha256 of the DER certificate, which is what join tokens carry) before
it trusts anything the cluster sends it.

Node keys are EC P-256 (P-384 is also accepted in CSRs); nothing here makes or accepts RSA, which keeps the key
usage of issued certificates simple (digital signature and key agreement).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.atomic import atomic_write_bytes
from agent.errors import ThoxError

CA_VALIDITY_DAYS = 20 * 365
DEFAULT_NODE_CERT_DAYS = 825
# Certificates start a little in the past so that a peer whose clock is slightly behind still accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)
FINGERPRINT_PREFIX = "sha256:"

CA_FILE = "ca.pem"
CERT_FILE = "node.pem"
KEY_FILE = "node-key.pem"
CA_KEY_FILE = "ca-key.pem"
PUBLIC_FILE_MODE = 0o644
SECRET_FILE_MODE = 0o600
DIRECTORY_MODE = 0o700

_CA_CN_PREFIX = "thox cluster "
_CA_CN_SUFFIX = " CA"
# X.509 limits a common name to 64 characters; "thox cluster <id> CA" must fit.
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


class PkiError(ThoxError):
    """Cluster certificates or keys are missing, malformed, mismatched or not trusted; the message says which."""


def _moment(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.timezone.utc)
    if now.tzinfo is None:
        raise PkiError("a time given to the cluster PKI must carry a time zone (use datetime.timezone.utc)")
    return now


def _check_cluster_id(cluster_id: str) -> None:
    if not _CLUSTER_ID.fullmatch(cluster_id):
        raise PkiError(
            f"cluster id {cluster_id!r} is invalid: use 1 to 48 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _check_node_id(node_id: str) -> None:
    if not _NODE_ID.fullmatch(node_id):
        raise PkiError(
            f"node id {node_id!r} is invalid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"{what} is not a valid PEM certificate: {exc}") from None


def _load_ec_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{what} is not a valid unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _ACCEPTED_CURVES):
        raise PkiError(f"{what} must be an EC P-256 or P-384 key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.DER, spki) == cert.public_key().public_bytes(
        serialization.Encoding.DER, spki
    )


def _common_name(name: x509.Name, what: str) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise PkiError(f"{what} must name exactly one common name (CN)")
    return values[0].value


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ca_fingerprint(cert_pem: bytes) -> str:
    """'sha256:' + lowercase hex SHA-256 of the certificate's DER bytes (what join tokens pin)."""
    # DER, not the PEM text (k3s hashes its PEM bundle): re-wrapped or re-encoded PEM still pins the same CA.
    der = _load_cert(cert_pem, "CA certificate").public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def cluster_id_of(ca_cert_pem: bytes) -> str:
    """The cluster id stored in a cluster CA certificate's subject."""
    cn = _common_name(_load_cert(ca_cert_pem, "CA certificate").subject, "CA certificate subject")
    if not (cn.startswith(_CA_CN_PREFIX) and cn.endswith(_CA_CN_SUFFIX)):
        raise PkiError(f"CA certificate subject CN {cn!r} is not a thox cluster CA ('thox cluster <id> CA')")
    cluster_id = cn[len(_CA_CN_PREFIX) : -len(_CA_CN_SUFFIX)]
    _check_cluster_id(cluster_id)
    return cluster_id


def _node_public_key(csr_pem: bytes, node_id: str) -> ec.EllipticCurvePublicKey:
    """The public key of a node's certificate signing request, once the request is proven to be for `node_id`."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"certificate signing request is not valid PEM: {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError("certificate signing request's signature does not verify (it was not made with its key)")
    cn = _common_name(csr.subject, "certificate signing request subject")
    if cn != node_id:
        raise PkiError(f"certificate signing request is for node {cn!r}, not {node_id!r}")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, _ACCEPTED_CURVES):
        raise PkiError("certificate signing request must carry an EC P-256 or P-384 public key")
    return public_key


@dataclass(frozen=True)
class ClusterCA:
    """The cluster's certificate authority: self-signed certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def create(cls, cluster_id: str, *, now: datetime.datetime | None = None) -> ClusterCA:
        """A new CA for `cluster_id`: EC P-256, self-signed, valid for 20 years; `now` is for tests."""
        _check_cluster_id(cluster_id)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, f"{_CA_CN_PREFIX}{cluster_id}{_CA_CN_SUFFIX}"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{_CA_CN_PREFIX}{cluster_id}"),
            ]
        )
        now = _moment(now)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
            # path_length=0: this CA signs node certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> ClusterCA:
        """A CA from PEM bytes, checked: a self-signed CA certificate of a thox cluster and its matching key."""
        cert = _load_cert(cert_pem, "CA certificate")
        key = _load_ec_key(key_pem, "CA private key")
        if not _is_ca(cert):
            raise PkiError("CA certificate is not a CA (BasicConstraints ca=True is missing)")
        if not _same_public_key(key, cert):
            raise PkiError("CA private key does not match the CA certificate's public key")
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature):
            raise PkiError("CA certificate is not self-signed by its own key") from None
        cluster_id_of(cert_pem)
        return cls(cert_pem, key_pem)

    @property
    def fingerprint(self) -> str:
        """'sha256:' + lowercase hex SHA-256 of the DER certificate."""
        return ca_fingerprint(self.cert_pem)

    @property
    def cluster_id(self) -> str:
        """The cluster id in this CA's subject."""
        return cluster_id_of(self.cert_pem)

    def issue(
        self,
        csr_pem: bytes,
        node_id: str,
        addresses: list[str],
        dns_names: list[str],
        days: int = DEFAULT_NODE_CERT_DAYS,
        *,
        now: datetime.datetime | None = None,
    ) -> bytes:
        """A node certificate (PEM) for the key in `csr_pem`, usable as TLS server and client; `now` is for tests."""
        _check_node_id(node_id)
        if days < 1:
            raise PkiError(f"certificate lifetime must be at least 1 day, not {days}")
        public_key = _node_public_key(csr_pem, node_id)
        sans = _subject_alt_names(addresses, dns_names)

        ca_cert = _load_cert(self.cert_pem, "CA certificate")
        ca_key = _load_ec_key(self.key_pem, "CA private key")
        if not _same_public_key(ca_key, ca_cert):
            raise PkiError("CA private key does not match the CA certificate's public key")
        start = _moment(now) - CLOCK_SKEW
        # A certificate must not outlive the CA that vouches for it.
        end = min(start + CLOCK_SKEW + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
        try:
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        # Only the public key and CN are taken from the CSR; extensions it asks for (CA=true, other names) are
        # ignored, so a joiner cannot obtain more than a node certificate.
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{_CA_CN_PREFIX}{self.cluster_id}"),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def _subject_alt_names(addresses: list[str], dns_names: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise PkiError(f"address {address!r} is not an IPv4 or IPv6 address") from None
    for dns_name in dns_names:
        if not dns_name or not dns_name.isascii() or any(c.isspace() for c in dns_name):
            raise PkiError(f"DNS name {dns_name!r} is invalid: use an ASCII host name such as 'thox.local'")
        names.append(x509.DNSName(dns_name))
    if not names:
        # etcd and other Go TLS peers ignore the CN when they check a server's name, so a SAN-less certificate
        # would fail there in a way that is hard to trace back to here.
        raise PkiError("a node certificate needs at least one IP address or DNS name")
    return names


class NodeKey:
    """Node private keys."""

    @staticmethod
    def create() -> bytes:
        """A new EC P-256 private key, PEM (PKCS#8, unencrypted: it lives in a 0600 file)."""
        return _key_pem(ec.generate_private_key(ec.SECP256R1()))


def make_csr(key_pem: bytes, node_id: str) -> bytes:
    """A certificate signing request (PEM) for `node_id` (the subject CN), signed with `key_pem`."""
    _check_node_id(node_id)
    key = _load_ec_key(key_pem, "node private key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def verify_node_cert(ca_cert_pem: bytes, cert_pem: bytes, *, now: datetime.datetime | None = None) -> str:
    """The node id (CN) of `cert_pem` if this CA issued it and it is valid now; PkiError saying why not otherwise."""
    ca = _load_cert(ca_cert_pem, "CA certificate")
    cert = _load_cert(cert_pem, "node certificate")
    when = _moment(now)
    if cert.issuer != ca.subject:
        raise PkiError(
            f"node certificate was issued by {cert.issuer.rfc4514_string()!r}, "
            f"not by this cluster's CA {ca.subject.rfc4514_string()!r}"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            "node certificate's signature does not verify with this cluster's CA key "
            "(a CA of the same name but another cluster issued it)"
        ) from None
    if when < cert.not_valid_before_utc:
        raise PkiError(
            f"node certificate is not valid before {_iso(cert.not_valid_before_utc)} "
            f"(it is {_iso(when)} here: check this device's clock)"
        )
    if when > cert.not_valid_after_utc:
        raise PkiError(
            f"node certificate expired at {_iso(cert.not_valid_after_utc)}; rejoin the cluster for a new one"
        )
    if not ca.not_valid_before_utc <= when <= ca.not_valid_after_utc:
        raise PkiError(
            f"cluster CA certificate is valid only from {_iso(ca.not_valid_before_utc)} "
            f"to {_iso(ca.not_valid_after_utc)} (it is {_iso(when)} here: check this device's clock)"
        )
    if _is_ca(cert):
        raise PkiError("node certificate is a CA certificate; a node certificate must have BasicConstraints ca=False")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    missing = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - set(usages)
    if missing:
        raise PkiError("node certificate is not allowed for both TLS server and client authentication")
    node_id = _common_name(cert.subject, "node certificate subject")
    _check_node_id(node_id)
    # The checks above give precise messages; RFC 5280 path validation is the backstop for everything else
    # (unknown critical extensions, malformed key identifiers, a CA that may not sign certificates).
    try:
        verification.PolicyBuilder().store(verification.Store([ca])).time(when).build_client_verifier().verify(cert, [])
    except verification.VerificationError as exc:
        raise PkiError(f"node certificate failed X.509 path validation against the cluster CA: {exc}") from None
    return node_id


# TLS contexts. Peers are addressed by IP (from mDNS or etcd membership), which changes with DHCP and is not
# worth pinning into certificates, so host-name checking is off. What replaces it: the cluster CA is the only
# trust anchor (never the system store), so a handshake proves the peer holds a certificate this cluster issued;
# the caller then reads the peer's node id with `peer_node_id` and compares it with the node it meant to reach.


def _base_context(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


# Contexts are built from PEM bytes (a joiner's pinned CA, a node's identity already read). Blocking like the rest
# of this module: the `ssl` module loads a certificate chain only from files, so the certificate and key pass
# through a private temporary directory (0700, files 0600) that is removed at once.


def _trust_only(context: ssl.SSLContext, ca_cert_pem: bytes) -> None:
    _load_cert(ca_cert_pem, "CA certificate")
    try:
        context.load_verify_locations(cadata=ca_cert_pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as exc:
        raise PkiError(f"CA certificate cannot be used as a TLS trust anchor: {exc}") from None


def _load_chain_pem(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    if not _same_public_key(_load_ec_key(key_pem, "node private key"), _load_cert(cert_pem, "node certificate")):
        raise PkiError("node private key does not match the node certificate's public key")
    with tempfile.TemporaryDirectory(prefix="thox-tls-") as scratch:
        cert_path, key_path = Path(scratch) / CERT_FILE, Path(scratch) / KEY_FILE
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        try:
            context.load_cert_chain(certfile=cert_path, keyfile=key_path)
        except ssl.SSLError as exc:
            raise PkiError(f"node certificate and key cannot be used for TLS: {exc}") from None


def server_context_from_pem(
    ca_cert_pem: bytes, cert_pem: bytes, key_pem: bytes, *, require_client_cert: bool
) -> ssl.SSLContext:
    """A TLS 1.2+ server context trusting only the cluster CA; client certificates required or optional."""
    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load_chain_pem(context, cert_pem, key_pem)
    _trust_only(context, ca_cert_pem)
    # CERT_OPTIONAL serves the join endpoint, where the joiner has no certificate yet; a certificate that is
    # presented must still verify against the cluster CA.
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context_from_pem(ca_cert_pem: bytes, cert_pem: bytes | None, key_pem: bytes | None) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only the cluster CA, presenting our node certificate when given."""
    if (cert_pem is None) != (key_pem is None):
        raise PkiError("a client certificate needs both its certificate and its key")
    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    # Off on purpose, see the comment above _base_context: identity is the CA plus the peer's CN.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    _trust_only(context, ca_cert_pem)
    if cert_pem is not None and key_pem is not None:
        _load_chain_pem(context, cert_pem, key_pem)
    return context


def check_node_id(node_id: str) -> None:
    """Pass if `node_id` is a valid node id (1 to 64 letters, digits, '.', '_', '-'); PkiError saying why not."""
    _check_node_id(node_id)


def cert_matches_key(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the certificate `cert_pem` carries the public key of the private key `key_pem`."""
    return _same_public_key(_load_ec_key(key_pem, "node private key"), _load_cert(cert_pem, "certificate"))


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The node id (CN) of the verified certificate the peer presented on a connection from these contexts."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PkiError("the peer presented no certificate")
    return _common_name(x509.load_der_x509_certificate(der).subject, "peer certificate subject")


@dataclass(frozen=True)
class Identity:
    """A node's cluster identity on disk: the CA certificate, its own certificate and key, maybe the CA key."""

    directory: Path
    ca_path: Path
    cert_path: Path
    key_path: Path
    ca_key_path: Path | None
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_key_pem: bytes | None = field(repr=False)
    node_id: str
    cluster_id: str

    def ca(self) -> ClusterCA | None:
        """The cluster CA with its key, if this node holds it."""
        return None if self.ca_key_pem is None else ClusterCA(self.ca_pem, self.ca_key_pem)


def write_identity(directory: Path, ca: bytes, cert: bytes, key: bytes, ca_key: bytes | None) -> None:
    """Write ca.pem, node.pem, node-key.pem (0600) and ca-key.pem (0600) atomically into a 0700 `directory`."""
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    directory.chmod(DIRECTORY_MODE)
    # Each file is replaced atomically, the set is not: node.pem goes last and marks the identity as present,
    # and read_identity checks that the files belong together, so a torn update is detected, never trusted.
    if ca_key is None:
        # A CA key left from an earlier cluster would not match the new CA.
        (directory / CA_KEY_FILE).unlink(missing_ok=True)
    else:
        atomic_write_bytes(directory / CA_KEY_FILE, ca_key, mode=SECRET_FILE_MODE)
    atomic_write_bytes(directory / CA_FILE, ca, mode=PUBLIC_FILE_MODE)
    atomic_write_bytes(directory / KEY_FILE, key, mode=SECRET_FILE_MODE)
    atomic_write_bytes(directory / CERT_FILE, cert, mode=PUBLIC_FILE_MODE)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_identity(directory: Path) -> Identity | None:
    """The identity stored in `directory`, None if there is none yet; PkiError naming a bad or mismatched file."""
    cert_path = directory / CERT_FILE
    if not cert_path.exists():
        return None
    ca_path, key_path, ca_key_path = directory / CA_FILE, directory / KEY_FILE, directory / CA_KEY_FILE
    for path in (ca_path, key_path):
        if not path.exists():
            raise PkiError(f"{path} is missing although {cert_path} exists; rejoin the cluster")
    ca_pem, cert_pem, key_pem = _read(ca_path), _read(cert_path), _read(key_path)
    ca_cert = _load_cert(ca_pem, str(ca_path))
    cert = _load_cert(cert_pem, str(cert_path))
    key = _load_ec_key(key_pem, str(key_path))
    if not _same_public_key(key, cert):
        raise PkiError(f"{key_path} does not match the certificate in {cert_path}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{cert_path} was not issued by the CA in {ca_path}") from None
    try:
        cluster_id = cluster_id_of(ca_pem)
    except PkiError as exc:
        raise PkiError(f"{ca_path}: {exc}") from None
    try:
        node_id = _common_name(cert.subject, "node certificate subject")
    except PkiError as exc:
        raise PkiError(f"{cert_path}: {exc}") from None
    ca_key_pem: bytes | None = None
    if ca_key_path.exists():
        ca_key_pem = _read(ca_key_path)
        if not _same_public_key(_load_ec_key(ca_key_pem, str(ca_key_path)), ca_cert):
            raise PkiError(f"{ca_key_path} does not match the CA certificate in {ca_path}")
    return Identity(
        directory=directory,
        ca_path=ca_path,
        cert_path=cert_path,
        key_path=key_path,
        ca_key_path=ca_key_path if ca_key_pem is not None else None,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_key_pem=ca_key_pem,
        node_id=node_id,
        cluster_id=cluster_id,
    )
