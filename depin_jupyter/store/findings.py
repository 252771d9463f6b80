"""What `depin verify` reports: one located `Problem` per mismatch (shared by the digest checks and the audit)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Problem"]


@dataclass(frozen=True)
class Problem:
    """One mismatch, located as precisely as the store allows."""

    message: str
    run_id: str | None = None
    output: str | None = None
    array: str | None = None
    chunk: str | None = None
    ledger_seq: int | None = None
    key: str | None = None
    """The store key (file) at fault, where no run or ledger entry names the place better."""

    @property
    def where(self) -> str:
        """``run R / output O / array A / chunk C``, ``ledger entry N`` or ``file K`` (with its run, if any)."""
        if self.ledger_seq is not None:
            return f"ledger entry {self.ledger_seq}"
        if self.key is not None:
            return f"file {self.key}" + (f" (run {self.run_id})" if self.run_id else "")
        parts = [f"run {self.run_id}"]
        if self.output:
            parts.append(f"output {self.output}")
        if self.array and self.array != self.output:
            parts.append(f"array {self.array}")
        if self.chunk:
            parts.append(f"chunk {self.chunk}")
        return " / ".join(parts)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"
