"""The stage tasks of ``process_case``: one task run per stage (and per beam).

Tasks take names, digests and rendered commands, never live clients: each task
loads the configuration and builds its host itself, so every input is hashable
for the cache (flows/caching.py) and any process — serve, a worker, the CLI —
can run any stage.

Every remote stage takes the flow run's id as an input (``flow_run_id``) rather
than reading ``prefect.runtime.flow_run.id`` itself: it names the run's remote
work folder (flows/layout.py), and as an input it is part of the stage's cache
key. A retry of the same flow run (``mqi rerun``) has the same id, so the stages
it finished are taken from the result store; a new flow run of the same content
has another id and an empty folder, so it takes nothing from another run — even
a stage whose command names no path in the folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import logging
import shlex
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task

from blocks.gpu_pool import LOCK_BUSY_EXIT
from blocks.host import Host
from config import MqiConfig
from config.models import GPU_STEP
from flows import placement
from flows.caching import StageIdentity
from flows.case_inspection import Beam, CaseInfo, inspect_case
from flows.commands import render_step_command
from flows.dose_qa import DoseQaOutcome
from flows.layout import remote_layout, results_dir
from flows.moqui_input import render_simulation
from flows.naming import simulation_task_run_name
from flows.orphans import end_earlier_simulation
from flows.outcomes import (
    DownloadOutcome,
    SimulationOutcome,
    StageFailed,
    StepOutcome,
    UploadOutcome,
)
from flows.progress import BeamProgress, label_gpu
from flows.remote_stage import moqui_verdict, run_remote
from flows.reporting import render_report
from flows.settings import flow_config, flow_host, flow_pool


@task(name="inspect", task_run_name="inspect")
def inspect_stage(case_dir: str) -> CaseInfo:
    """Read and check the case folder here, before anything leaves the machine."""
    cfg = flow_config()
    # A folder named inside the scan root must really be there (no link, no ..);
    # `mqi run` may also process a folder from anywhere else, as given.
    in_scan_root = Path(case_dir).absolute().parent == Path(
        cfg.scanner.target_directory).absolute()
    info = inspect_case(case_dir, id_pattern=cfg.cases.id_pattern,
                        scan_root=cfg.scanner.target_directory if in_scan_root else None,
                        gantry_numbers=cfg.moqui.gantry_numbers,
                        ignore={cfg.scanner.ready_marker})
    get_run_logger().info(
        "case %s: plan %s, %d treatment beam(s) (%s), %d setup beam(s) excluded, %d files, "
        "%.1f MB", info.case_id, info.plan_label, len(info.beams),
        ", ".join(f"{b.number} {b.name} {b.machine}" for b in info.beams), info.setup_beams,
        len(info.manifest), info.total_bytes / 1e6)
    return info


@task(name="upload", task_run_name="upload", cache_policy=StageIdentity(exclude=("case_dir",)),
      persist_result=True)
def upload_stage(case_dir: str, case_id: str, digest: str, flow_run_id: str,
                 remote_dir: str, host: str | None = None) -> UploadOutcome:
    """Send the case to ``remote_dir``; the same content there again is not sent again.

    ``host``: which of several GPU hosts (``gpu.hosts``); None: the one GPU host."""
    cfg = flow_config()
    layout = remote_layout(cfg, case_id, flow_run_id, host)
    target = _host(cfg, host)
    target.run(f"mkdir -p -- {shlex.quote(layout.pid_dir)} {shlex.quote(layout.log_dir)}",
               stream=False)
    result = target.upload(case_dir, remote_dir)
    get_run_logger().info("upload%s: %d file(s), %.1f MB in %.2f s (%d already there)",
                          f" to {host}" if host else "", len(result.files), result.bytes / 1e6,
                          result.seconds, len(result.skipped))
    return UploadOutcome(files=len(result.files), skipped=len(result.skipped),
                         bytes=result.bytes, seconds=result.seconds)


def _host(cfg: MqiConfig, name: str | None) -> Host:
    """The GPU host a stage runs on: the named one of several, or the one."""
    return flow_host(cfg) if name is None else placement.by_name(cfg, name).host


@task(name="case-step", task_run_name="{step}", cache_policy=StageIdentity(),
      persist_result=True)
def case_step(step: str, case_id: str, digest: str, flow_run_id: str,
              command: str, host: str | None = None) -> StepOutcome:
    """A workflow step that runs once per case (``run_interpreter``); with several GPU
    hosts, once per host the case's beams use (``host``)."""
    cfg = flow_config()
    result = run_remote(_host(cfg, host), cfg, remote_layout(cfg, case_id, flow_run_id, host),
                        step, command)
    return StepOutcome(step=step, seconds=result.duration)


