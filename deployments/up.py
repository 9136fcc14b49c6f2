"""Bringing the whole system up on one machine: server, serve, sensor, supervised.

Used by `mqi up` and `mqi demo`. One instance per data dir: a second one is
refused while the first holds ``<data_dir>/mqi-up.lock``. ``run_system`` is
the whole life of it: up, supervised until a signal, stopped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO
from uuid import UUID

from blocks import procfs
from config import MqiConfig, MqiError
from deployments import server
from deployments.exposure import refuse_unprotected_bind, serves_embedded
from deployments.notifications import apply_notifications
from deployments.publish import publish
from deployments.supervisor import Child, ChildFailed, Supervisor

log = logging.getLogger("mqi.up")

OnUp = Callable[[Callable[[], bool]], bool]
"""``on_up(stop_requested) -> finished``: work to do once the system is up."""


class AlreadyRunning(MqiError):
    """Another `mqi up` holds this data dir."""


def take_instance_lock(cfg: MqiConfig) -> IO[str]:
    """Hold ``<data_dir>/mqi-up.lock`` for the life of the process (the kernel frees it).

    Raises:
        AlreadyRunning: Naming the pid that holds it.
    """
    data = Path(cfg.paths.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    fh = open(data / "mqi-up.lock", "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise AlreadyRunning(f"another `mqi up` (pid {holder}) is running on {data}; stop it "
                             f"first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def children(cfg: MqiConfig, config_file: Path) -> list[Child]:
    """The processes `mqi up` runs, in start order, per ``processes.start``."""
    logs = Path(cfg.paths.data_dir) / "logs"
    py = sys.executable
    common = {**server.client_env(cfg), "MQI_CONFIG_PATH": str(config_file)}
    out: list[Child] = []
    wanted = cfg.processes.start
    if "server" in wanted and cfg.prefect.api_url is None:
        api = cfg.prefect.effective_api_url
        server.prefect_home(cfg).mkdir(parents=True, exist_ok=True)
        out.append(Child(
            "server", [py, "-m", "prefect", "server", "start", "--host",
                       cfg.prefect.server_host, "--port", str(cfg.prefect.server_port)],
            {**common, **server.server_env(cfg)}, logs / "server.log",
            ready=lambda: server.is_healthy(api), stop_last=True))
    run = Path(cfg.paths.data_dir) / "run"
    if "serve" in wanted:
        out.append(Child("serve", [py, "-m", "deployments.serve"], common, logs / "serve.log",
                         ready_file=run / "serve.ready"))
        # The curator and the archiver in a runner of their own: never behind the cases.
        out.append(Child("housekeeping", [py, "-m", "deployments.serve", "--housekeeping"],
                         common, logs / "housekeeping.log",
                         ready_file=run / "housekeeping.ready"))
    if "sensor" in wanted:
        out.append(Child("sensor", [py, "-m", "deployments.sensor"], common,
                         logs / "sensor.log", ready_file=run / "sensor.ready"))
    return out


def kill_leftovers(cfg: MqiConfig) -> list[int]:
    """Kill processes a previous `mqi up` on this data dir left behind (kill -9 of it).

    Its children die with it (PR_SET_PDEATHSIG), but the flow-run processes they
    spawned are grandchildren and would run on, unseen, against a server that is
    gone. We hold the instance lock, so every process still carrying this data
    dir's PREFECT_HOME is such a leftover.
    """
    marker = f"PREFECT_HOME={server.prefect_home(cfg)}".encode()
    mine = {os.getpid(), *(_ancestors(os.getpid()))}
    victims = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            victims.append(int(entry.name))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
            log.warning("killed process %d left by a previous mqi up on this data dir", pid)
        except ProcessLookupError:
            pass
    return victims


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1 and (found := procfs.stat(pid)) is not None:
        pid = found.ppid
        out.append(pid)
    return out


def resume_interrupted(cfg: MqiConfig) -> list[str]:
    """Reschedule the case runs a stop or crash of `mqi up` interrupted.

    Only for the embedded server, and only runs no worker took (a run a worker
    executes has a work queue; it is the worker's to finish). Each is
    put back to Scheduled (as `prefect flow-run retry` does) after its remote
    processes are killed; the runner picks it up again and the stages it had
    finished come from cache, so the case resumes at the interrupted beam and
    is still one flow run.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled

    from flows.naming import FLOW_NAME
    from flows.process_case import kill_remote_processes

    resumed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING,
                      StateType.CRASHED]))), limit=200)
        for run in runs:
            if run.work_queue_id is not None:
                continue  # a worker's run: alive or not, not ours to resume
            try:
                kill_remote_processes(None, run, run.state)
            except Exception as exc:  # noqa: BLE001 - the host may be down; resume anyway
                log.warning("%s: could not kill its remote processes: %s", run.name, exc)
            client.set_flow_run_state(
                run.id, Scheduled(message="resumed after mqi up was restarted"), force=True)
            log.warning("%s was %s when mqi up stopped: resuming it", run.name,
                        run.state.name if run.state else "?")
            resumed.append(run.name)
    return resumed


