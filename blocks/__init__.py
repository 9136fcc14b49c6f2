"""Prefect Blocks: where the outside world is reached.

Blocks know hosts, commands and files. They never know about cases: the flows
decide what to run and where, the blocks only run it and move the bytes.

Names are imported on first use: importing a submodule (``blocks.procfs``)
must not import Prefect, whose settings are read once at import time — the
CLI sets the API address first.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CommandError": "blocks.errors",
    "CommandTimeoutError": "blocks.errors",
    "HostAuthenticationError": "blocks.errors",
    "HostConnectError": "blocks.errors",
    "HostError": "blocks.errors",
    "HostKeyError": "blocks.errors",
    "TransferError": "blocks.errors",
    "CommandResult": "blocks.results",
    "TransferResult": "blocks.results",
    "Host": "blocks.host",
    "LocalHost": "blocks.local_host",
    "RemoteHost": "blocks.remote_host",
    "GpuPool": "blocks.gpu_pool",
    "PublishedConfig": "blocks.published_config",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'blocks' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
