"""Checks on this machine: the local folders and the Prefect API."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from config import MqiConfig
from deployments import server
from deployments.doctor.check import Check, CheckFailed, attempt


# ------------------------------------------------------------- 7. local folders
def check_local_dir(key: str, path: Path, *, must_exist: bool) -> Check:
    def body() -> str:
        where = path
        while not where.exists() and not must_exist and where != where.parent:
            where = where.parent
        if not where.exists():
            raise CheckFailed("does not exist", f"create it (mkdir -p {path}) or fix {key}")
        if not where.is_dir():
            raise CheckFailed(f"{where} is not a folder", f"fix {key}")
        try:
            fd, temp = tempfile.mkstemp(prefix=".mqi-doctor.", dir=where)
        except OSError as exc:
            raise CheckFailed(f"{where} is not writable ({exc.strerror})",
                              f"give this user write access to {where}, or fix {key}") from None
        os.close(fd)
        os.unlink(temp)
        return "writable" + ("" if where == path else
                             f" (not there yet; made in {where} when needed)")

    return attempt(f"{key} {path}", body)


# ------------------------------------------------------------------ 8. Prefect
def check_api(cfg: MqiConfig, timeout: float) -> Check:
    url = cfg.prefect.effective_api_url
    shown = server.mask_url(url)
    if server.is_healthy(url, timeout=timeout):
        return Check(f"Prefect API answers at {shown}", True)
    if cfg.prefect.api_url is None:
        return Check(f"Prefect API at {shown}", None, "the embedded server is not running",
                     "`mqi up` starts it")
    return Check(f"Prefect API at {shown}", False, "does not answer /health",
                 "start that server, or fix prefect.api_url (null: `mqi up` starts an "
                 "embedded one)")
