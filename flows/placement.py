"""Several GPU hosts in one pool (``gpu.hosts``): which host a beam runs on.

With one GPU host nothing here is used: ``simulate_beam`` asks ``GpuPool.choose_index``
on that host as it always did. With several (docs/gpu-allocation.md#several-gpu-hosts):

- every host is read in one round trip each (``GpuPool.snapshot``), in parallel; a host
  that does not answer, or whose nvidia-smi fails, is skipped with a warning (run log and
  a ``mqi.gpu.warning`` event, once per process until it answers again) and is not asked
  again for ``gpu.host_retry_seconds``;
- the admission limit is sized to the sum of the GPUs our simulations can have on the
  hosts that answer, whenever the set of answering hosts changes (and by `mqi up` and the curator);
- a beam takes a (host, index) pair: a free, unlocked GPU, preferably on a host that
  already holds this run's files, and the index is locked on that host as with one host;
- a host a case has not used yet is prepared on first use: the case is uploaded there and
  the case steps before the beams (the interpreter) run there, each a task cached per
  (run, host), one preparation at a time per (run, host) in this process.

Module state (hosts found down, hosts prepared per run) lives in the flow-run process,
whose tasks are threads: it is what one case's beams share, and nothing else needs it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paramiko

from blocks.errors import CommandError, HostError
from blocks.gpu_pool import ComputeApp, GpuInfo, GpuPool, GpuQueryError
from blocks.host import Host
from config import MqiConfig, MqiError
from config.redaction import redact
from flows.outcomes import StageFailed

# What a host that went away raises: our own errors, and what paramiko lets escape
# some calls (EOFError, SSHException) or the socket (OSError) when the link breaks.
HOST_TROUBLE: tuple[type[BaseException], ...] = (HostError, OSError, EOFError,
                                                 paramiko.SSHException)

log = logging.getLogger("mqi.placement")
Logger = logging.Logger | logging.LoggerAdapter[Any]
WARNING_EVENT = "mqi.gpu.warning"
"""The curator's warning event (flows/curator.py), which notifications listen to."""


