"""What an audit found besides the numbers, with how bad it is (the exit code follows from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: "tampered": evidence that a record was altered or removed (``fedvault audit`` exits 2);
#: "unverified": spend the audit counts but cannot vouch for, or a disagreement that an honest
#: run can also produce, e.g. a crash mid-round or a reply lost in transit (exit 3).
Severity = Literal["tampered", "unverified"]


@dataclass(frozen=True)
class Finding:
    """One problem: its severity, a stable ``code`` for scripts, and a message naming what and where."""

    severity: Severity
    code: str
    message: str
