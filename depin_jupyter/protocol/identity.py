"""Who a peer is on a volunteer network: join tokens and what a certificate says (name, role, pool).

Every peer (scheduler, volunteer worker, scientist's client) holds a leaf certificate naming it (``CN``)
and its role (``OU`` and a ``depin://role/...`` URI); a worker's also names its pool. A join token is one
copy-pasteable string carrying the scheduler address, the CA certificate and that leaf certificate with
its key. The certificate authority itself lives on the coordinator (`network.pki`).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import zlib
from dataclasses import dataclass
from typing import Any

from depin_jupyter.errors import DepinUsageError

__all__ = ["DEFAULT_POOL", "POOL_URI", "ROLES", "ROLE_URI", "TOKEN_PREFIX", "CertInfo", "Token", "cert_info",
           "cert_pool", "check_pool_name", "peer_identity", "peer_pool"]


ROLES = ("scheduler", "worker", "client")


TOKEN_PREFIX = "depin1-"


ROLE_URI = "depin://role/"


POOL_URI = "depin://pool/"


DEFAULT_POOL = "volunteer"  # a worker certificate without a pool mark (issued before pools existed)


def check_pool_name(pool: str) -> str:
    """A pool name is letters, digits, '-', '_' and '.' (it becomes a URI and a Dask resource name)."""
    import re

    if not isinstance(pool, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", pool):
        raise DepinUsageError(f"invalid pool name {pool!r}: use letters, digits, '-', '_' or '.'")
    return pool


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says about its holder."""

    name: str
    role: str
    serial: int
    not_after: dt.datetime
    issuer: str


def cert_info(cert_pem: str) -> CertInfo:
    """Name, role, serial and expiry of a PEM certificate."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return CertInfo(name=str(cn[0].value) if cn else "", role=str(ou[0].value) if ou else "",
                    serial=cert.serial_number, not_after=cert.not_valid_after_utc,
                    issuer=cert.issuer.rfc4514_string())


def peer_identity(peercert: dict[str, Any] | None) -> tuple[str, set[str], int | None]:
    """(name, roles, serial) from ``ssl.getpeercert()`` as Dask's TLS comm records it in ``extra_info``."""
    cert = peercert or {}
    name = ""
    roles: set[str] = set()
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                name = v
            elif k == "organizationalUnitName":
                roles.add(v)
    uri_roles = {v[len(ROLE_URI):] for k, v in cert.get("subjectAltName", ())
                 if k == "URI" and v.startswith(ROLE_URI)}
    # both marks must agree: a certificate is one role, never a union of what its fields claim
    if uri_roles and roles and uri_roles != roles:
        roles = set()
    serial = cert.get("serialNumber")
    return name, (roles or uri_roles), (int(serial, 16) if serial else None)


def peer_pool(peercert: dict[str, Any] | None) -> str:
    """The pool a peer certificate (as ``ssl.getpeercert()`` gives it) puts its holder in.

    A certificate with no pool mark is in `DEFAULT_POOL`; one with several marks is in none ("").
    """
    pools = {v[len(POOL_URI):] for k, v in (peercert or {}).get("subjectAltName", ())
             if k == "URI" and v.startswith(POOL_URI)}
    if not pools:
        return DEFAULT_POOL
    return next(iter(pools)) if len(pools) == 1 else ""


def cert_pool(cert_pem: str) -> str:
    """The pool of a PEM certificate (same rules as `peer_pool`)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return peer_pool({"subjectAltName": [("URI", u) for u in uris]})


@dataclass(frozen=True)
class Token:
    """Everything one peer needs to join: where, whom to trust, who it is."""

    address: str
    ca: str
    cert: str
    key: str

    @property
    def info(self) -> CertInfo:
        return cert_info(self.cert)

    def encode(self) -> str:
        raw = json.dumps({"address": self.address, "ca": self.ca, "cert": self.cert, "key": self.key},
                         separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Token:
        """Parse a token string, or read it from a file path; errors say what is wrong with it."""
        import pathlib

        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            path = pathlib.Path(text).expanduser()
            try:
                is_file = path.is_file()
            except OSError:  # a long token-like string is not a path
                is_file = False
            if is_file:
                text = path.read_text().strip()
        if not text.startswith(TOKEN_PREFIX):
            raise DepinUsageError(
                f"not a depin token (it should start with {TOKEN_PREFIX!r}, or be a file holding one). Ask the "
                f"coordinator for one: `depin token issue --role client --name YOU`.")
        body = text[len(TOKEN_PREFIX):]
        try:
            data = json.loads(zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))
            token = cls(address=data["address"], ca=data["ca"], cert=data["cert"], key=data["key"])
            token.info  # noqa: B018 - parses the certificate
        except Exception as e:  # noqa: BLE001 - any corruption gets the same advice
            raise DepinUsageError(f"the token is damaged ({type(e).__name__}); copy it again in full, "
                                  f"without line breaks.") from None
        return token

    def check_valid(self, role: str) -> None:
        """Refuse locally, with a clear reason, a token for the wrong role or one that has expired."""
        info = self.info
        if info.role != role:
            raise DepinUsageError(
                f"this token is for a {info.role or 'unknown'} (name {info.name!r}), not a {role}. Use a "
                f"`--role {role}` token: `depin token issue --role {role} --name NAME` on the coordinator.")
        if info.not_after < dt.datetime.now(dt.timezone.utc):
            raise DepinUsageError(
                f"this token for {info.name!r} expired on {info.not_after:%Y-%m-%d %H:%M} UTC; ask the "
                f"coordinator for a new one (`depin token issue --role {role} --name {info.name}`).")

    def security(self, role: str) -> Any:
        """A Dask ``Security`` for this identity: mutual TLS, encryption required."""
        from distributed.security import Security

        return Security(tls_ca_file=self.ca, require_encryption=True,
                        **{f"tls_{role}_cert": self.cert, f"tls_{role}_key": self.key})
