"""One check's outcome, and how a check is run and printed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from config import MqiError


class CheckFailed(MqiError):
    """One check found a problem; ``fix`` says what the operator can do about it."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem} — {fix}")
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Check:
    """The outcome of one check.

    Attributes:
        what: What was checked, naming the host or path (with details when it passed).
        passed: True, False, or None for a check that was skipped or only informs.
        problem: Why it failed or was skipped.
        fix: How to fix it (failed and informing checks).
    """

    what: str
    passed: bool | None
    problem: str = ""
    fix: str = ""

    def line(self, unicode: bool = True) -> str:
        ok, bad, dash = ("✓", "✗", "—") if unicode else ("OK", "FAIL", "--")
        if self.passed:
            return f"{ok} {self.what}"
        if self.passed is False:
            return f"{bad} {self.what}: {self.problem} {dash} {self.fix}"
        if self.fix:
            return f"- {self.what}: {self.problem} {dash} {self.fix}"
        return f"- {self.what}: skipped ({self.problem})"


def attempt(what: str, body: Callable[[], str | None]) -> Check:
    """Run one check: ``body`` returns details for the ✓ line or raises CheckFailed."""
    try:
        detail = body()
    except CheckFailed as exc:
        return Check(what, False, exc.problem, exc.fix)
    return Check(f"{what}: {detail}" if detail else what, True)


def skipped(what: str, why: str) -> Check:
    return Check(what, None, why)
