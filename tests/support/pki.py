"""A throwaway X.509 PKI for TLS tests: a CA, a server certificate and client certificates.

Tests call `make_pki(tmp_path)` and hand the PEM files to the server under test (Mosquitto,
an HTTPS webhook receiver) and to the client; every certificate is signed by the one CA.
Keys are EC P-256 (fast to generate) and certificates are valid from a day ago to 30 days on.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_CA_NAME = "Simwire Test CA"
_CLIENT_NAME = "simwire-test-client"


@dataclass(frozen=True)
class Pki:
    """PEM files in `dir`; `client(name)` issues more client certificates on demand."""

    dir: Path
    ca_cert: Path
    """Self-signed CA certificate."""
    ca_key: Path
    server_cert: Path
    """Signed by the CA; SAN DNS:localhost and IP:127.0.0.1; serverAuth."""
    server_key: Path
    client_cert: Path
    """Signed by the CA; CN "simwire-test-client"; clientAuth."""
    client_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of a client certificate with CN `name`, issued once per name (the
        files in `dir` are the cache)."""
        stem = "client-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        cert, key = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        if cert.exists() and key.exists():
            return cert, key
        ca_cert, ca_key = _load(self.ca_cert, self.ca_key)
        return _issue(self.dir, stem, name, ca_cert, ca_key, server=False)

    def server_ssl_context(self, require_client_cert: bool = False) -> ssl.SSLContext:
        """For a test server: presents the server certificate; with `require_client_cert`,
        refuses clients without a certificate signed by the CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.ca_cert)
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """For a test client: trusts only the CA (hostname checked), presents no certificate."""
        return ssl.create_default_context(cafile=str(self.ca_cert))


def make_pki(directory: Path) -> Pki:
    """Generate a CA, a server and a default client certificate into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    ca_cert = (
        _builder(name, name, ca_key, ca=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_cert_path, ca_key_path = _write(directory, "ca", ca_cert, ca_key)
    server_cert, server_key = _issue(directory, "server", "localhost", ca_cert, ca_key,
                                     server=True)
    client_cert, client_key = _issue(directory, "client", _CLIENT_NAME, ca_cert, ca_key,
                                     server=False)
    return Pki(directory, ca_cert_path, ca_key_path, server_cert, server_key,
               client_cert, client_key)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, *,
             ca: bool) -> x509.CertificateBuilder:
    """What the CA and the leaf certificates share: names, key, serial, a validity from
    yesterday for 30 days, BasicConstraints and KeyUsage (cert and CRL signing for the CA)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                crl_sign=ca, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )


def _issue(
    directory: Path, stem: str, common_name: str, ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey, *, server: bool,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key, ca=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            ]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write(directory, stem, cert, key)


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def _load(cert: Path, key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(cert.read_bytes())
    ca_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{key}: not an EC key")
    return ca_cert, ca_key