@task(name="beam-step", task_run_name="{step}-beam{beam_number}", cache_policy=StageIdentity(),
      persist_result=True)
def beam_step(step: str, case_id: str, digest: str, flow_run_id: str, beam_number: int,
              command: str, host: str | None = None) -> StepOutcome:
    """A workflow step that runs once per beam and needs no GPU (``convert_to_dicom``), on
    the host that ran the beam's simulation (``host``, with several GPU hosts).

    Raises:
        HostLost: That host stopped answering: the beam must run again elsewhere.
    """
    cfg = flow_config()
    with _on_pool_host(cfg, host):
        result = run_remote(_host(cfg, host), cfg,
                            remote_layout(cfg, case_id, flow_run_id, host), step, command,
                            beam=beam_number)
    return StepOutcome(step=step, seconds=result.duration, beam=beam_number)


@contextlib.contextmanager
def _on_pool_host(cfg: MqiConfig, host: str | None) -> Iterator[None]:
    """A host error on one of several GPU hosts that no longer answers is ``HostLost``."""
    try:
        yield
    except Exception as exc:
        if host is not None and placement.host_trouble(exc) \
                and placement.lost(cfg, placement.by_name(cfg, host), exc, get_run_logger()):
            raise placement.HostLost(host, str(exc).splitlines()[0] if str(exc) else "") \
                from exc
        raise


def simulation_recipe(inputs: Mapping[str, Any]) -> str:
    """What a beam's simulation computes, with the GPU left open: any GPU will do."""
    cfg = flow_config()
    layout = remote_layout(cfg, inputs["case_id"], inputs["flow_run_id"])
    return render_simulation(cfg, layout, inputs["beam"], "{gpu}").recipe


_WANTED_NAMES: dict[UUID, str] = {}
_NAMES_LOCK = threading.Lock()


def _name_task_run(name: str) -> None:
    """Rename the running task run (the dashboard and ``mqi status`` read it), in the
    background and best-effort: the simulation never waits for it or fails by it.

    Prefect creates task-run records from the client's events, so the record may
    not be on the server yet; the rename is tried again for a few seconds. When a
    beam renames twice (a lost race for a GPU), the newest name wins.
    """
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        return
    run_id = context.task_run.id
    with _NAMES_LOCK:
        _WANTED_NAMES[run_id] = name
    # In a copy of this context: Prefect's settings (the API address among them) can
    # live in context variables, which a new thread would not see.
    threading.Thread(target=contextvars.copy_context().run, args=(_rename, run_id),
                     daemon=True, name=f"rename-{name}").start()


def admission_order(beam: int) -> str:
    """Where a beam of this run stands in the line for a GPU: by the case's arrival (its
    run's scheduled start: a beam that is tried again keeps its place), then the beam's
    number, so an old case's beams go before a newer case's."""
    from prefect.runtime import flow_run

    arrival = flow_run.scheduled_start_time
    return f"{int(arrival.timestamp() * 1e6):017d}-{beam:04d}"


def _rename(run_id: UUID) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    for delay in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        time.sleep(delay)
        with _NAMES_LOCK:
            name = _WANTED_NAMES[run_id]
        try:
            with get_client(sync_client=True) as client:
                client.set_task_run_name(run_id, name)
            return
        except (ObjectNotFound, PrefectHTTPStatusError):
            continue  # not created on the server yet
        except Exception as exc:  # noqa: BLE001 - a courtesy: never fail the simulation
            logging.getLogger("mqi.stages").debug("could not rename task run: %s", exc)
            return


@task(name="simulate", task_run_name="run_moqui_sim-beam{beam.number}",
      cache_policy=StageIdentity(exclude=("case_dir",), recipe=simulation_recipe),
      persist_result=True)
