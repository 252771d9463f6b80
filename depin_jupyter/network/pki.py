"""The coordinator's certificate authority: create it, and issue leaf certificates naming a peer's role and pool.

What a certificate says is read by `protocol.identity` (every side needs that); only the coordinator signs.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.protocol.identity import POOL_URI, ROLE_URI, ROLES, check_pool_name

__all__ = ["create_ca", "issue"]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(name: str = "depin coordinator", days: int = 3650) -> tuple[str, str]:
    """A new self-signed certificate authority: (certificate PEM, private key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())


def issue(ca_cert: str, ca_key: str, name: str, role: str, *, days: float = 365,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          hosts: tuple[str, ...] = (), pool: str | None = None) -> tuple[str, str, int]:
    """A leaf certificate for ``name`` in ``role`` signed by the CA: (certificate PEM, key PEM, serial).

    ``pool`` (workers): the pool the holder belongs to, written as a ``depin://pool/NAME`` URI; the CA's
    signature covers it, so a volunteer cannot change it.

    Every Dask node is both a TLS server and a TLS client (workers listen for peers, the scheduler dials
    workers), so the certificate carries both extended key usages.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if role not in ROLES:
        raise DepinUsageError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if not name or any(c in name for c in "/,=+\n"):
        raise DepinUsageError(f"invalid name {name!r}: use letters, digits, '-', '_' or '.'")
    ca = x509.load_pem_x509_certificate(ca_cert.encode())
    ca_private: Any = serialization.load_pem_private_key(ca_key.encode(), password=None)  # the EC key create_ca made
    key = ec.generate_private_key(ec.SECP256R1())
    now = _utcnow()
    end = not_after or now + dt.timedelta(days=days)
    start = not_before or min(now - dt.timedelta(minutes=5), end - dt.timedelta(days=1))
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.UniformResourceIdentifier(ROLE_URI + role)]
    if pool is not None:
        sans.append(x509.UniformResourceIdentifier(POOL_URI + check_pool_name(pool)))
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_private, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode(),
            serial)