def cases_go_to_workers() -> bool:
    """True when `prefect deploy` / `mqi deploy` put the case deployment on a work pool."""
    from prefect.client.orchestration import get_client

    from deployments.definitions import DEPLOYMENTS
    from deployments.serve import owned_by_workers
    from flows.naming import DEPLOYMENT_NAME

    # The case deployment only: housekeeping (the archiver) on a work pool holds no GPU.
    with get_client(sync_client=True) as client:
        return any(owned_by_workers(client, spec) for spec in DEPLOYMENTS
                   if spec.name == DEPLOYMENT_NAME)


def release_orphaned_gpu_slots(cfg: MqiConfig) -> int:
    """Free the GPU slots the runs of a previous `mqi up` on this data dir still hold.

    Only for the embedded server, after kill_leftovers: every process that could
    hold one of its leases is dead, so each lease on the GPU limit is an orphan.
    Left alone, a lease frees its slot only when it expires (gpu.lease_seconds),
    and the resumed case would wait that long for a GPU nobody uses. The leases
    are read from the server's lease store (Prefect's own reader) and released
    through the API, which also counts the slots back.
    """
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    store = ConcurrencyLeaseStorage(server.prefect_home(cfg) / "concurrency_leases")
    if not store.storage_path.is_dir():
        return 0

    async def orphans(limit_id: UUID) -> list[UUID]:
        found = []
        for lease_id in await store.read_active_lease_ids(limit=1000):
            lease = await store.read_lease(lease_id)
            if lease is not None and limit_id in lease.resource_ids:
                found.append(lease_id)
        return found

    released = 0
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(cfg.gpu.concurrency_limit)
        except Exception:  # noqa: BLE001 - no limit yet: nothing can be held
            return 0
        for lease_id in asyncio.run(orphans(limit.id)):
            client.release_concurrency_slots_with_lease(lease_id)
            released += 1
    return released


def prepare_gpu_limit(cfg: MqiConfig) -> str | None:
    """Size the GPU admission limit now; a message when the GPU host cannot be read."""
    from blocks.factory import gpu_host, gpu_pool

    if cfg.gpu.several_hosts:  # sized to the hosts that answer (flows/placement.py)
        from flows import placement

        try:
            slots = placement.ensure_limit(cfg, log, only_if_missing=False)
        except Exception as exc:  # noqa: BLE001 - reported; each case will say it again
            return f"could not read the GPUs of any GPU host: {exc}"
        log.info("GPU limit %s: %s GPU(s)", cfg.gpu.concurrency_limit, slots)
        return None
    try:
        gpus = gpu_pool(cfg).ensure_limit(gpu_host(cfg))
    except Exception as exc:  # noqa: BLE001 - reported; each case will say it again
        return f"could not read the GPUs on host {cfg.gpu.primary!r}: {exc}"
    log.info("GPU limit %s: %d GPU(s)", cfg.gpu.concurrency_limit, len(gpus))
    return None


