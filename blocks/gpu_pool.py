"""GpuPool: which GPUs the GPU host has, and how a simulation gets exactly one of them.

Two layers make "no two simulations on one GPU index at once" hold across
processes and machines (docs/gpu-allocation.md#admission-and-the-index-lock):

1. admission: one Prefect global concurrency limit sized to the usable GPUs,
   taken with ``strict=True`` (a misspelt limit is an error, not an
   unthrottled run) and a lease, so a crashed holder's slot comes back; a task
   waits here, and says so in its log, while every GPU is busy;
2. the index: the simulation runs under ``flock -n`` on a per-index lock file
   on the GPU host. The kernel holds that lock exactly as long as the process
   lives, so even when Prefect's bookkeeping is wrong (a lost lease, a
   restarted server) two simulations can never share a device. A beam picks
   an index whose lock is free; if it loses a race for it, the wrapper exits
   LOCK_BUSY_EXIT at once and the beam picks again.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import io
import itertools
import json
import logging
import re
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from prefect.blocks.core import Block
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from pydantic import Field, HttpUrl

from blocks.errors import HostError
from blocks.host import Host
from blocks.manifest import part_name

if TYPE_CHECKING:
    from blocks.admission_line import AdmissionLine, Ticket

log = logging.getLogger("mqi.gpu_pool")

# Separators of the sections of ``GpuPool.snapshot``'s one command's output.
_APPS, _LOCKS = "---mqi-compute-apps---", "---mqi-held-locks---"

LOCK_BUSY_EXIT = 75
"""Exit status of ``flock -n`` (via -E) when another process holds the GPU's lock file."""

_WRITE_INPUT = ('mkdir -p -- "${1%/*}" && cat > "$2" && mv -f -- "$2" "$1" && '
                'exec sh -c "$3" </dev/null')
"""Under the lock (``locked_command``): stdin into file $1 by way of $2, then command $3."""


PASS_WITHIN_FRACTION = 0.125
"""A passed slot is held only if taken within this fraction of ``lease_seconds``: its
giver's renewal thread renewed the lease at most 3/4 of a lease before, so at least 1/4
is left when it is passed; half of that is the margin."""

ASK_STAGGER_SECONDS = 0.05
"""Of the first beams of the admission line woken at once, each asks this much later
than the one before it (blocks/admission_line.py)."""

ADMISSION_RETRIES = 5
"""How often a failed request for a GPU slot is sent again when the API was only busy."""


def _release(lease_id: UUID, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Give a slot back (its lease ends). A busy API is asked again a few times: a slot
    whose release is lost stays taken until its lease expires (``lease_seconds``)."""
    from prefect.client.orchestration import get_client

    for attempt in itertools.count():
        try:
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(lease_id)
            return
        except Exception as exc:
            if attempt >= ADMISSION_RETRIES or not _transient(exc):
                raise
            logger.info("giving the GPU slot back failed (%s); trying again", exc)
            time.sleep(min(0.5 * 2 ** attempt, 5.0))


def _token(lease_id: UUID, limits: list[Any]) -> str:
    """A held slot as text, for passing it to another beam of the line: its lease, the
    limits it counts in (for the events its new holder emits) and when it was passed."""
    return json.dumps({"lease_id": str(lease_id), "passed_at": time.time(),
                       "limits": [limit.model_dump(mode="json") for limit in limits]})


def _from_token(token: str) -> tuple[UUID, list[Any], float]:
    """The lease id and limits of a slot passed as ``_token``, and its age in seconds."""
    from prefect.client.schemas.responses import MinimalConcurrencyLimitResponse

    data = json.loads(token)
    return (UUID(data["lease_id"]),
            [MinimalConcurrencyLimitResponse.model_validate(limit) for limit in data["limits"]],
            max(0.0, time.time() - float(data["passed_at"])))


def _transient(exc: BaseException) -> bool:
    """Whether a failed slot request may succeed if asked again: the API answered 5xx,
    or the connection failed — not a missing limit or a request the server refused."""
    import httpx

    # The client raises the HTTP error itself; Prefect's concurrency helpers wrap it.
    cause = exc if isinstance(exc, (httpx.HTTPError, OSError, TimeoutError)) else exc.__cause__
    if isinstance(cause, httpx.HTTPStatusError):
        return cause.response.status_code >= 500
    return isinstance(cause, (httpx.TransportError, OSError, TimeoutError))


class GpuQueryError(RuntimeError):
    """The GPU query failed or printed something that is not nvidia-smi CSV."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    memory_free_mib: int
    utilization_pct: int | None = None
    temperature_c: int | None = None


@dataclass(frozen=True)
class ComputeApp:
    pid: int
    gpu_uuid: str
    used_memory_mib: int | None


def _number(text: str) -> int | None:
    """'81559 MiB' / '81559' / '100 %' / '[N/A]' -> int or None."""
    value = text.strip().split(" ")[0]
    if not value or value.startswith("[") or value.lower() in ("n/a", "nan"):
        return None
    return int(float(value))


def _rows(text: str) -> tuple[list[str] | None, list[list[str]]]:
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO("\n".join(lines)))]
    if rows and rows[0] and rows[0][0].split(" ")[0] in ("index", "pid"):
        header = [cell.split(" [")[0] for cell in rows[0]]
        return header, rows[1:]
    return None, rows


