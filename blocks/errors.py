"""Typed errors raised by the host blocks.

Each one says what failed and where, in words a clinical user can act on; none
of them ever carries a password, passphrase or private key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from config.errors import MqiError

if TYPE_CHECKING:
    from blocks.results import CommandResult


class HostError(MqiError):
    """Base class of everything a host block raises on purpose."""


class HostConnectError(HostError):
    """The host could not be reached (refused, timed out, reset), after retries."""


class HostAuthenticationError(HostError):
    """The host refused our credentials. Never retried: retrying cannot fix it."""


class HostKeyError(HostError):
    """The host's key is unknown or differs from known_hosts: the connection was refused."""

    def __init__(self, message: str, *, host: str, fingerprint: str,
                 expected_fingerprint: str | None = None) -> None:
        super().__init__(message)
        self.host = host
        self.fingerprint = fingerprint
        self.expected_fingerprint = expected_fingerprint


class CommandError(HostError):
    """A command failed (non-zero exit). Carries the full result."""

    def __init__(self, result: CommandResult, message: str | None = None) -> None:
        self.result = result
        if message is None:
            message = (
                f"command failed on {result.host} with exit code {result.exit_code}: "
                f"{result.command}"
            )
        tail = result.tail()
        super().__init__(f"{message}\n{tail}" if tail else message)


class CommandTimeoutError(CommandError):
    """A command passed its deadline; its whole process group was killed."""

    def __init__(self, result: CommandResult, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            result,
            f"command timed out after {timeout:g} s on {result.host} and its process group "
            f"was killed: {result.command}",
        )


class TransferError(HostError):
    """A transfer could not be completed or verified; nothing unverified was left in place."""