class HostLost(MqiError):
    """A GPU host stopped answering while a stage needed it: the beam's work there (its
    raw dose, its RT Dose) is out of reach, so the beam runs again on another host."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"GPU host {host} does not answer: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (HostLost, (self.host, self.reason))


@dataclass(frozen=True)
class GpuHost:
    """One host of the pool: its name in ``hosts``, its block, and the pool as it applies
    there (its own lock folder)."""

    name: str
    host: Host
    pool: GpuPool


@dataclass(frozen=True)
class Look:
    """What one host said: its GPUs, compute processes and held index locks."""

    gpus: list[GpuInfo]
    apps: list[ComputeApp]
    locked: set[int]

    def free(self, pool: GpuPool) -> list[int]:
        """Indices a simulation may take now: usable and unlocked."""
        return [g.index for g in pool.usable(self.gpus, self.apps) if g.index not in self.locked]

    def counted(self, pool: GpuPool) -> int:
        """GPUs that count for the admission limit, as the curator counts them: selected
        (``gpu.indices``), and usable now or locked by a simulation of ours."""
        usable = {g.index for g in pool.usable(self.gpus, self.apps)}
        return sum(1 for g in self.gpus if (pool.indices is None or g.index in pool.indices)
                   and (g.index in usable or g.index in self.locked))


@dataclass(frozen=True)
class Placement:
    """Where a beam runs: host and GPU index."""

    host: GpuHost
    index: int


_STATE = threading.Lock()
_down_until: dict[str, float] = {}
"""Host name -> monotonic time before which it is not asked again."""
_answering: frozenset[str] | None = None
"""The hosts that answered at the last look in this process (None: no look yet)."""
_prepared: dict[tuple[str, str], bool] = {}
_prep_locks: dict[tuple[str, str], threading.Lock] = {}


def host_view(cfg: MqiConfig, name: str) -> MqiConfig:
    """The configuration as one GPU host of several sees it: that host alone, with its own
    lock folder and work root (what the curator and its repairs work with)."""
    entry = cfg.gpu.host_entry(name)
    gpu = cfg.gpu.model_copy(update={"host": name, "hosts": [],
                                     "lock_dir": entry.lock_dir or cfg.gpu.lock_dir})
    paths = cfg.paths.model_copy(update={
        "remote_work_root": entry.remote_work_root or cfg.paths.remote_work_root})
    return cfg.model_copy(update={"gpu": gpu, "paths": paths})


def pool_hosts(cfg: MqiConfig) -> list[GpuHost]:
    """The pool's hosts, as this flow run loads them (flows/settings.py)."""
    from blocks.factory import pool_on
    from flows.settings import flow_gpu_hosts, flow_pool

    pool = flow_pool(cfg)
    return [GpuHost(name, host, pool_on(pool, cfg, name))
            for name, host in flow_gpu_hosts(cfg).items()]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CommandError):  # its message repeats the whole snapshot script
        said = [ln for ln in (exc.result.stdout + "\n" + exc.result.stderr).splitlines()
                if ln.strip()]
        return f"exit code {exc.result.exit_code}" + (f": {said[-1].strip()}" if said else "")
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def mark_down(cfg: MqiConfig, name: str, exc: BaseException, logger: Logger) -> None:
    """Take ``name`` out of the pool for ``gpu.host_retry_seconds``; say so once."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    kind = "gpu-query-failed" if isinstance(exc, CommandError | GpuQueryError) \
        else "host-unreachable"
    with _STATE:
        known = name in _down_until
        _down_until[name] = time.monotonic() + cfg.gpu.host_retry_seconds
    if known:
        return
    message = redact(f"GPU host {name} is out of the pool: {_reason(exc)}; its GPUs leave "
                     f"the admission limit until it answers again")
    logger.warning("%s", message)
    if PREFECT_API_URL.value() is None:
        return  # outside Prefect (a unit test, `mqi gpus` on its own): the log says it
    try:
        emit_event(WARNING_EVENT, resource={"prefect.resource.id": f"mqi.gpu-host.{name}",
                                            "prefect.resource.name": name},
                   payload={"kind": kind, "message": message, "host": name})
    except Exception as err:  # noqa: BLE001 - the warning is in the log already
        log.debug("could not emit the host warning: %s", err)


def _mark_up(name: str, logger: Logger) -> None:
    with _STATE:
        was_down = _down_until.pop(name, None) is not None
    if was_down:
        logger.warning("GPU host %s answers again: its GPUs are back in the pool", name)


def look(cfg: MqiConfig, hosts: Iterable[GpuHost], logger: Logger,
         avoid: Iterable[str] = ()) -> dict[str, Look]:
    """Read every host not in ``avoid`` and not resting after a failure, in parallel.

    A host that fails is marked down (``mark_down``) and left out of the answer.
    """
    now = time.monotonic()
    with _STATE:
        resting = {n for n, until in _down_until.items() if until > now}
    skip = set(avoid)
    asked = [h for h in hosts if h.name not in resting and h.name not in skip]

    def read(gpu_host: GpuHost) -> Look | BaseException:
        try:
            return Look(*gpu_host.pool.snapshot(gpu_host.host))
        except GpuQueryError as exc:
            return exc
        except HOST_TROUBLE as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, len(asked)),
                            thread_name_prefix="mqi-gpu-look") as workers:
        said = list(workers.map(read, asked))
    looks: dict[str, Look] = {}
    for gpu_host, answer in zip(asked, said, strict=True):
        if isinstance(answer, Look):
            _mark_up(gpu_host.name, logger)
            looks[gpu_host.name] = answer
        else:
            mark_down(cfg, gpu_host.name, answer, logger)
    return looks


def limit_slots(hosts: Iterable[GpuHost], looks: dict[str, Look]) -> int:
    """What the admission limit should be: the GPUs our simulations can have (``Look.counted``)
    on the hosts that answered; a host that did not adds nothing."""
    return sum(looks[h.name].counted(h.pool) for h in hosts if h.name in looks)


def size_limit(hosts: list[GpuHost], looks: dict[str, Look], logger: Logger) -> int | None:
    """Size the admission limit to ``limit_slots``; left alone when no host answered (a
    limit needs at least one slot). Returns the size set (None: left alone)."""
    slots = limit_slots(hosts, looks)
    if slots < 1 or not hosts:
        return None
    pool = hosts[0].pool
    before = pool.set_limit(slots)
    if before != slots:
        logger.warning("admission limit %s: %s → %d GPU(s) on %s", pool.limit_name, before,
                       slots, ", ".join(sorted(looks)))
    return slots


def _limit_follows(hosts: list[GpuHost], looks: dict[str, Look], logger: Logger) -> None:
    """Resize the limit when the hosts that answer are not those of this process's last
    look; at a process's first look, when some host does not answer. With every host
    answering all along, the limit is `mqi up`'s and the curator's to size."""
    global _answering
    answering = frozenset(looks)
    with _STATE:
        before = frozenset(h.name for h in hosts) if _answering is None else _answering
        changed, _answering = before != answering, answering
    if changed:
        size_limit(hosts, looks, logger)


def prepared(run_id: str) -> set[str]:
    """Hosts that hold this run's files (uploaded, interpreted) in this process's view."""
    with _STATE:
        return {host for (run, host), done in _prepared.items() if run == run_id and done}


def prepare(run_id: str, host: str, work: Callable[[], None]) -> None:
    """Run ``work`` (upload and case steps on ``host``) once per (run, host) in this process;
    beams that choose the same new host at once wait for the one preparing it."""
    key = (run_id, host)
    with _STATE:
        lock = _prep_locks.setdefault(key, threading.Lock())
    with lock:
        if _prepared.get(key):
            return
        work()
        with _STATE:
            _prepared[key] = True


def choose(cfg: MqiConfig, hosts: list[GpuHost], logger: Logger, *, spread: int, run_id: str,
           avoid: Iterable[str] = ()) -> Placement:
    """A free (host, index), waiting (polling ``gpu.poll_seconds``) until there is one.

    Hosts that already hold this run's files come first; among the candidates ``spread``
    (the beam number plus the attempt) picks, so beams admitted together start on
    different GPUs.

    Raises:
        GpuQueryError: No GPU became free within ``gpu.max_wait_seconds``.
    """
    avoid = set(avoid)
    by_name = {h.name: h for h in hosts}
    started = said = time.monotonic()
    while True:
        looks = look(cfg, hosts, logger, avoid)
        if not avoid:  # a look that left hosts out on purpose says nothing about them
            _limit_follows(hosts, looks, logger)
        free = [(name, index) for name, seen in looks.items()
                for index in seen.free(by_name[name].pool)]
        if free:
            mine = prepared(run_id)
            ours = [pair for pair in free if pair[0] in mine]
            name, index = (ours or free)[spread % len(ours or free)]
            return Placement(by_name[name], index)
        waited = time.monotonic() - started
        if waited > cfg.gpu.max_wait_seconds:
            raise GpuQueryError(f"no GPU became free on any GPU host within "
                                f"{cfg.gpu.max_wait_seconds:g} s (answering: "
                                f"{', '.join(sorted(looks)) or 'none'})")
        if time.monotonic() - said > 30:
            said = time.monotonic()
            logger.info("admitted, but no GPU is free on the GPU hosts that answer (%s); "
                        "waiting", ", ".join(sorted(looks)) or "none")
        time.sleep(cfg.gpu.poll_seconds)


def home(cfg: MqiConfig, hosts: list[GpuHost], logger: Logger, run_id: str,
         avoid: Iterable[str] = ()) -> GpuHost:
    """The host a case is uploaded to and interpreted on first: the answering host (not in
    ``avoid``) with the most free GPUs; among equals, one picked by the run id, so cases
    spread over hosts.

    Raises:
        HostLost: No GPU host answers.
    """
    avoid = set(avoid)
    looks = look(cfg, hosts, logger, avoid)
    if not avoid:
        _limit_follows(hosts, looks, logger)
    if not looks:
        raise HostLost(", ".join(h.name for h in hosts), "no GPU host answers")
    by_name = {h.name: h for h in hosts}
    most = max(len(seen.free(by_name[n].pool)) for n, seen in looks.items())
    best = [by_name[n] for n, seen in looks.items() if len(seen.free(by_name[n].pool)) == most]
    # (CRC32 of UUID strings has a fixed parity: a real hash splits them)
    return best[int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % len(best)]


def answers(gpu_host: GpuHost) -> bool:
    """Whether the host runs a trivial command now (a new connection if the old one died)."""
    try:
        gpu_host.host.run("true", stream=False, timeout=30)
        return True
    except HOST_TROUBLE:
        return False


def cut_off(failed: StageFailed) -> bool:
    """A stage whose command ended with no exit status: its session was cut (the host may be
    gone), unlike a command that exited non-zero on its own."""
    return failed.exit_code is None or failed.exit_code < 0


def host_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` may mean the host is gone (worth a probe): a host error, a broken
    SSH session (paramiko's own errors escape some calls), or a stage cut off."""
    if isinstance(exc, StageFailed):
        return cut_off(exc)
    return isinstance(exc, HOST_TROUBLE)