def simulate_beam(case_id: str, digest: str, flow_run_id: str, beam: Beam,
                  case_dir: str = "", prepare: tuple[str, ...] = (),
                  avoid: tuple[str, ...] = ()) -> SimulationOutcome:
    """Run MOQUI for one beam on one concrete GPU, held for the whole run.

    Admission (the GPU concurrency limit) bounds how many run at once; the
    index is chosen among free GPUs and held by a ``flock`` on the GPU host,
    so losing a race for an index means choosing again, never sharing one.

    With several GPU hosts (flows/placement.py) the beam takes a free (host, index)
    among the hosts that answer, except ``avoid``; a host this run has not used yet
    first gets the case (``case_dir``) and its case steps (``prepare``); a host that
    stops answering mid-way is left for another.
    """
    shown: list[BeamProgress] = []  # each try's progress display
    try:
        return _simulate_beam(case_id, digest, flow_run_id, beam, case_dir, prepare, avoid,
                              shown)
    finally:
        for progress in shown:  # the GPU is handed on already: the last value may wait
            progress.close()


def _simulate_beam(case_id: str, digest: str, flow_run_id: str, beam: Beam, case_dir: str,
                   prepare: tuple[str, ...], avoid: tuple[str, ...],
                   shown: list[BeamProgress]) -> SimulationOutcome:
    """``simulate_beam``'s body; the progress displays it makes go into ``shown``."""
    cfg = flow_config()
    logger = get_run_logger()
    pool = flow_pool(cfg)
    avoiding = set(avoid)
    hosts = placement.pool_hosts(cfg) if cfg.gpu.several_hosts else []
    if not hosts:  # a retry of this task: the earlier try's process must not run on
        end_earlier_simulation(flow_host(cfg), remote_layout(cfg, case_id, flow_run_id),
                               beam.number, logger)
    waited_from = time.monotonic()
    order = admission_order(beam.number)
    while True:
        with pool.admission(logger, order):
            for attempt in itertools.count():
                if hosts:
                    where = placement.choose(cfg, hosts, logger, spread=beam.number + attempt,
                                             run_id=flow_run_id, avoid=avoiding)
                    name, host, gpus, index = where.host.name, where.host.host, where.host.pool, \
                        where.index
                    if name not in placement.prepared(flow_run_id):
                        break  # a host new to this run: the case goes there without a GPU slot
                else:
                    name, host, gpus = None, flow_host(cfg), pool
                    index = pool.choose_index(host, logger, spread=beam.number + attempt)
                layout = remote_layout(cfg, case_id, flow_run_id, name)
                waited = time.monotonic() - waited_from
                logger.info("beam %d: GPU %d%s is ours (waited %.1f s)", beam.number, index,
                            f" on {name}" if name else "", waited)
                _name_task_run(simulation_task_run_name(beam.number, index))
                label_gpu(index, simulation_task_run_name(beam.number, index))
                visible = cfg.gpu.set_cuda_visible_devices
                sim = render_simulation(cfg, layout, beam, 0 if visible else index)
                progress = BeamProgress(case_id, beam.number, index, cfg.simulated)
                shown.append(progress)
                try:
                    result = run_remote(
                        host, cfg, layout, GPU_STEP,
                        gpus.locked_command(index, sim.command, input_file=sim.input_file),
                        beam=beam.number, env={"CUDA_VISIBLE_DEVICES": str(index)} if visible
                        else None, stdin=sim.input_text.encode(), on_line=progress.line,
                        verdict=moqui_verdict(cfg))
                except Exception as exc:
                    failed = isinstance(exc, StageFailed)  # the command's own end, not ours
                    if isinstance(exc, StageFailed) and exc.exit_code == LOCK_BUSY_EXIT:
                        # nothing ran: no progress to show
                        logger.info("beam %d: GPU %d was taken a moment ago; choosing again",
                                    beam.number, index)
                        continue
                    if hosts and placement.host_trouble(exc) and placement.lost(
                            cfg, where.host, exc, logger):
                        progress.finish(failed=True)
                        logger.warning("beam %d: GPU host %s stopped answering; choosing another",
                                       beam.number, name)
                        avoiding.add(str(name))
                        continue
                    if failed and gpus.vanished(host, index, logger):
                        continue  # the device went between choice and start: choose again
                    if failed:
                        progress.finish(failed=True)
                    raise
                progress.finish()
                return SimulationOutcome(beam=beam.number, gpu=index, seconds=result.duration,
                                         waited=waited, host=name)
        try:  # `where` is set: only a host of several breaks out of the loop above
            placement.prepare(flow_run_id, where.host.name, functools.partial(
                prepare_host, cfg, case_dir, case_id, digest, flow_run_id, where.host.name,
                prepare))
        except Exception as exc:
            if not (placement.host_trouble(exc) and placement.lost(cfg, where.host, exc, logger)):
                raise
            avoiding.add(where.host.name)


