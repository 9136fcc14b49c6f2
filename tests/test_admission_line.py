"""The beams of one machine take GPU slots in arrival order and wake when a slot is given
back (blocks/admission_line.py, GpuPool.admission)."""

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


def test_a_ticket_stands_behind_the_older_orders(tmp_path: Path) -> None:
    line = AdmissionLine(tmp_path / "line")
    with line.ticket("b") as b, line.ticket("a") as a, line.ticket("c") as c:
        assert (a.ahead(), b.ahead(), c.ahead()) == (0, 1, 2)
    assert list((tmp_path / "line").glob("*.ticket")) == []  # each left the line


def _waiter_elsewhere(folder: Path) -> subprocess.Popen[str]:
    """Another process standing in the line ``folder`` with order 'a', until killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; "
        "from blocks.admission_line import AdmissionLine\n"
        f"with AdmissionLine(Path({str(folder)!r})).ticket('a'):\n"
        "    print('in line', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "in line"
    return holder


def test_a_dead_waiter_leaves_the_line_by_itself(tmp_path: Path) -> None:
    folder = tmp_path / "line"
    holder = _waiter_elsewhere(folder)
    try:
        line = AdmissionLine(folder)
        with line.ticket("b") as mine:
            assert mine.ahead() == 1
            assert line.pass_slot("lease-1") is True  # to the first: the other process
            holder.kill()  # no clean-up runs: its ticket and its baton stay, unlocked
            holder.wait()
            assert len(list(folder.glob("*.ticket"))) == 2
            assert len(list(folder.glob("*.baton"))) == 1
            assert mine.ahead() == 0
            # Its baton goes with its ticket (that slot's lease runs out, as any dead
            # holder's does): nothing of a dead waiter is left in the line's folder.
            assert sorted(p.name for p in folder.iterdir()) == [mine.path.name]
    finally:
        if holder.poll() is None:
            holder.kill()


def test_the_bell_wakes_a_waiter_and_only_a_ring_does(tmp_path: Path) -> None:
    line = AdmissionLine(tmp_path / "line", check_seconds=0.01)
    before = line.chime()
    assert line.wait_for_bell(before, 0.05) is False  # nobody rang
    rang: list[bool] = []
    waiter = threading.Thread(target=lambda: rang.append(line.wait_for_bell(before, 60)))
    waiter.start()
    time.sleep(0.1)
    assert rang == []
    line.ring()
    waiter.join(30)
    assert rang == [True]
    after = line.chime()
    assert after != before
    line.ring()  # every ring is seen, also two in a row
    assert line.chime() != after


def test_a_slot_is_passed_to_the_first_live_waiter_and_taken_once(tmp_path: Path) -> None:
    folder = tmp_path / "line"
    line = AdmissionLine(folder)
    assert line.pass_slot("lease-0") is False  # nobody waits: the API takes it back
    holder = _waiter_elsewhere(folder)
    try:
        holder.kill()  # a dead waiter ahead: passed over, and left no baton behind
        holder.wait()
        with line.ticket("c") as c, line.ticket("b") as b:
            assert line.pass_slot("lease-1") is True
            assert c.take_baton() is None
            assert b.take_baton() == "lease-1"
            assert b.take_baton() is None  # taken once
            assert line.wait_for_bell(line.chime(), 0.05, b.baton) is False
            # Two passed to one waiter: the second waits for it to take the first.
            assert line.pass_slot("lease-2") and line.pass_slot("lease-3")
            assert line.wait_for_bell(line.chime(), 5, b.baton) is True  # a baton came
            assert (b.take_baton(), c.take_baton()) == ("lease-2", "lease-3")
            assert line.pass_slot("lease-4") is True
        # b left the line holding a baton it had not taken: it is b's to hand on.
        assert (b.left_with, c.left_with) == ("lease-4", None)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing left behind


def _limit(slots: int) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"mqi-test-line-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name,
                                                                            limit=slots))
    return name


def _pool(name: str, poll_seconds: float):
    from blocks.gpu_pool import GpuPool

    return GpuPool(query_command="true", apps_command="true", limit_name=name,
                   lease_seconds=60, poll_seconds=poll_seconds)


def _served_late(monkeypatch: pytest.MonkeyPatch, seconds: float,
                 asker: str = "") -> tuple[threading.Event, threading.Event]:
    """From now on a slot request sent by an asking thread whose name starts with
    ``asker`` is served ``seconds`` late (a starved database). Two events: one such
    request was sent, and one was answered."""
    from blocks.gpu_pool import GpuPool

    request = GpuPool._request
    asking, answered = threading.Event(), threading.Event()

    def late(self: GpuPool, client: object) -> object:
        if not threading.current_thread().name.startswith(asker):
            return request(self, client)
        asking.set()
        time.sleep(seconds)
        try:
            return request(self, client)
        finally:
            answered.set()

    monkeypatch.setattr(GpuPool, "_request", late)
    return asking, answered


@pytest.mark.integration
def test_a_freed_slot_goes_to_the_oldest_waiting_beam_woken_by_the_bell(
        prefect_api: str) -> None:
    """A real Prefect limit of one slot; four beams come in out of order and are admitted
    in their order. They ask again only every 60 s unless the bell rings, so finishing
    in well under that shows that a given-back slot wakes the next beam."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from blocks.admission_line import line_folder

    name = _limit(1)
    pool = _pool(name, poll_seconds=60)
    log = logging.getLogger("test.admission")
    admitted: list[str] = []
    orders = ["30", "10", "40", "20"]

    def beam(order: str) -> None:
        with pool.admission(log, order):
            admitted.append(order)
            time.sleep(0.1)

    folder = line_folder(str(get_current_settings().api.url), name)
    with pool.admission(log, "00"):  # the one slot is taken
        threads = []
        for order in orders:
            # Prefect's settings (the test server's URL) live in a context variable.
            threads.append(threading.Thread(target=contextvars.copy_context().run,
                                            args=(beam, order)))
            threads[-1].start()
            time.sleep(0.3)  # they come in this order, not the line's
        deadline = time.monotonic() + 30
        while len(list(folder.glob("*.ticket"))) < len(orders):
            assert time.monotonic() < deadline, "the beams did not stand in line"
            time.sleep(0.05)
        assert admitted == []
    started = time.monotonic()
    for t in threads:
        t.join(max(1.0, 40 - (time.monotonic() - started)))
    assert not any(t.is_alive() for t in threads), (
        f"admitted only {admitted} within 40 s: the bell did not wake the line")
    assert admitted == sorted(orders)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


