"""The author's Ed25519 key (`depin key create` / `show`): where it lives, how it signs, how a signature is checked.

The private key is a PKCS#8 PEM file ``ed25519.pem`` (mode 0600, in a 0700 directory: ``depin.keys.dir``,
default ``~/.config/depin/keys``); ``ed25519.pub.json`` beside it holds the public key, its fingerprint and the
name the author gave. A fingerprint is ``SHA256:`` followed by the unpadded base64 of the SHA-256 of the 32 raw
public-key bytes (the style of ``ssh-keygen -l``, over the raw key). Signatures are Ed25519 (RFC 8032) over the
canonical JSON of what is signed (compact, key-sorted, ASCII), encoded in base64.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import pathlib
import stat
from dataclasses import dataclass
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError, TrustError

__all__ = ["ALGORITHM", "SigningKey", "create_key", "fingerprint", "key_dir", "load_key", "verify_signature"]

ALGORITHM = "Ed25519"
KEY_FILE = "ed25519.pem"
PUBLIC_FILE = "ed25519.pub.json"


def key_dir(directory: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The key directory: ``directory``, else the setting ``depin.keys.dir``."""
    return pathlib.Path(os.path.expanduser(str(directory or config.get("keys.dir"))))


def fingerprint(public_key: bytes) -> str:
    """``SHA256:<unpadded base64 of sha256(raw public key)>``."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")


def canonical(obj: Any) -> bytes:
    """The bytes that are signed: compact, key-sorted, ASCII JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key and what is published about it."""

    private: Any  # cryptography's Ed25519PrivateKey
    public: bytes
    name: str | None
    path: pathlib.Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    def sign(self, obj: Any) -> str:
        """The base64 Ed25519 signature of ``canonical(obj)``."""
        return base64.b64encode(self.private.sign(canonical(obj))).decode()


def _raw_public(private: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def create_key(directory: str | os.PathLike[str] | None = None, *, name: str | None = None,
               force: bool = False) -> SigningKey:
    """Make a new key pair in the key directory (refuses to overwrite one unless ``force``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    d = key_dir(directory)
    path = d / KEY_FILE
    if path.exists() and not force:
        raise DepinUsageError(f"a signing key already exists at {path} (fingerprint {load_key(d).fingerprint}); "
                              "keep it (bundles you signed name it), or replace it with --force")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    tmp = d / (KEY_FILE + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    public = _raw_public(private)
    info = {"algorithm": ALGORITHM, "public_key": base64.b64encode(public).decode(),
            "fingerprint": fingerprint(public), "name": name,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    (d / PUBLIC_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return SigningKey(private, public, name, path)


def load_key(directory: str | os.PathLike[str] | None = None) -> SigningKey:
    """The author's key; DepinUsageError (with the fix) when it is missing or readable by others."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    d = key_dir(directory)
    path = d / KEY_FILE
    if not path.is_file():
        raise DepinUsageError(f"no signing key at {path}: create one with `depin key create --name 'Your Name'` "
                              "(or set depin.keys.dir to where yours is), or publish with --unsigned")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DepinUsageError(f"the signing key {path} is readable by others (mode {mode:04o}): run "
                              f"`chmod 600 {path}`; if others may have copied it, make a new one (--force)")
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise DepinUsageError(f"{path} is not an Ed25519 key; make one with `depin key create --force`")
    name = None
    try:
        name = json.loads((d / PUBLIC_FILE).read_text()).get("name")
    except (OSError, ValueError):
        pass
    return SigningKey(private, _raw_public(private), name, path)


def verify_signature(public_key_b64: str, obj: Any, signature_b64: str) -> None:
    """Raise TrustError unless ``signature_b64`` is the Ed25519 signature of ``canonical(obj)`` by that key."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        key.verify(base64.b64decode(signature_b64, validate=True), canonical(obj))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise TrustError(f"the signature does not match the statement and key ({type(exc).__name__})") from None
