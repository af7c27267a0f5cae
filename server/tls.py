"""The RESTCONF listener's TLS: a self-signed certificate kept in the state directory, made
on first start, or one the operator gives."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import secrets
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

CERT_FILE = "restconf-cert.pem"
KEY_FILE = "restconf-key.pem"
VALID_DAYS = 825  # the longest lifetime common TLS clients accept for a server certificate


def load_or_create_certificate(state_dir: Path, listen: str) -> tuple[Path, Path]:
    """The state directory's certificate and key, created (mode 0600) when missing."""
    cert, key = Path(state_dir) / CERT_FILE, Path(state_dir) / KEY_FILE
    if cert.exists() and key.exists():
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: clients that trust several instances' certificates at once find
    # each one's issuer by name, so two instances must never share one.
    common_name = f"nfmig restconf {socket.gethostname()} {secrets.token_hex(4)}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        address = ipaddress.ip_address(listen)
        if not address.is_unspecified and str(address) not in ("127.0.0.1", "::1"):
            alt_names.append(x509.IPAddress(address))
    except ValueError:
        alt_names.append(x509.DNSName(listen))
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private, hashes.SHA256()))
    key_bytes = private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    # Both 0600, like everything in the state directory; fchmod because a file left over
    # (a key without its certificate) keeps its old mode through O_TRUNC.
    for path, data in ((key, key_bytes),
                       (cert, certificate.public_bytes(serialization.Encoding.PEM))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)
    log.info("RESTCONF: created a self-signed certificate %s", cert)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 or later with the given certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context
