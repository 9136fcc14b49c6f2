"""A real PostgreSQL for the tests: the one running on 127.0.0.1:5432 when there is one
(trust auth for user postgres), otherwise a cluster started here in a temp folder.
Each test gets a database of its own, dropped afterwards."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.sshd import free_port

SYSTEM_PORT = 5432


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or \
        ([p] if (p := shutil.which(name)) else [])
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed and no server answers on "
                           f"127.0.0.1:{SYSTEM_PORT}: run scripts/install.sh test")
    return found[-1]


@contextmanager
def _own_cluster() -> Iterator[int]:
    """initdb + postgres in a temp folder, as the postgres user when we are root."""
    folder = Path(tempfile.mkdtemp(prefix="mqi-pg-"))
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, _bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    server = subprocess.Popen(
        [*as_user, _bin("postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
         "-h", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the PostgreSQL started for the tests did not come up")
            time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


async def _admin(port: int, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres",
                                 database="postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database; yields its SQLAlchemy URL for Prefect (postgresql+asyncpg://)."""
    name = f"mqi_test_{uuid.uuid4().hex[:12]}"
    with (_system_cluster() if _listening(SYSTEM_PORT) else _own_cluster()) as port:
        asyncio.run(_admin(port, f'CREATE DATABASE "{name}"'))
        try:
            yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{name}"
        finally:
            asyncio.run(_admin(port, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def _system_cluster() -> Iterator[int]:
    yield SYSTEM_PORT
