"""The supervisor stops a child's whole process tree with one SIGTERM per process.

A second SIGTERM is not harmless: Prefect's runner answers one that lands while it is
already stopping with ``sys.exit(0)`` wherever its loop is, which cut serve's graceful
shutdown short and left tracebacks in its log."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from blocks import procfs
from config.models import RestartPolicy
from deployments.supervisor import Child, Supervisor

# Each process records every SIGTERM it receives, then takes a moment to stop (as
# serve does), so a second signal sent meanwhile would be recorded too. The child
# starts a grandchild in its group and a process that leaves the tree (its parent
# exits) but keeps the group.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    record = sys.argv[1]
    role = sys.argv[2] if len(sys.argv) > 2 else "child"

    def on_term(*_):
        with open(record, "a") as f:
            f.write(f"{role} {os.getpid()}\\n")
        signal.signal(signal.SIGTERM, on_term)

    signal.signal(signal.SIGTERM, on_term)
    if role == "child":
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, __file__, record, "grandchild"])
        if os.fork() == 0:
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, __file__, record, "stray"])
            os._exit(0)
        os.wait()  # the stray's parent: reaped, so the stray is out of the tree
    with open(record + ".ready", "a") as f:
        f.write(f"{role}\\n")
    while True:
        before = open(record).read().count(f" {os.getpid()}\\n") if os.path.exists(record) else 0
        if before:
            time.sleep(1.0)  # a slow, graceful stop
            os._exit(0)
        time.sleep(0.02)
""")


def test_stop_all_signals_each_process_of_the_tree_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Signals that reach a process before its handler runs merge into one, so what the
    # processes record cannot show a second SIGTERM sent at once: the sending can.
    sent: Counter[int] = Counter()
    kill, killpg = os.kill, os.killpg

    def counting_kill(pid: int, sig: int) -> None:
        if sig == signal.SIGTERM:
            sent[pid] += 1
        kill(pid, sig)

    def counting_killpg(pgrp: int, sig: int) -> None:
        if sig == signal.SIGTERM:
            sent.update(p.pid for p in procfs.all_stats() if p.alive and p.pgrp == pgrp)
        killpg(pgrp, sig)

    monkeypatch.setattr(os, "kill", counting_kill)
    monkeypatch.setattr(os, "killpg", counting_killpg)
    script = tmp_path / "proc.py"
    script.write_text(SCRIPT)
    record = tmp_path / "terms.txt"
    child = Child(name="serve", argv=[sys.executable, str(script), str(record)],
                  env={}, log_file=tmp_path / "serve.log")
    supervisor = Supervisor([child], RestartPolicy())
    supervisor.spawn(child)
    ready = Path(f"{record}.ready")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
            not ready.exists() or len(ready.read_text().split()) < 3):
        time.sleep(0.05)
    assert sorted(ready.read_text().split()) == ["child", "grandchild", "stray"]

    supervisor.stop_all(grace=20)

    lines = record.read_text().splitlines()
    roles = sorted(line.split()[0] for line in lines)
    assert roles == ["child", "grandchild", "stray"], (lines, child.log_file.read_text())
    assert sorted(sent) == sorted(int(line.split()[1]) for line in lines)
    assert set(sent.values()) == {1}, sent
    assert child.proc is not None and child.proc.poll() == 0


def test_serve_ignores_a_second_sigterm_while_it_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.runner import Runner

    from deployments.serve import _once_per_shutdown

    runner = Runner(name="test-serve")
    stops: list[str] = []
    monkeypatch.setattr(runner, "execute_in_background", lambda fn: stops.append(fn.__name__))
    monkeypatch.setattr(runner, "started", True)
    monkeypatch.setattr(runner, "_loop", object())
    _once_per_shutdown(runner)

    runner.handle_sigterm(signal.SIGTERM, None)  # starts the graceful stop
    assert runner.stopping and stops == ["astop"]
    runner.handle_sigterm(signal.SIGTERM, None)  # Prefect's own would sys.exit(0) here
    assert stops == ["astop"]