GPU_FIELDS = ["index", "uuid", "name", "memory.total", "memory.used", "memory.free",
              "utilization.gpu", "temperature.gpu"]
APP_FIELDS = ["pid", "gpu_uuid", "used_memory"]


def parse_gpu_query(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=...`` CSV, with or without header and units.

    Without a header the columns are taken to be GPU_FIELDS (the configured query).
    """
    header, rows = _rows(text)
    fields = header or GPU_FIELDS
    gpus = []
    for row in rows:
        if len(row) < len(fields):
            raise GpuQueryError(f"unexpected GPU query line: {', '.join(row)}")
        cell = dict(zip(fields, row, strict=False))
        try:
            gpus.append(GpuInfo(
                index=int(cell["index"]), uuid=cell["uuid"], name=cell["name"],
                memory_total_mib=_number(cell["memory.total"]) or 0,
                memory_used_mib=_number(cell["memory.used"]) or 0,
                memory_free_mib=_number(cell["memory.free"]) or 0,
                utilization_pct=_number(cell.get("utilization.gpu", "")),
                temperature_c=_number(cell.get("temperature.gpu", ""))))
        except (KeyError, ValueError) as exc:
            raise GpuQueryError(f"unexpected GPU query line: {', '.join(row)} ({exc})") from None
    return gpus


def parse_compute_apps(text: str) -> list[ComputeApp]:
    """Parse ``nvidia-smi --query-compute-apps=...`` CSV, with or without header and units."""
    header, rows = _rows(text)
    fields = [("used_memory" if f == "used_gpu_memory" else f) for f in (header or APP_FIELDS)]
    apps = []
    for row in rows:
        cell = dict(zip(fields, row, strict=False))
        try:
            apps.append(ComputeApp(pid=int(cell["pid"]), gpu_uuid=cell["gpu_uuid"],
                                   used_memory_mib=_number(cell.get("used_memory", ""))))
        except (KeyError, ValueError) as exc:
            raise GpuQueryError(f"unexpected compute-apps line: {', '.join(row)} ({exc})") \
                from None
    return apps


def read_nvml() -> tuple[list[GpuInfo], list[ComputeApp]]:
    """Read this machine's GPUs and compute processes through NVML (pynvml)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus, apps = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(GpuInfo(
                index=i, uuid=uuid, name=name, memory_total_mib=mem.total // 2**20,
                memory_used_mib=mem.used // 2**20, memory_free_mib=mem.free // 2**20,
                utilization_pct=pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                temperature_c=pynvml.nvmlDeviceGetTemperature(handle,
                                                              pynvml.NVML_TEMPERATURE_GPU)))
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = proc.usedGpuMemory
                apps.append(ComputeApp(pid=proc.pid, gpu_uuid=uuid,
                                       used_memory_mib=used // 2**20 if used else None))
        return gpus, apps
    finally:
        pynvml.nvmlShutdown()


class GpuPool(Block):
    """The GPUs of the GPU host as a pool: read them, and lend one concrete index at a time."""

    _block_type_name = "MQI GPU Pool"
    _block_type_slug = "mqi-gpu-pool"
    _logo_url = HttpUrl(
        "https://images.ctfassets.net/gm98wzqotmnx/4CxjycqILlT9S9YchI7o1q/ee62e2089dfceb19072245c62f0c69d2/image11.png")
    _description = ("GPUs of the GPU host, read with nvidia-smi or NVML, lent to one "
                    "simulation at a time through Prefect global concurrency limits and a "
                    "per-index lock file on the host.")
    _documentation_url = HttpUrl("https://docs.prefect.io/v3/concepts/global-concurrency-limits")

    source: str = Field(default="nvidia-smi", description="nvidia-smi or nvml.")
    query_command: str = Field(description="Command printing --query-gpu CSV.")
    apps_command: str = Field(description="Command printing --query-compute-apps CSV.")
    indices: list[int] | None = Field(default=None, description="Only these GPU indices.")
    min_free_memory_mib: int = Field(default=8192, description="Below this a GPU is skipped.")
    skip_gpus_with_foreign_processes: bool = Field(
        default=True, description="Skip a GPU running compute processes that are not ours.")
    limit_name: str = Field(default="mqi-gpu",
                            description="Prefect global concurrency limit that admits simulations.")
    lease_seconds: int = Field(default=300, ge=60,
                               description="Lease of a held slot; a crashed holder's slot "
                                           "comes back after it.")
    lock_dir: str = Field(default="/tmp/mqi/gpu-locks",
                          description="Folder of the per-index lock files on the GPU host.")
    poll_seconds: float = Field(default=2.0, gt=0,
                                description="Pause between rounds while no GPU is free.")
    max_wait_seconds: float = Field(
        default=3600.0, gt=0,
        description="Longest an admitted simulation waits for a usable, unlocked GPU before "
                    "its stage fails (and is retried per its policy).")
    query_timeout_seconds: float = Field(
        default=30.0, gt=0,
        description="A look at the GPUs (nvidia-smi) that has not answered in this long is "
                    "killed; a beam choosing a GPU waits and looks again.")

    def read(self, host: Host) -> tuple[list[GpuInfo], list[ComputeApp]]:
        """Read the host's GPUs and compute processes."""
        if self.source == "nvml":
            return read_nvml()
        gpus = parse_gpu_query(host.run(self.query_command, stream=False, timeout=60).stdout)
        apps = parse_compute_apps(host.run(self.apps_command, stream=False, timeout=60).stdout)
        return gpus, apps

    def usable(self, gpus: list[GpuInfo], apps: list[ComputeApp]) -> list[GpuInfo]:
        """GPUs a simulation may be given now: selected, enough free memory, nobody else on it."""
        busy = {a.gpu_uuid for a in apps}
        return [g for g in gpus
                if (self.indices is None or g.index in self.indices)
                and g.memory_free_mib >= self.min_free_memory_mib
                and not (self.skip_gpus_with_foreign_processes and g.uuid in busy)]

    def ensure_limit(self, host: Host, gpus: list[GpuInfo] | None = None) -> list[GpuInfo]:
        """Create or resize the admission limit to the GPUs the host has now.

        Args:
            host: The GPU host, read unless ``gpus`` is given.
            gpus: The GPUs as just read (the curator's look), to spare a second query.

        Returns:
            The GPUs that pass the selection (ignoring who runs on them: our own
            running simulations show up as compute processes too).
        """
        if gpus is None:
            gpus, _ = self.read(host)
        selected = [g for g in gpus if self.indices is None or g.index in self.indices]
        if not selected:
            raise GpuQueryError("the GPU host reports no GPU"
                                + (f" among indices {self.indices}" if self.indices else ""))
        self.set_limit(len(selected))
        return selected

    def set_limit(self, slots: int) -> int | None:
        """Create the admission limit with ``slots`` slots, or resize it (the curator sizes
        it to the GPUs it finds usable); returns the size it had (None: there was none)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import (
            GlobalConcurrencyLimitCreate,
            GlobalConcurrencyLimitUpdate,
        )
        from prefect.exceptions import ObjectNotFound

        if slots < 1:  # a request for more slots than the limit fails, never waits
            raise ValueError(f"the admission limit needs at least 1 slot, not {slots}")
        with get_client(sync_client=True) as client:
            try:
                current = client.read_global_concurrency_limit_by_name(self.limit_name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                    name=self.limit_name, limit=slots, active=True))
                return None
            if current.limit != slots or not current.active:
                client.update_global_concurrency_limit(
                    self.limit_name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
            return int(current.limit)

    def ensure_limit_exists(self, host: Host) -> None:
        """Create the admission limit when there is none; the host is read only then."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(self.limit_name)
                return
            except ObjectNotFound:
                pass
        self.ensure_limit(host)

    @contextlib.contextmanager
    def admission(self, logger: logging.Logger | logging.LoggerAdapter,
                  order: str = "") -> Iterator[None]:
        """Hold one admission slot for the life of the ``with`` block.

        Blocks while every GPU is in use, standing in this machine's line of waiting
        beams (blocks/admission_line.py) by ``order`` (the case's arrival, then the
        beam's). A beam done with its slot passes it to the first of the line; with
        nobody waiting it gives it back to the API and rings the line's bell, and the
        first of the line ask for free slots at the bell and every ``poll_seconds``. A
        watcher says so in the task's log after a couple of seconds and every 30 s after
        that.
        """
        from prefect.concurrency._events import (
            emit_concurrency_acquisition_events,
            emit_concurrency_release_events,
        )
        from prefect.concurrency._leases import maintain_concurrency_lease
        from prefect.settings import get_current_settings

        from blocks.admission_line import AdmissionLine, line_folder

        started = time.monotonic()
        admitted = threading.Event()
        line = AdmissionLine(line_folder(str(get_current_settings().api.url),
                                         self.limit_name))
        events: list[Any] = []
        ticket: Ticket | None = None
        with contextlib.ExitStack() as holding:
            try:
                with line.ticket(order) as ticket:
                    def say_waiting() -> None:
                        interval = 2.0
                        while not admitted.wait(interval):
                            ahead = ticket.ahead()
                            logger.info("waiting for a GPU: all are in use (%.0f s so far%s)",
                                        time.monotonic() - started,
                                        f"; {ahead} beam(s) ahead in line" if ahead else "")
                            interval = 30.0

                    # The copied context carries Prefect's settings and run context into the
                    # thread.
                    watcher = threading.Thread(target=contextvars.copy_context().run,
                                               args=(say_waiting,), daemon=True,
                                               name="mqi-gpu-wait")
                    watcher.start()
                    try:
                        lease_id, limits = self._take_slot(line, ticket, logger)
                    finally:
                        admitted.set()  # also when taking the slot failed: the watcher stops

                    def give_back() -> None:
                        # However the block ends (return, error, cancellation); a crashed
                        # holder's slot comes back when its lease expires. The released
                        # event follows, as with Prefect's concurrency().
                        try:
                            self._hand_on(line, _token(lease_id, limits), logger)
                        finally:
                            if events:
                                emit_concurrency_release_events(limits, 1, events[0])

                    holding.callback(give_back)
            finally:
                if ticket is not None and ticket.left_with is not None:
                    # A second slot was passed to this beam as it left the line (it had
                    # one already, or it is failing): on to the next waiter with it.
                    self._hand_on(line, ticket.left_with, logger)
            # Out of the line: the next beam's turn while this one starts holding the slot.
            events.append(emit_concurrency_acquisition_events(limits, 1))
            # Prefect's renewal thread keeps the lease (renewed at once, a passed one too);
            # one that keeps failing ends the block, as concurrency(strict=True) does.
            holding.enter_context(maintain_concurrency_lease(
                lease_id, self.lease_seconds, raise_on_lease_renewal_failure=True))
            yield

    @staticmethod
    def _hand_on(line: AdmissionLine, token: str,
                 logger: logging.Logger | logging.LoggerAdapter) -> None:
        """A slot this beam is done with: to the first of the line, else back to the API
        (and the bell rung once the release went through)."""
        try:
            if line.pass_slot(token):
                return
        except OSError as exc:  # the line's folder is unusable: the API takes it back
            logger.info("could not pass the GPU slot on (%s); giving it back", exc)
        try:
            _release(_from_token(token)[0], logger)
        finally:
            line.ring()

    @staticmethod
    def _give_back_stale(line: AdmissionLine, lease_id: UUID,
                         logger: logging.Logger | logging.LoggerAdapter) -> None:
        """Give back a passed slot whose lease may have expired (then it is gone)."""
        try:
            _release(lease_id, logger)
        except Exception as exc:  # noqa: BLE001 - an expired lease is already given back
            logger.info("the old GPU slot's lease had ended already (%s)", exc)
        line.ring()

    def _take_slot(self, line: AdmissionLine, ticket: Ticket,
                   logger: logging.Logger | logging.LoggerAdapter,
                   ) -> tuple[UUID, list[Any]]:
        """Take a slot: its lease id and limits.

        A slot another beam passes on (its baton) is taken as it comes. Otherwise a
        waiter asks the API only while fewer live waiters stand before it than the
        limit has free slots, which it reads first (a read, which on SQLite waits for no
        writer): a freed slot is asked for by the oldest waiter alone. A slot granted
        while older waiters still stand before this one goes to the first of them.
        After a refusal it waits for the bell, a baton or ``poll_seconds``. The
        server's Retry-After is not waited for: asking every few Retry-After seconds
        (0.2-1.3 s here) is load on the API that only slots freed elsewhere need. A
        busy API (5xx, a dropped connection) is asked again with backoff; a missing
        limit fails at once.
        """
        from prefect.client.orchestration import get_client

        failures = 0
        size: int | None = None  # the limit's slots: at most that many of the line look
        with get_client(sync_client=True) as client:
            while True:
                chime = line.chime()  # before asking: a slot freed meanwhile is not missed
                passed = ticket.take_baton()
                if passed is not None:
                    lease_id, limits, age = _from_token(passed)
                    if age <= self.lease_seconds * PASS_WITHIN_FRACTION:
                        return lease_id, limits
                    # Its lease may have expired meanwhile (renewed last up to
                    # 3/4 of a lease before it was passed): back to the API with it.
                    logger.info("a GPU slot passed %.0f s ago is too old to hold; giving "
                                "it back", age)
                    self._give_back_stale(line, lease_id, logger)
                try:
                    ahead = ticket.ahead()
                    if size is None or ahead < size:
                        size, free = self._slots(client)
                        if ahead < free:
                            # Several free (woken together): they ask one after the other
                            # by their place, so the server sees the oldest's request first.
                            time.sleep(ahead * ASK_STAGGER_SECONDS)
                            asked = self._ask_watching(line, ticket, logger)
                            if asked == "baton":
                                continue  # passed a slot while asking: take it
                            if asked != "refused":
                                if self._to_an_older_waiter(line, ticket, asked):
                                    continue  # and wait on, for a slot or a baton
                                return asked
                        line.wait_for_bell(chime, self.poll_seconds, ticket.baton)
                    elif not line.wait_for_bell(chime, self.poll_seconds, ticket.baton):
                        size = None  # read the limit again: a larger one lets more look
                except ConcurrencySlotAcquisitionError:
                    raise
                except Exception as exc:
                    # A busy API (SQLite locked, a dropped connection) heals in a moment.
                    if failures >= ADMISSION_RETRIES or not _transient(exc):
                        raise
                    logger.info("asking for a GPU slot failed (%s); asking again",
                                exc.__cause__ or exc)
                    time.sleep(min(0.5 * 2 ** failures, 5.0))
                    failures += 1

    @staticmethod
    def _to_an_older_waiter(line: AdmissionLine, ticket: Ticket,
                            slot: tuple[UUID, list[Any]]) -> bool:
        """Hand a slot just granted to this waiter to the first of the line when older
        waiters still stand before it; whether it was handed on.

        Several of the first waiters ask at once, and the API need not answer them in
        the order they asked: SQLite's busy handler lets a newer writer through while
        an older one sleeps (traced: the two oldest requests of a start held 5.3-5.8 s
        and refused, four newer ones granted meanwhile). The line, not the server's
        luck, decides who holds a slot. The older waiter takes it as a passed slot;
        its own request, if granted later, is handed on in turn.
        """
        if ticket.ahead() == 0:
            return False
        try:
            return line.pass_slot(_token(*slot))
        except OSError:  # the line's folder is unusable: keep the slot
            return False

    def _ask_watching(self, line: AdmissionLine, ticket: Ticket,
                      logger: logging.Logger | logging.LoggerAdapter,
                      ) -> tuple[UUID, list[Any]] | Literal["refused", "baton"]:
        """One slot request, sent from a helper thread while this waiter keeps looking
        for a baton: on a starved SQLite server one request took two minutes (503s
        included), and a slot passed meanwhile must not wait for it (nor be passed to a
        newer beam). The granted slot; "refused"; or "baton" when a slot was passed
        first, and then the request's slot, if it is granted later, is handed on.

        Raises:
            Exception: The request's own error.
        """
        from prefect.client.orchestration import get_client
        from prefect.context import SyncClientContext

        lock = threading.Lock()
        outcome: list[Any] = []  # the request's result or error, once it is in
        abandoned = False

        def ask() -> None:
            # This thread's clients are its own: it can outlive the waiter, and a task
            # run's client (its SyncClientContext, copied with the rest of the context)
            # is closed when the run ends; a late slot then could not be given back.
            SyncClientContext.__var__.set(None)  # type: ignore[arg-type]
            result: Any
            try:
                with get_client(sync_client=True) as own:
                    result = self._request(own)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                result = exc
            with lock:
                outcome.append(result)
                orphan = abandoned and isinstance(result, tuple)
            if orphan:  # nobody waits for this slot here any more: the next waiter's
                self._hand_on(line, _token(*result), logger)

        asking = threading.Thread(target=contextvars.copy_context().run, args=(ask,),
                                  daemon=True,
                                  name=f"{threading.current_thread().name}/mqi-gpu-ask")
        asking.start()
        while True:
            asking.join(line.check_seconds)
            with lock:
                if outcome:
                    break
                if ticket.baton.exists():
                    abandoned = True
                    return "baton"
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        return "refused" if result is None else result

    def _slots(self, client: Any) -> tuple[int, int]:
        """The limit's slots and how many are free now (every waiter may ask when the
        limit is switched off: Prefect then admits all)."""
        from prefect.exceptions import ObjectNotFound

        try:
            limit = client.read_global_concurrency_limit_by_name(self.limit_name)
        except ObjectNotFound as exc:
            raise ConcurrencySlotAcquisitionError(
                f"the GPU admission limit {self.limit_name!r} does not exist "
                "(`mqi up`, `mqi run` or the curator makes it)") from exc
        if not limit.active:
            return 1 << 30, 1 << 30
        return int(limit.limit), max(0, int(limit.limit) - int(limit.active_slots))

    def _request(self, client: Any) -> tuple[UUID, list[Any]] | None:
        """One request for a slot with a lease: its lease id and limits, or None when
        every slot is taken (423).

        `prefect.concurrency.sync.concurrency(strict=True)` would send it through a
        per-process service on Prefect's event-loop thread that retries after each
        Retry-After itself (one beam's sleeps hold up the other beams of its process)
        and starts the lease's renewal and emits its event before returning: 2-7 s for
        the first slot of a process on a busy machine (measured). Here the request goes
        through the beam's own client, and the rest follows once the line is left."""
        import httpx
        from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[self.limit_name], slots=1, mode="concurrency",
                lease_duration=self.lease_seconds)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return None
            raise
        granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
        if not granted.limits:
            raise ConcurrencySlotAcquisitionError(
                f"the GPU admission limit {self.limit_name!r} does not exist "
                "(`mqi up`, `mqi run` or the curator makes it)")
        return granted.lease_id, list(granted.limits)

    def locked_indices(self, host: Host, indices: list[int]) -> set[int]:
        """Indices whose lock file on the host is held by a running simulation now."""
        if not indices:
            return set()
        script = (f"for i in {' '.join(str(int(i)) for i in indices)}; do "
                  f"f={shlex.quote(self.lock_dir)}/gpu-$i.lock; "
                  f'[ -e "$f" ] && ! flock -n "$f" true && echo "$i"; done; true')
        out = host.run(script, stream=False, timeout=60).stdout
        return {int(word) for word in out.split() if word.isdigit()}

    def snapshot(self, host: Host) -> tuple[list[GpuInfo], list[ComputeApp], set[int]]:
        """The host's GPUs, compute processes and held index locks, in ONE round trip.

        Choosing a GPU is on the path from a freed GPU to the next simulation: three
        commands over SSH (query, apps, locks) were three round trips on a busy host.
        """
        if self.source == "nvml":
            gpus, apps = read_nvml()
            return gpus, apps, self.locked_indices(host, [g.index for g in gpus])
        # The locks are read before and after the GPUs: a simulation that starts or ends
        # between the two reads shows as a compute process while its lock looked free,
        # and the GPU would pass for one a foreign process holds (and leave the
        # admission limit until the next look). Held at either read counts as held.
        locks = shlex.quote(self.lock_dir)
        script = (f"held() {{ for f in {locks}/gpu-*.lock; do "
                  f'[ -e "$f" ] && ! flock -n "$f" true && echo "${{f##*/}}"; done; }}; '
                  f"l=$(held); q=$({self.query_command}) || exit $?; "
                  f"a=$({self.apps_command}) || exit $?; "
                  f"printf '%s\\n{_APPS}\\n%s\\n{_LOCKS}\\n%s\\n' \"$q\" \"$a\" \"$l\"; "
                  f"held; true")
        out = host.run(script, stream=False, timeout=self.query_timeout_seconds).stdout
        query, _, rest = out.partition(f"{_APPS}\n")
        apps_text, _, locked_text = rest.partition(f"{_LOCKS}\n")
        locked = {int(m.group(1)) for m in re.finditer(r"gpu-(\d+)\.lock", locked_text)}
        return parse_gpu_query(query), parse_compute_apps(apps_text), locked

    def choose_index(self, host: Host, logger: logging.Logger | logging.LoggerAdapter,
                     spread: int = 0) -> int:
        """A GPU index that is usable and unlocked now (waits, polling, until there is one).

        ``spread`` (e.g. the beam number) picks among the free indices, so that beams
        admitted together start on different GPUs instead of racing for the first; a
        lost race costs a lock refusal and another look.
        """
        said = started = time.monotonic()
        failing: str | None = None
        while True:
            try:
                gpus, apps, locked = self.snapshot(host)
            except (HostError, GpuQueryError) as exc:
                # nvidia-smi failed or hung (killed at query_timeout_seconds), the driver
                # is reloading, the host is away: no GPU can be known free now; wait and
                # look again, as when all are busy.
                gpus, apps, locked = [], [], set()
                reason = str(exc).splitlines()[0][:300]
                if failing is None:
                    gpu_warning(logger, "mqi.gpu.query-failed",
                                f"reading the GPUs of {host.address} failed ({reason}); "
                                f"waiting and reading again", host=host.address, reason=reason)
                failing = reason
            else:
                if failing is not None:
                    logger.info("reading the GPUs of %s works again", host.address)
                failing = None
            candidates = [g.index for g in self.usable(gpus, apps) if g.index not in locked]
            if candidates:
                return candidates[spread % len(candidates)]
            if time.monotonic() - started > self.max_wait_seconds:
                raise GpuQueryError(
                    f"no GPU became free within {self.max_wait_seconds:g} s: {len(locked)} "
                    f"locked by running simulations, {len(gpus) - len(self.usable(gpus, apps))} "
                    f"below {self.min_free_memory_mib} MiB free or running foreign processes")
            if time.monotonic() - said > 30:
                said = time.monotonic()
                logger.info("admitted, but no GPU is free on the host (%d locked, %d below "
                            "%d MiB or running foreign processes); waiting", len(locked),
                            len(gpus) - len(self.usable(gpus, apps)), self.min_free_memory_mib)
            time.sleep(self.poll_seconds)

    def vanished(self, host: Host, index: int,
                 logger: logging.Logger | logging.LoggerAdapter) -> bool:
        """Whether GPU ``index`` is gone from the host (a failed simulation asks: the
        device fell off the bus, or was taken out, between choice and start). Says so
        as a warning and an ``mqi.gpu.vanished`` event; False when the host cannot be
        read (the stage's failure stands)."""
        try:
            gpus, _, _ = self.snapshot(host)
        except Exception:  # noqa: BLE001 - unreadable (also paramiko's own EOFError): it stands
            return False
        if any(g.index == index for g in gpus):
            return False
        gpu_warning(logger, "mqi.gpu.vanished",
                    f"GPU {index} is no longer listed by {host.address}; choosing another",
                    host=host.address, gpu=index)
        return True

    def locked_command(self, index: int, command: str, input_file: str | None = None) -> str:
        """``command`` wrapped so it runs only while holding GPU ``index``'s lock file on the
        host; exits LOCK_BUSY_EXIT at once if another process holds it.

        With ``input_file`` (an absolute path), the command's standard input (``run``'s
        ``stdin``) is first written there, parents created and atomically by way of a
        temporary name, once the lock is held; ``command`` then runs with an empty input.
        The simulation's input thus travels with the command that starts it (no round
        trip of its own between a GPU being ours and the simulation starting), and a
        beam that lost the race for the index writes nothing.
        """
        lock_dir = shlex.quote(self.lock_dir)
        lock = shlex.quote(f"{self.lock_dir}/gpu-{int(index)}.lock")
        locked = f"mkdir -p {lock_dir} && exec flock -n -E {LOCK_BUSY_EXIT} {lock} sh -c "
        if input_file is None:
            return locked + shlex.quote(command)
        if not input_file.startswith("/") or input_file.endswith("/"):
            raise ValueError(f"input file {input_file!r}: an absolute path to a file is needed")
        return (locked + f"{shlex.quote(_WRITE_INPUT)} mqi-input {shlex.quote(input_file)} "
                f"{shlex.quote(part_name(input_file))} {shlex.quote(command)}")


def gpu_warning(logger: logging.Logger | logging.LoggerAdapter, event: str, message: str,
                **payload: object) -> None:
    """A warning in the run's log and the same as a Prefect event (automations, the UI)."""
    logger.warning("%s", message)
    try:
        from prefect.events import emit_event

        resource = {"prefect.resource.id": f"mqi.gpu-host.{payload.get('host', '')}"}
        emit_event(event=event, resource=resource,
                   payload={"message": message, **{k: str(v) for k, v in payload.items()}})
    except Exception as exc:  # noqa: BLE001 - an event is a courtesy, never a crash
        logger.debug("could not emit %s: %s", event, exc)