@pytest.mark.integration
def test_a_slot_freed_elsewhere_is_asked_for_by_the_oldest_alone_then_passed_on(
        prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one slot is held through the API (a beam on another machine); three waiters
    looking every 0.1 s send no slot request while it is held (they read the limit).
    Once it is given back, the oldest alone asks and takes it, and each beam done with
    it passes it to the next of the line: no other request, and it never went back to
    the API, where another beam could have taken it."""
    from prefect.client.orchestration import get_client

    from blocks.gpu_pool import GpuPool

    name = _limit(1)
    pool = _pool(name, poll_seconds=0.1)
    log = logging.getLogger("test.admission")
    asked: list[str] = []
    admitted: list[tuple[str, int]] = []
    request = GpuPool._request

    def counted(self: GpuPool, client: object) -> object:
        asked.append(threading.current_thread().name.split("/")[0])  # its asking thread
        return request(self, client)

    monkeypatch.setattr(GpuPool, "_request", counted)

    def beam(order: str) -> None:
        with pool.admission(log, order), get_client(sync_client=True) as client:
            held = client.read_global_concurrency_limit_by_name(name).active_slots
            admitted.append((order, held))
            time.sleep(0.2)

    with get_client(sync_client=True) as client:
        lease = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=60).json()["lease_id"]
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(beam, o),
                                    name=f"beam-{o}") for o in ("3", "1", "2")]
        for t in threads:
            t.start()
        time.sleep(2.0)  # about twenty looks each
        assert asked == [] and admitted == []
        client.release_concurrency_slots_with_lease(lease)
    for t in threads:
        t.join(30)
    assert admitted == [("1", 1), ("2", 1), ("3", 1)]
    assert asked == ["beam-1"]
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


@pytest.mark.integration
def test_a_slot_passed_while_the_waiter_asks_is_taken_at_once_and_the_late_one_handed_on(
        prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter whose slot request takes 4 s (a starved database) is passed a slot
    meanwhile: it holds that one at once, and the slot its request is granted later
    goes back (nobody else waits), so none is left taken, also after the waiter's own
    Prefect client was closed."""
    from prefect.client.orchestration import get_client
    from prefect.context import SyncClientContext

    name = _limit(2)
    pool = _pool(name, poll_seconds=0.1)
    log = logging.getLogger("test.admission")
    admitted_at: list[float] = []
    release = threading.Event()

    def holder() -> None:
        with pool.admission(log, "0"):
            admitted_at.append(time.monotonic())
            release.wait(30)

    def waiter() -> None:
        # As in a task run: a client of the run's context, closed when the run ends
        # (here: before the late request is answered).
        with SyncClientContext.get_or_create(), pool.admission(log, "1"):
            admitted_at.append(time.monotonic())

    with get_client(sync_client=True) as client:
        lease = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=60).json()["lease_id"]
        first = threading.Thread(target=contextvars.copy_context().run, args=(holder,))
        first.start()
        deadline = time.monotonic() + 20
        while not admitted_at:
            assert time.monotonic() < deadline, "the holder took no slot"
            time.sleep(0.05)
        asking, answered = _served_late(monkeypatch, 4.0)
        second = threading.Thread(target=contextvars.copy_context().run, args=(waiter,))
        second.start()
        time.sleep(0.5)
        client.release_concurrency_slots_with_lease(lease)  # freed "elsewhere": it asks
        assert asking.wait(10)
        passed = time.monotonic()
        release.set()  # the holder passes its slot to the asking waiter
        second.join(30)
        first.join(30)
        assert len(admitted_at) == 2
        assert admitted_at[1] - passed < 2.0, "the passed slot waited for the request"
        # The request's own slot comes in after the waiter (and its client) left, and
        # goes back.
        assert answered.wait(20), "the late request was never answered"
        deadline = time.monotonic() + 20
        while client.read_global_concurrency_limit_by_name(name).active_slots != 0:
            assert time.monotonic() < deadline, "the late slot was not given back"
            time.sleep(0.2)


