"""A flow that writes down how its process was started (for the warm-start test)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from prefect import flow


@flow(name="where-am-i")
def where_am_i(out: str) -> None:
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    Path(out).write_text(json.dumps({
        "pid": os.getpid(), "parent_cmdline": parent,
        "pipeline_preloaded": "flows.process_case" in sys.modules}))
