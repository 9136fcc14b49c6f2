"""The beams of one machine take GPU slots in arrival order (blocks/admission_line.py)."""

from __future__ import annotations

import contextvars
import logging
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from blocks.admission_line import AdmissionLine


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_ticket_stands_behind_the_older_orders(tmp_path: Path) -> None:
    line = AdmissionLine(tmp_path / "line")
    with line.ticket("b") as b, line.ticket("a") as a, line.ticket("c") as c:
        assert (a.ahead(), b.ahead(), c.ahead()) == (0, 1, 2)
    assert list((tmp_path / "line").iterdir()) == []  # each left the line


def test_a_dead_waiter_leaves_the_line_by_itself(tmp_path: Path) -> None:
    folder = tmp_path / "line"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; "
        "from blocks.admission_line import AdmissionLine\n"
        f"with AdmissionLine(Path({str(folder)!r})).ticket('a'):\n"
        "    print('in line', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "in line"
        with AdmissionLine(folder).ticket("b") as mine:
            assert mine.ahead() == 1
            holder.kill()  # no clean-up runs: its ticket file stays, unlocked
            holder.wait()
            assert len(list(folder.glob("*.ticket"))) == 2
            assert mine.ahead() == 0
            assert [p.name for p in folder.glob("*.ticket")] == [mine.path.name]
    finally:
        if holder.poll() is None:
            holder.kill()


def test_waiters_get_their_turn_in_order_whatever_order_they_came_in(tmp_path: Path) -> None:
    line = AdmissionLine(tmp_path / "line", check_seconds=0.01)
    served: list[str] = []
    orders = ["3", "0", "4", "1", "2"]

    def wait(order: str) -> None:
        with line.ticket(order) as ticket:
            ticket.wait_turn()
            served.append(order)
            time.sleep(0.02)

    with line.ticket("") as first:  # holds the head until every waiter stands in line
        threads = [threading.Thread(target=wait, args=(o,)) for o in orders]
        for t in threads:
            t.start()
        wait_until(lambda: first.ahead() == 0 and len(list(line.folder.glob("*.ticket"))) == 6)
        assert served == []
    for t in threads:
        t.join(20)
    assert served == sorted(orders)


@pytest.mark.integration
def test_admission_hands_a_freed_slot_to_the_oldest_waiting_beam(prefect_api: str) -> None:
    """Real Prefect limit of one slot: waiting beams are admitted by their order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from blocks.gpu_pool import GpuPool

    name = f"mqi-test-line-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    pool = GpuPool(query_command="true", apps_command="true", limit_name=name,
                   lease_seconds=60, admission_poll_seconds=0.05)
    log = logging.getLogger("test.admission")
    admitted: list[str] = []
    orders = ["30", "10", "40", "20"]

    def beam(order: str) -> None:
        with pool.admission(log, order):
            admitted.append(order)
            time.sleep(0.1)

    from prefect.settings import get_current_settings

    from blocks.admission_line import line_folder

    folder = line_folder(str(get_current_settings().api.url), name)
    with pool.admission(log, "00"):  # the one slot is taken
        threads = []
        for order in orders:
            # Prefect's settings (the test server's URL) live in a context variable.
            threads.append(threading.Thread(target=contextvars.copy_context().run,
                                            args=(beam, order)))
            threads[-1].start()
            time.sleep(0.3)  # they come in this order, not the line's
        wait_until(lambda: len(list(folder.glob("*.ticket"))) == len(orders))
        assert admitted == []
    for t in threads:
        t.join(60)
    assert admitted == sorted(orders)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        assert limit.active_slots == 0  # every slot given back