@pytest.mark.integration
def test_a_slot_granted_to_a_newer_waiter_first_goes_to_the_oldest(
        prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two free slots, two waiters asking at once; the API answers the newer one first
    (the older one's request takes 3 s, as on a starved SQLite server). The newer one
    hands its slot to the older, which holds it at once, and takes the older one's late
    slot in turn: admitted in the line's order, and every slot given back at the end."""
    from prefect.client.orchestration import get_client

    name = _limit(2)
    pool = _pool(name, poll_seconds=60)
    log = logging.getLogger("test.admission")
    older_asking, _ = _served_late(monkeypatch, 3.0, asker="beam-1/")  # its asking thread
    admitted: list[tuple[str, float]] = []

    def beam(order: str) -> None:
        with pool.admission(log, order):
            admitted.append((order, time.monotonic()))
            time.sleep(0.5)

    started = time.monotonic()
    older = threading.Thread(target=contextvars.copy_context().run, args=(beam, "1"),
                             name="beam-1")
    older.start()
    assert older_asking.wait(20), "the older waiter did not ask"
    newer = threading.Thread(target=contextvars.copy_context().run, args=(beam, "2"),
                             name="beam-2")
    newer.start()
    older.join(30)
    newer.join(30)
    assert [order for order, _ in admitted] == ["1", "2"]
    assert admitted[0][1] - started < 2.5, "the older waiter waited for its own request"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


@pytest.mark.integration
def test_free_slots_go_to_several_waiters_at_once_and_a_missing_limit_fails(
        prefect_api: str) -> None:
    """Two slots, two beams: both hold one at the same time (the first of the line ask
    together, not one after the other). A limit that does not exist is an error."""
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

    name = _limit(2)
    pool = _pool(name, poll_seconds=60)
    log = logging.getLogger("test.admission")
    both = threading.Barrier(2, timeout=30)

    def beam(order: str) -> None:
        with pool.admission(log, order):
            both.wait()  # breaks (an error in the thread) unless both hold a slot

    errors: list[BaseException] = []

    def run(order: str) -> None:
        try:
            beam(order)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, o))
               for o in ("1", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []

    missing = _pool(f"mqi-test-missing-{uuid.uuid4().hex[:8]}", 1)
    with pytest.raises(ConcurrencySlotAcquisitionError, match="does not exist"), \
            missing.admission(log, "1"):
        pass
