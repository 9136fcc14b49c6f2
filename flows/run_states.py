"""The groups of flow-run state types the code asks about, named once."""

from __future__ import annotations

ACTIVE = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")
"""A run that has not ended: it may still use its folder, processes and GPU."""
FAILED = ("FAILED", "CRASHED", "CANCELLED")
"""A run that ended without its results: what `mqi rerun` takes up."""
FINISHED = ("COMPLETED", *FAILED)
"""A run that has ended."""