def lost(cfg: MqiConfig, gpu_host: GpuHost, exc: BaseException, logger: Logger) -> bool:
    """After a host error that is not the command's own failure: is the host gone? If so it
    is marked down (and the caller moves the beam elsewhere)."""
    if isinstance(exc, CommandError) or answers(gpu_host):
        return False
    mark_down(cfg, gpu_host.name, exc, logger)
    try:  # its GPUs leave the limit now, not at the next look of some beam
        hosts = pool_hosts(cfg)
        _limit_follows(hosts, look(cfg, hosts, logger), logger)
    except Exception as err:  # noqa: BLE001 - the next look or the curator sizes it
        logger.warning("could not resize the admission limit: %s", err)
    return True


def by_name(cfg: MqiConfig, name: str) -> GpuHost:
    """One host of the pool."""
    for gpu_host in pool_hosts(cfg):
        if gpu_host.name == name:
            return gpu_host
    raise KeyError(f"no GPU host {name!r} in gpu.hosts")


def ensure_limit(cfg: MqiConfig, logger: Logger, *, only_if_missing: bool) -> int | None:
    """Size the admission limit to the GPUs of the answering hosts (`mqi up`), or create it
    when there is none (``only_if_missing``: a case's check). Returns the size set."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    hosts = pool_hosts(cfg)
    if only_if_missing:
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(hosts[0].pool.limit_name)
                return None
            except ObjectNotFound:
                pass
    looks = look(cfg, hosts, logger)
    if not looks:
        raise GpuQueryError(f"no GPU host answers ({', '.join(h.name for h in hosts)})")
    return size_limit(hosts, looks, logger)


def forget() -> None:
    """Clear this process's view (tests)."""
    global _answering
    with _STATE:
        _down_until.clear()
        _prepared.clear()
        _prep_locks.clear()
        _answering = None