def bring_up(cfg: MqiConfig, config_file: Path) -> Supervisor:
    """Start the children (server first, waited for) and size the GPU limit.

    The caller owns the returned supervisor: ``watch`` it, then ``stop_all``.
    """
    os.environ.update(server.client_env(cfg))
    os.environ["MQI_CONFIG_PATH"] = str(config_file)
    if cfg.prefect.api_url is None:
        kill_leftovers(cfg)
    supervisor = Supervisor(children(cfg, config_file), cfg.processes.restart)
    first = [c for c in supervisor.children if c.name == "server"]
    rest = [c for c in supervisor.children if c.name != "server"]
    supervisor.children = first
    try:
        supervisor.start_all()
        if not server.is_healthy(cfg.prefect.effective_api_url):
            raise server.ServerError(
                f"the Prefect API at {cfg.prefect.effective_api_url} is not reachable")
        if "serve" in cfg.processes.start:
            # Flow runs load these, not the YAML: without them no case can run. A
            # machine that runs only the sensor publishes nothing (`mqi deploy` does).
            log.info("published %s", ", ".join(publish(cfg, config_file)))
            for line in apply_notifications(cfg):
                print(line, flush=True)
            problem = prepare_gpu_limit(cfg)
            if problem:
                print(f"warning: {problem}", file=sys.stderr)
        if cfg.prefect.api_url is None and "serve" in cfg.processes.start:
            # Workers on this server may hold GPU leases of their own: then no lease
            # is an orphan of ours for certain, and expiry frees a dead one.
            freed = 0 if cases_go_to_workers() else release_orphaned_gpu_slots(cfg)
            if freed:
                print(f"freed {freed} GPU slot(s) held by runs of the previous mqi up",
                      flush=True)
            for name in resume_interrupted(cfg):
                print(f"resuming {name}, interrupted when mqi up last stopped", flush=True)
        supervisor.children = first + rest
        for child in rest:
            supervisor.spawn(child)
    except BaseException:
        supervisor.children = first + rest
        supervisor.stop_all()
        raise
    return supervisor


def check_api(cfg: MqiConfig) -> None:
    """Refuse to start against a configured API that is down, or beside a stranger's server.

    Raises:
        ServerError: Saying which, and what to do.
    """
    api = cfg.prefect.effective_api_url
    if cfg.prefect.api_url is not None and not server.is_healthy(api):
        raise server.ServerError(f"the Prefect API at {api} (prefect.api_url) is not reachable")
    if cfg.prefect.api_url is None and server.is_healthy(api):
        raise server.ServerError(f"a Prefect server already answers at {api}; stop it first, "
                                 f"or set prefect.api_url to use it")


def make_missing_folders(cfg: MqiConfig) -> list[str]:
    """Create the scan root and the results root where they do not exist; one line each.

    A missing scan root otherwise leaves the sensor logging an error and waiting.
    Said, not silent: a scan root that should be a mounted share and is not mounted
    yet is then an empty local folder, and the operator must know it was made here.

    Raises:
        MqiError: A folder could not be made (naming it, its config key and why).
    """
    said = []
    for key, folder in (("scanner.target_directory", Path(cfg.scanner.target_directory)),
                        ("paths.results_root", Path(cfg.paths.results_root))):
        if folder.is_dir():
            continue
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise MqiError(f"cannot create {folder} ({key}): {exc.strerror}") from None
        said.append(f"created {folder} ({key}): it did not exist")
    return said


def run_system(cfg: MqiConfig, config_file: Path, on_up: OnUp | None = None) -> None:
    """Bring everything up, call ``on_up(stop_requested)`` once it is, supervise until a
    signal (or until ``on_up`` returns True), then stop everything.

    Raises:
        UnprotectedServer: The embedded server would listen beyond loopback without
            PREFECT_SERVER_API_AUTH_STRING.
        AlreadyRunning: Another `mqi up` holds the data dir.
        ServerError: The Prefect API is down, taken, or would not start.
        ChildFailed: A child would not start, or died more often than allowed.
    """
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call is noise
    if serves_embedded(cfg):  # before anything is started or locked
        refuse_unprotected_bind(cfg, config_file)
    lock = take_instance_lock(cfg)
    try:
        check_api(cfg)
        for line in make_missing_folders(cfg):
            print(line, flush=True)
        received: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: received.append(signum))
        print(f"starting MQI Communicator (config {config_file}, data {cfg.paths.data_dir}) ...",
              flush=True)
        supervisor = bring_up(cfg, config_file)
        print(f"MQI Communicator is up. Dashboard: {server.ui_url(cfg)}", flush=True)
        print(f"watching {cfg.scanner.target_directory} for cases; Ctrl+C stops everything",
              flush=True)
        reason = None
        try:
            finished = on_up(lambda: bool(received)) if on_up else False
            if not finished:
                reason = supervisor.watch(lambda: bool(received))
        finally:
            supervisor.stop_all()
    finally:
        lock.close()
    if reason:
        raise ChildFailed(reason)
    print("stopped.")
