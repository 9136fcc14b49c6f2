"""A migrated Prefect database for test installations, made once and copied.

A Prefect server on a new SQLite file first runs every migration of its schema: 18 s
and as much CPU here, against 6 s on a file already at the head revision. The suite
starts about twenty servers, side by side on two cores, so each test installation's
server starts on a copy of one database that ``prefect server database upgrade``
migrated. Prefect migrates it, Prefect serves it: only the repetition is saved. The
session's own server (tests/conftest.py ``prefect_api``), the demo and every
installation outside ``write_installation`` still start on a new file.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def template() -> Path:
    """The migrated database for this Prefect version, made by the first who asks (the
    test workers share it through a lock)."""
    import prefect

    folder = Path(tempfile.gettempdir()) / "mqi-test-databases"
    folder.mkdir(exist_ok=True)
    path = folder / f"prefect-{prefect.__version__}.db"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            draft = folder / f".{path.name}.{os.getpid()}"
            draft.unlink(missing_ok=True)
            env = {**os.environ, "PREFECT_HOME": str(folder),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{draft}"}
            done = subprocess.run([sys.executable, "-m", "prefect", "server", "database",
                                   "upgrade", "-y"], env=env, capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"migrating a template database failed:\n{done.stdout}"
                                   f"\n{done.stderr}")
            os.replace(draft, path)
    return path


def seed(database: Path) -> None:
    """Put a copy of the migrated database at ``database`` (a new installation's)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template(), database)
