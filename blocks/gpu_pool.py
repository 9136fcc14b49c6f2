"""GpuPool: which GPUs the GPU host has, and how a simulation gets exactly one of them.

Three layers make "no two simulations on one GPU index at once" hold across
processes and machines, and heal when one of them fails:

1. admission: one Prefect global concurrency limit (``<name>``) sized to the
   usable GPUs; a task waits here (and says so in its log) while all are busy;
2. the index: one limit of size 1 per GPU (``<name>-<index>``), tried in turn
   without waiting; holding it is holding that GPU in Prefect's bookkeeping;
3. the host: the simulation runs under ``flock -n`` on a per-index lock file
   on the GPU host, which the kernel releases when the process dies, so even
   a lost Prefect lease cannot put two simulations on one device.

All limits are taken with ``strict=True`` (a missing limit is an error, not an
unthrottled run) and with leases, so a crashed holder's slots come back.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prefect.blocks.core import Block
from pydantic import Field

log = logging.getLogger("mqi.gpu_pool")

LOCK_BUSY_EXIT = 75
"""Exit status of ``flock -n`` (via -E) when another process holds the GPU's lock file."""


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


class CommandHost(Protocol):
    def run(self, command: str, **kwargs: Any) -> Any: ...


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
    _logo_url = "https://images.ctfassets.net/gm98wzqotmnx/4CxjycqILlT9S9YchI7o1q/ee62e2089dfceb19072245c62f0c69d2/image11.png"  # noqa: E501
    _description = ("GPUs of the GPU host, read with nvidia-smi or NVML, lent to one "
                    "simulation at a time through Prefect global concurrency limits and a "
                    "per-index lock file on the host.")
    _documentation_url = "https://docs.prefect.io/v3/concepts/global-concurrency-limits"

    source: str = Field(default="nvidia-smi", description="nvidia-smi or nvml.")
    query_command: str = Field(description="Command printing --query-gpu CSV.")
    apps_command: str = Field(description="Command printing --query-compute-apps CSV.")
    indices: list[int] | None = Field(default=None, description="Only these GPU indices.")
    min_free_memory_mib: int = Field(default=8192, description="Below this a GPU is skipped.")
    skip_gpus_with_foreign_processes: bool = Field(
        default=True, description="Skip a GPU running compute processes that are not ours.")
    limit_name: str = Field(default="mqi-gpu", description="Admission limit; per-index limits "
                                                           "are <limit_name>-<index>.")
    lease_seconds: int = Field(default=300, ge=60,
                               description="Lease of a held slot; a crashed holder's slot "
                                           "comes back after it.")
    lock_dir: str = Field(default="/tmp/mqi/gpu-locks",
                          description="Folder of the per-index lock files on the GPU host.")
    poll_seconds: float = Field(default=2.0, gt=0,
                                description="Pause between rounds while no GPU is free.")

    def read(self, host: CommandHost) -> tuple[list[GpuInfo], list[ComputeApp]]:
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

    def index_limit(self, index: int) -> str:
        return f"{self.limit_name}-{index}"

    def ensure_limits(self, host: CommandHost) -> list[GpuInfo]:
        """Create or resize the admission and per-index limits from what the host has now.

        Returns:
            The GPUs that pass the selection and memory filters (ignoring who runs on them:
            our own running simulations show up as compute processes).
        """
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import (
            GlobalConcurrencyLimitCreate,
            GlobalConcurrencyLimitUpdate,
        )
        from prefect.exceptions import ObjectNotFound

        gpus, _ = self.read(host)
        selected = [g for g in gpus if self.indices is None or g.index in self.indices]
        if not selected:
            raise GpuQueryError("the GPU host reports no GPU"
                                + (f" among indices {self.indices}" if self.indices else ""))
        wanted = {self.limit_name: len(selected)} | {self.index_limit(g.index): 1
                                                    for g in selected}
        with get_client(sync_client=True) as client:
            for name, size in wanted.items():
                try:
                    current = client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=size, active=True))
                    continue
                if current.limit != size or not current.active:
                    client.update_global_concurrency_limit(
                        name, GlobalConcurrencyLimitUpdate(limit=size, active=True))
        return selected

    @contextlib.contextmanager
    def acquire(self, host: CommandHost, logger: logging.Logger | logging.LoggerAdapter,
                exclude: set[int] | None = None) -> Iterator[int]:
        """Hold one concrete GPU index for the life of the ``with`` block.

        Args:
            host: Where the GPUs are (for reading them).
            logger: Where waiting is reported (the task's run logger).
            exclude: Indices not to take (found locked on the host by someone else).

        Yields:
            The GPU index, held exclusively until the block exits (however it exits).
        """
        from prefect.concurrency.sync import concurrency

        with self._admission(logger):
            waited_since = time.monotonic()
            said = 0.0
            while True:
                gpus, apps = self.read(host)
                candidates = [g.index for g in self.usable(gpus, apps)
                              if g.index not in (exclude or set())]
                for index in candidates:
                    slot = concurrency(self.index_limit(index), occupy=1, max_retries=0,
                                       lease_duration=self.lease_seconds, strict=True)
                    try:
                        slot.__enter__()
                    except Exception as exc:  # noqa: BLE001 - sorted out below
                        if not _is_locked(exc):
                            raise
                        continue
                    try:
                        yield index
                    except BaseException as exc:
                        if not slot.__exit__(type(exc), exc, exc.__traceback__):
                            raise
                    else:
                        slot.__exit__(None, None, None)
                    return
                if time.monotonic() - said > 30:
                    said = time.monotonic()
                    logger.info("waiting for a free GPU for %.0f s (%d usable of %d; others "
                                "busy or below %d MiB free)", time.monotonic() - waited_since,
                                len(candidates), len(gpus), self.min_free_memory_mib)
                time.sleep(self.poll_seconds)

    @contextlib.contextmanager
    def _admission(self, logger: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
        from prefect.concurrency.sync import concurrency

        started = time.monotonic()
        while True:
            slot = concurrency(self.limit_name, occupy=1, timeout_seconds=30,
                               lease_duration=self.lease_seconds, strict=True)
            try:
                slot.__enter__()
            except TimeoutError:
                logger.info("waiting for a GPU: all are in use (%.0f s so far)",
                            time.monotonic() - started)
                continue
            break
        try:
            yield
        except BaseException as exc:
            if not slot.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            slot.__exit__(None, None, None)

    def locked_command(self, index: int, command: str) -> str:
        """``command`` wrapped so it runs only while holding GPU ``index``'s lock file on the
        host; exits LOCK_BUSY_EXIT at once if another process holds it."""
        lock_dir = shlex.quote(self.lock_dir)
        lock = shlex.quote(f"{self.lock_dir}/gpu-{int(index)}.lock")
        return (f"mkdir -p {lock_dir} && exec flock -n -E {LOCK_BUSY_EXIT} {lock} "
                f"sh -c {shlex.quote(command)}")


def _is_locked(exc: BaseException) -> bool:
    """True when a non-waiting slot request failed only because the slot is taken (HTTP 423)."""
    cause: BaseException | None = exc
    while cause is not None:
        response = getattr(cause, "response", None)
        if getattr(response, "status_code", None) == 423:
            return True
        cause = cause.__cause__
    return False
