"""Prefect Blocks: where the outside world is reached.

Blocks know hosts, commands and files. They never know about cases: the flows
decide what to run and where, the blocks only run it and move the bytes.
"""

from blocks.errors import (
    CommandError,
    CommandTimeoutError,
    HostAuthenticationError,
    HostConnectError,
    HostError,
    HostKeyError,
    TransferError,
)
from blocks.local_host import LocalHost
from blocks.remote_host import RemoteHost
from blocks.results import CommandResult, TransferResult

__all__ = [
    "CommandError",
    "CommandResult",
    "CommandTimeoutError",
    "HostAuthenticationError",
    "HostConnectError",
    "HostError",
    "HostKeyError",
    "LocalHost",
    "RemoteHost",
    "TransferError",
    "TransferResult",
]
