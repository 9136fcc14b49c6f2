"""Result objects returned by a host's ``run``, ``upload`` and ``download``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CommandResult:
    """What one command did.

    Attributes:
        command: The command as the caller gave it (before wrapping).
        exit_code: The exit status; ``None`` when the command was killed before it ended.
        stdout: Everything the command wrote to standard output, decoded as UTF-8.
        stderr: Everything the command wrote to standard error, decoded as UTF-8.
        duration: Wall-clock seconds from start to end.
        host: Where it ran, for messages (``user@host:port`` or ``localhost``).
        timed_out: True when the command was killed because its deadline passed.
    """

    command: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    host: str = "localhost"
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the command ended by itself with exit status 0."""
        return self.exit_code == 0 and not self.timed_out

    def tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines of stdout and stderr, for error messages."""
        parts = []
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            kept = text.rstrip("\n").splitlines()[-lines:]
            if kept:
                parts.append(f"--- last {len(kept)} line(s) of {name} ---")
                parts.extend(kept)
        return "\n".join(parts)


@dataclass
class TransferResult:
    """What one recursive upload or download moved.

    Attributes:
        source: The directory files were read from.
        destination: The directory files were written to.
        files: Relative paths that were copied (new or changed).
        skipped: Relative paths already present and identical at the destination.
        bytes: Bytes copied (skipped files not counted).
        seconds: Wall-clock duration of the whole transfer, verification included.
        checksums: SHA-256 of every file at the destination (copied and skipped), by relative path.
    """

    source: str
    destination: str
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    checksums: dict[str, str] = field(default_factory=dict)

    @property
    def megabytes_per_second(self) -> float:
        """Throughput of the copied bytes (0 when nothing was copied)."""
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
