"""The coordinator's state directory: its certificate authority, the registry of issued certificates, credit.

The CLI (`depin token ...`) and the running scheduler share it; the scheduler re-reads the registry when it
changes. Revocation is recorded in the registry (``tokens.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError
from depin_jupyter.network.pki import create_ca, issue
from depin_jupyter.protocol.identity import DEFAULT_POOL, ROLES, Token, cert_info

__all__ = ["StateDir", "default_state_dir", "write_atomic"]


def default_state_dir() -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(config.get("coordinator.state-dir")))


def write_atomic(path: pathlib.Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDir:
    """The coordinator's directory: CA, issued certificates, address and credit ledger."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = pathlib.Path(path).expanduser() if path else default_state_dir()
        self._registry_cache: tuple[Any, dict[str, Any]] | None = None

    # --- files ---
    @property
    def exists(self) -> bool:
        return (self.path / "ca.pem").exists()

    def read_json(self, name: str, default: Any) -> Any:
        """A JSON file of the state dir, or ``default`` when it does not exist."""
        p = self.path / name
        if not p.exists():
            return default
        return json.loads(p.read_text())

    def init(self, address: str, hosts: tuple[str, ...] = ()) -> bool:
        """Create the CA and the scheduler's certificate on first use; record ``address``. True if new."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        new = not self.exists
        if new:
            ca, ca_key = create_ca()
            write_atomic(self.path / "ca.key", ca_key)
            write_atomic(self.path / "ca.pem", ca, 0o644)
            write_atomic(self.path / "tokens.json", json.dumps({"certificates": []}))
        meta = self.read_json("coordinator.json", {})
        if meta.get("address") != address or new:
            write_atomic(self.path / "coordinator.json", json.dumps({"address": address}))
        cert, key, serial = issue(self.ca, self.ca_key, "scheduler", "scheduler", days=3650, hosts=hosts)
        self._register("scheduler", "scheduler", serial, cert_info(cert).not_after.timestamp())
        write_atomic(self.path / "scheduler.pem", cert, 0o644)
        write_atomic(self.path / "scheduler.key", key)
        return new

    @property
    def ca(self) -> str:
        return (self.path / "ca.pem").read_text()

    @property
    def ca_key(self) -> str:
        return (self.path / "ca.key").read_text()

    @property
    def address(self) -> str:
        meta = self.read_json("coordinator.json", {})
        if "address" not in meta:
            raise DepinUsageError(f"{self.path} holds no coordinator; start one with "
                                  f"`depin scheduler --state-dir {self.path}`.")
        return str(meta["address"])

    def scheduler_client_security(self) -> Any:
        """The scheduler's own certificate as a client's: how the coordinator talks to itself (the gateway)."""
        from distributed.security import Security

        return Security(tls_ca_file=str(self.path / "ca.pem"), require_encryption=True,
                        tls_client_cert=str(self.path / "scheduler.pem"),
                        tls_client_key=str(self.path / "scheduler.key"))

    def scheduler_security(self) -> Any:
        from distributed.security import Security

        return Security(tls_ca_file=str(self.path / "ca.pem"), require_encryption=True,
                        tls_scheduler_cert=str(self.path / "scheduler.pem"),
                        tls_scheduler_key=str(self.path / "scheduler.key"))

    # --- certificates and tokens ---
    def registry(self) -> dict[str, Any]:
        """The issued certificates (re-read only when the file changed)."""
        p = self.path / "tokens.json"
        try:
            st = p.stat()
            # Every write replaces the file (a new inode): two writes within one tick of the file system's
            # coarse clock have the same mtime, and a cache keyed on it alone missed a token just issued.
            stamp: Any = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._registry_cache is None or self._registry_cache[0] != stamp:
            self._registry_cache = (stamp, self.read_json("tokens.json", {"certificates": []}))
        return self._registry_cache[1]

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        """Hold the registry for a read-modify-write: the scheduler and `depin token` may write at once."""
        import fcntl

        fd = os.open(self.path / ".tokens.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _register(self, name: str, role: str, serial: int, expires: float, pool: str | None = None,
                  **lab: Any) -> None:
        entry = {"name": name, "role": role, "serial": str(serial), "issued": time.time(),
                 "expires": expires, "revoked": None}
        if pool is not None:
            entry["pool"] = pool
        entry.update({k: v for k, v in lab.items() if v})  # quota, educator (virtual labs, `lab.py`)
        with self._registry_lock():
            reg = self.read_json("tokens.json", {"certificates": []})
            reg["certificates"].append(entry)
            write_atomic(self.path / "tokens.json", json.dumps(reg, indent=1))

    def issue_token(self, role: str, name: str, days: float | None = None,
                    not_after: Any = None, pool: str | None = None, quota: Any = None,
                    educator: bool = False) -> Token:
        """Issue a certificate to ``name`` in ``role`` and return its join token.

        ``pool`` (workers; default ``volunteer``) is written into the certificate: the coordinator puts the
        worker in that pool whatever it claims (see `RoleGate`)."""
        if not self.exists:
            raise DepinUsageError(f"no coordinator in {self.path}; start it first: `depin scheduler "
                                  f"--state-dir {self.path}`.")
        if role == "scheduler":
            raise DepinUsageError("tokens are for workers and clients; the scheduler has its own certificate")
        days = config.get("coordinator.token-days") if days is None else days
        if role == "worker" and pool is None:
            pool = DEFAULT_POOL
        elif role != "worker" and pool is not None:
            raise DepinUsageError("--pool is for worker tokens: a client is in no pool")
        if (quota or educator) and role != "client":
            raise DepinUsageError("--quota and --educator are for client tokens (students, educators)")
        from depin_jupyter.network.lab import parse_quota  # lab imports this module

        quota = parse_quota(quota) or None  # checked before anything is issued
        cert, key, serial = issue(self.ca, self.ca_key, name, role, days=float(days), not_after=not_after,
                                  pool=pool)
        self._register(name, role, serial, cert_info(cert).not_after.timestamp(), pool=pool, quota=quota,
                       educator=educator)
        return Token(address=self.address, ca=self.ca, cert=cert, key=key)

    def revoke(self, name: str) -> int:
        """Revoke every certificate issued to ``name``; returns how many were live."""
        with self._registry_lock():
            reg = self.read_json("tokens.json", {"certificates": []})
            n = 0
            for c in reg["certificates"]:
                if c["name"] == name and c["role"] != "scheduler" and not c["revoked"]:
                    c["revoked"] = time.time()
                    n += 1
            if not n:
                raise DepinUsageError(f"no live certificate is issued to {name!r} (see `depin token list`)")
            write_atomic(self.path / "tokens.json", json.dumps(reg, indent=1))
        return n

    def admit(self, name: str, roles: set[str], serial: int | None) -> str | None:
        """None if this certificate may connect, else the reason it may not."""
        if len(roles) != 1 or not roles <= set(ROLES):
            return f"certificate of {name!r} carries no valid depin role"
        for c in self.registry()["certificates"]:
            if c["serial"] == str(serial):
                if c["revoked"]:
                    return f"the token of {name!r} was revoked by the coordinator"
                if c["name"] != name or c["role"] not in roles:
                    return f"certificate of {name!r} does not match what was issued"
                return None
        return f"certificate of {name!r} (serial {serial}) was not issued by this coordinator's registry"

    def revoked(self, name: str) -> bool:
        """Whether every certificate issued to ``name`` was revoked."""
        certs = [c for c in self.registry()["certificates"] if c["name"] == name]
        return bool(certs) and all(c["revoked"] for c in certs)

    # --- credit ---
    def credits(self) -> dict[str, dict[str, float]]:
        return self.read_json("credits.json", {})

    def save_credits(self, credits: dict[str, dict[str, float]]) -> None:
        write_atomic(self.path / "credits.json", json.dumps(credits, indent=1, sort_keys=True))

    # --- reputation (replicated runs) ---
    def reputation(self) -> dict[str, dict[str, int]]:
        return self.read_json("reputation.json", {})

    def save_reputation(self, reputation: dict[str, dict[str, int]]) -> None:
        write_atomic(self.path / "reputation.json", json.dumps(reputation, indent=1, sort_keys=True))