def prepare_host(cfg: MqiConfig, case_dir: str, case_id: str, digest: str, flow_run_id: str,
                 host: str, steps: tuple[str, ...]) -> None:
    """Make one of several GPU hosts ready for the case's beams: the case uploaded there and
    its case steps (the interpreter) run there — each a stage cached per (run, host)."""
    from flows.process_case import _options  # the same retry policy and result store

    layout = remote_layout(cfg, case_id, flow_run_id, host)
    get_run_logger().info("GPU host %s: uploading the case and running %s there", host,
                          ", ".join(steps) or "no case step")
    upload_stage.with_options(**_options(cfg, "upload"))(
        case_dir, case_id, digest, flow_run_id, layout.case_dir, host)
    for step in steps:
        command = render_step_command(cfg, step, layout.step_values(step))
        case_step.with_options(**_options(cfg, step))(step, case_id, digest, flow_run_id,
                                                       command, host)


@task(name="download-beam", task_run_name="download-beam{beam_number}",
      cache_policy=StageIdentity(), persist_result=True)
def download_beam(case_id: str, digest: str, flow_run_id: str, beam_number: int,
                  host: str) -> DownloadOutcome:
    """Several GPU hosts: bring one beam's RT Dose back from the host that made it.

    Raises:
        HostLost: That host stopped answering: the beam must run again elsewhere.
    """
    cfg = flow_config()
    layout = remote_layout(cfg, case_id, flow_run_id, host)
    target = results_dir(cfg, case_id) / "dicom" / f"beam_{beam_number}"
    with _on_pool_host(cfg, host):
        result = _host(cfg, host).download(layout.dicom_dir(beam_number), target)
    get_run_logger().info("download of beam %d from %s: %d file(s), %.1f MB in %.2f s",
                          beam_number, host, len(result.files), result.bytes / 1e6,
                          result.seconds)
    return DownloadOutcome(checksums={f"beam_{beam_number}/{k}": v
                                      for k, v in result.checksums.items()},
                           seconds=result.seconds)


@task(name="download", task_run_name="download", cache_policy=StageIdentity(), persist_result=True)
def download_stage(case_id: str, digest: str, flow_run_id: str, steps: tuple[str, ...],
                   beams: tuple[int, ...]) -> DownloadOutcome:
    """Bring the RT Dose files of every beam back into the case's results folder."""
    cfg = flow_config()
    layout = remote_layout(cfg, case_id, flow_run_id)
    result = flow_host(cfg).download(layout.dicom_root, results_dir(cfg, case_id) / "dicom")
    get_run_logger().info("download: %d file(s), %.1f MB in %.2f s", len(result.files),
                          result.bytes / 1e6, result.seconds)
    return DownloadOutcome(checksums=result.checksums, seconds=result.seconds)


@task(name="verify", task_run_name="verify")
def verify_stage(case_id: str, beams: list[int]) -> dict[str, dict[str, str]]:
    """Every beam has a readable RT Dose in the results folder; returns beam → {file: sha}."""
    import pydicom

    from blocks.manifest import sha256_file

    cfg = flow_config()
    out: dict[str, dict[str, str]] = {}
    for beam in beams:
        folder = results_dir(cfg, case_id) / "dicom" / f"beam_{beam}"
        files = sorted(folder.glob("*.dcm"))
        if not files:
            raise StageFailed("verify", f"no RT Dose in {folder}", beam=beam)
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.get("Modality") != "RTDOSE":
                raise StageFailed("verify", f"{path.name} is not an RT Dose "
                                            f"(Modality {ds.get('Modality')})", beam=beam)
        out[str(beam)] = {p.relative_to(results_dir(cfg, case_id)).as_posix(): sha256_file(p)
                          for p in files}
    return out


@task(name="report", task_run_name="report")
def report_stage(info: CaseInfo, workflow: str, sims: dict[int, SimulationOutcome],
                 files: dict[str, dict[str, str]], started: float,
                 qa: DoseQaOutcome | None = None) -> str:
    """Write report.md into the results folder (the flow run's case report artifact
    shows the same text, redacted: flows/case_report.py)."""
    cfg = flow_config()
    text = render_report(cfg, info, workflow, sims, files, time.time() - started, qa)
    target = results_dir(cfg, info.case_id) / "report.md"
    target.write_text(text)
    return str(target)
