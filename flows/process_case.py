"""The case pipeline: one flow run per case, one task run per stage.

    inspect ─► upload ─► workflow steps (case steps in order; per-beam steps in
    parallel across beams, each simulation on one concrete GPU) ─► download ─►
    verify ─► report

Stages that ran before for the same inputs are not repeated: each remote stage
is cached under a key made of the case id, the step, the case's content digest
and the rendered command, so a rerun of a case that failed in beam 2 re-runs
beam 2 and what follows it, and nothing else.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import wait

from blocks import CommandError
from blocks.factory import Host, gpu_host, gpu_pool
from blocks.gpu_pool import LOCK_BUSY_EXIT
from config import MqiConfig, get_config
from flows.case_inspection import CaseInfo, inspect_case
from flows.commands import render_step_command, validate_case_id
from flows.layout import RemoteLayout, remote_layout, results_dir
from flows.moqui_input import render_moqui_input
from flows.reporting import ProgressReporter, StageLog, render_report

GPU_STEP = "run_moqui_sim"
BEAM_STEPS = frozenset({"run_moqui_sim", "convert_to_dicom"})


class StageFailed(RuntimeError):
    """A stage did not succeed; the message names the stage, the beam and why."""


class CaseFailed(RuntimeError):
    """One or more beams failed; the message lists each with its reason."""


def _key(_context: Any, parameters: dict[str, Any]) -> str:
    return parameters["key"]


def cache_key(*parts: object) -> str:
    """A stage's identity: the same parts mean the same work, safe to take from cache."""
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def _options(cfg: MqiConfig, step: str) -> dict[str, Any]:
    policy = cfg.policy(step)
    retries = policy.retries or 0
    delay = policy.retry_delay_seconds or 0
    factor = policy.backoff_factor or 1
    return {"retries": retries,
            "retry_delay_seconds": [delay * factor ** i for i in range(retries)] or 0}


def _timeout(cfg: MqiConfig, step: str) -> float | None:
    return cfg.policy(step).timeout_seconds


def _beam_label(beam: int | None) -> str:
    return "" if beam is None else f" [beam {beam}]"


def run_remote(host: Host, cfg: MqiConfig, layout: RemoteLayout, step: str, command: str, *,
               beam: int | None = None, env: dict[str, str] | None = None,
               on_line: Callable[[str, str], None] | None = None,
               success: Callable[[Any], str | None] | None = None) -> Any:
    """Run one stage's command with its log streamed and kept, and judge the outcome.

    Raises:
        StageFailed: Non-zero exit, or ``success(result)`` returned a reason.
    """
    logger = get_run_logger()
    label = f"{step}{_beam_label(beam)}"
    log = StageLog(results_dir(cfg, layout.case_id) / "logs",
                   f"{step}{'' if beam is None else f'-beam{beam}'}.log")
    stream = cfg.logging.stream_command_output

    def line(stream_name: str, text: str) -> None:
        log.write(stream_name, text)
        if on_line is not None:
            on_line(stream_name, text)
        elif stream:
            logger.info("%s %s: %s", label, stream_name, text)

    logger.info("%s: running on %s: %s", label, host.address, command)
    try:
        result = host.run(command, timeout=_timeout(cfg, step), env=env, check=False,
                          on_line=line, pid_file=layout.pid_file(step, beam))
    except CommandError as exc:  # timeout: the process group was already killed
        raise StageFailed(f"{label} failed: {exc}") from None
    finally:
        log.close()
    reason = None
    if result.exit_code != 0:
        reason = f"exit code {result.exit_code}"
    elif success is not None:
        reason = success(result)
    if reason:
        raise StageFailed(f"{label} failed ({reason}): {_telling_line(cfg, result)}; full log: "
                          f"{log.path}\n{result.tail(12)}")
    logger.info("%s: done in %.1f s", label, result.duration)
    return result


def _telling_line(cfg: MqiConfig, result: Any) -> str:
    """The output line that best says why a command failed (for one-line summaries)."""
    lines = [ln for ln in (result.stdout + "\n" + result.stderr).splitlines() if ln.strip()]
    for line in reversed(lines):
        if any(p in line for p in cfg.moqui.failure_patterns):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


# ----------------------------------------------------------------------- stages
@task(name="inspect")
def inspect_stage(case_dir: str) -> CaseInfo:
    cfg = get_config()
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


@task(name="upload", cache_key_fn=_key, persist_result=True)
def upload_stage(case_dir: str, case_id: str, key: str) -> dict[str, Any]:
    cfg = get_config()
    layout = remote_layout(cfg, case_id)
    host = gpu_host(cfg)
    host.run(f"mkdir -p -- {shlex.quote(layout.pid_dir)} {shlex.quote(layout.log_dir)}",
             stream=False)
    result = host.upload(case_dir, layout.case_dir)
    get_run_logger().info("upload: %d file(s), %.1f MB in %.2f s (%d already there)",
                          len(result.files), result.bytes / 1e6, result.seconds,
                          len(result.skipped))
    return {"files": len(result.files), "skipped": len(result.skipped), "bytes": result.bytes,
            "seconds": result.seconds}


@task(name="case-step", task_run_name="{step}", cache_key_fn=_key, persist_result=True)
def case_step(step: str, case_id: str, command: str, key: str) -> dict[str, Any]:
    cfg = get_config()
    result = run_remote(gpu_host(cfg), cfg, remote_layout(cfg, case_id), step, command)
    return {"step": step, "seconds": result.duration}


@task(name="simulate", task_run_name="run_moqui_sim-beam{beam_number}", cache_key_fn=_key,
      persist_result=True)
def simulate_beam(case_id: str, beam_number: int, gantry_num: int | None, key: str) -> dict:
    cfg = get_config()
    logger = get_run_logger()
    layout = remote_layout(cfg, case_id)
    host = gpu_host(cfg)
    pool = gpu_pool(cfg)
    waited_from = time.monotonic()
    with pool.admission(logger):
        logger.debug("beam %d: admitted after %.2f s", beam_number,
                     time.monotonic() - waited_from)
        for attempt in itertools.count():
            t0 = time.monotonic()
            index = pool.choose_index(host, logger, spread=beam_number + attempt)
            logger.debug("beam %d: chose GPU %d in %.2f s", beam_number, index,
                         time.monotonic() - t0)
            waited = time.monotonic() - waited_from
            gpuid = 0 if cfg.gpu.set_cuda_visible_devices else index
            env = {"CUDA_VISIBLE_DEVICES": str(index)} if cfg.gpu.set_cuda_visible_devices \
                else None
            logger.info("beam %d: GPU %d is ours (waited %.1f s)", beam_number, index, waited)
            host.write_file(layout.input_file(beam_number), render_moqui_input(cfg, {
                "case_id": case_id, "gpu_id": gpuid, "parent_dir": layout.work_dir,
                "dicom_dir": layout.plan_dir, "log_dir": layout.beam_log_dir(beam_number),
                "output_dir": layout.raw_dir(beam_number), "beam_number": beam_number,
                "gantry_num": gantry_num if gantry_num is not None else "",
            }).encode())
            command = render_step_command(cfg, GPU_STEP, {
                "case_id": case_id, "case_dir": layout.case_dir, "work_dir": layout.work_dir,
                "output_dir": layout.output_dir, "log_dir": layout.log_dir,
                "beam_number": beam_number, "gpu_id": gpuid,
                "input_file": layout.input_file(beam_number),
                "raw_dir": layout.raw_dir(beam_number)})
            progress = ProgressReporter(case_id, beam_number, index, cfg.simulated)
            try:
                result = run_remote(
                    host, cfg, layout, GPU_STEP, pool.locked_command(index, command),
                    beam=beam_number, env=env, on_line=progress.line,
                    success=lambda r: _moqui_verdict(cfg, r))
            except StageFailed as exc:
                if f"(exit code {LOCK_BUSY_EXIT})" in str(exc):
                    # Another simulation took this GPU's lock first: choose again.
                    logger.info("beam %d: GPU %d was taken a moment ago; choosing again",
                                beam_number, index)
                    progress.finish(failed=True)
                    continue
                progress.finish(failed=True)
                raise
            progress.finish()
            return {"beam": beam_number, "gpu": index, "seconds": result.duration,
                    "waited": waited}


def _moqui_verdict(cfg: MqiConfig, result: Any) -> str | None:
    """Why a MOQUI run that exited 0 still failed, or None when it succeeded."""
    text = result.stdout + "\n" + result.stderr
    for pattern in cfg.moqui.failure_patterns:
        if pattern in text:
            return f"log contains {pattern!r}"
    if cfg.moqui.success_pattern not in result.stdout:
        return f"no {cfg.moqui.success_pattern!r} line"
    return None


@task(name="beam-step", task_run_name="{step}-beam{beam_number}", cache_key_fn=_key,
      persist_result=True)
def beam_step(step: str, case_id: str, beam_number: int, command: str, key: str) -> dict:
    cfg = get_config()
    result = run_remote(gpu_host(cfg), cfg, remote_layout(cfg, case_id), step, command,
                        beam=beam_number)
    return {"step": step, "beam": beam_number, "seconds": result.duration}


@task(name="download", cache_key_fn=_key, persist_result=True)
def download_stage(case_id: str, key: str) -> dict[str, Any]:
    cfg = get_config()
    layout = remote_layout(cfg, case_id)
    result = gpu_host(cfg).download(layout.dicom_root, results_dir(cfg, case_id) / "dicom")
    get_run_logger().info("download: %d file(s), %.1f MB in %.2f s", len(result.files),
                          result.bytes / 1e6, result.seconds)
    return {"checksums": result.checksums, "seconds": result.seconds}


@task(name="verify")
def verify_stage(case_id: str, beams: list[int]) -> dict[str, dict[str, str]]:
    """Every beam has a readable RT Dose in the results folder; returns beam → {file: sha}."""
    import pydicom

    from blocks.manifest import sha256_file

    cfg = get_config()
    out: dict[str, dict[str, str]] = {}
    for beam in beams:
        folder = results_dir(cfg, case_id) / "dicom" / f"beam_{beam}"
        files = sorted(folder.glob("*.dcm"))
        if not files:
            raise StageFailed(f"verify [beam {beam}]: no RT Dose in {folder}")
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.get("Modality") != "RTDOSE":
                raise StageFailed(f"verify [beam {beam}]: {path.name} is not an RT Dose "
                                  f"(Modality {ds.get('Modality')})")
        out[str(beam)] = {p.relative_to(results_dir(cfg, case_id)).as_posix(): sha256_file(p)
                          for p in files}
    return out


@task(name="report")
def report_stage(info: CaseInfo, workflow: str, sims: dict[int, dict], files: dict,
                 started: float) -> str:
    cfg = get_config()
    text = render_report(cfg, info, workflow, sims, files, time.time() - started)
    target = results_dir(cfg, info.case_id) / "report.md"
    target.write_text(text)
    create_markdown_artifact(markdown=text, key=f"case-{_artifact_slug(info.case_id)}",
                             description=f"MQI report for case {info.case_id}")
    return str(target)


def _artifact_slug(case_id: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", case_id.lower()).strip("-")[:60] or "case"


# ------------------------------------------------------------------------- hooks
def kill_remote_processes(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation / on_crashed: kill the case's remote process groups.

    Runs in the parent (serve/worker) process with no task context: everything
    comes from the flow run's parameters (the case id) and the configuration.
    """
    import logging

    logger = logging.getLogger("mqi.process_case")
    cfg = get_config()
    case_id = Path(str(flow_run.parameters.get("case_dir", ""))).name
    try:
        validate_case_id(case_id, cfg.cases.id_pattern)
    except ValueError:
        return
    layout = remote_layout(cfg, case_id)
    host = gpu_host(cfg)
    listed = host.run(f"ls -1 -- {shlex.quote(layout.pid_dir)}", check=False, stream=False)
    for name in listed.stdout.split():
        if name.endswith(".pid"):
            killed = host.kill_pid_file(f"{layout.pid_dir}/{name}")
            logger.warning("case %s is %s: killed remote %s: %s", case_id, state.name, name,
                           killed)


def _run_name() -> str:
    from prefect.runtime import flow_run

    name = Path(str(flow_run.parameters.get("case_dir", ""))).name
    try:
        return f"case-{validate_case_id(name, get_config().cases.id_pattern)}"
    except ValueError:
        return "case-(invalid id)"  # never put an unchecked folder name anywhere


# -------------------------------------------------------------------------- flow
@flow(name="process_case", flow_run_name=_run_name, on_cancellation=[kill_remote_processes],
      on_crashed=[kill_remote_processes])
def process_case(case_dir: str, workflow: str = "default_qa") -> dict[str, Any]:
    """Process one case folder end to end. Fails with the stage, beam and reason."""
    started = time.time()
    cfg = get_config()
    logger = get_run_logger()
    if workflow not in cfg.workflows:
        raise ValueError(f"no workflow {workflow!r} (configured: {', '.join(cfg.workflows)})")
    info = inspect_stage(case_dir)
    _tag_run(info)
    case_id, digest = info.case_id, info.manifest_digest
    layout = remote_layout(cfg, case_id)
    upload_stage.with_options(**_options(cfg, "upload"))(
        info.case_dir, case_id, key=cache_key(case_id, "upload", digest, layout.case_dir))

    steps = cfg.workflows[workflow]
    sims: dict[int, dict] = {}
    failures: list[str] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        if step not in BEAM_STEPS:
            values = {"case_id": case_id, "case_dir": layout.case_dir,
                      "work_dir": layout.work_dir, "output_dir": layout.output_dir,
                      "log_dir": layout.log_dir}
            command = render_step_command(cfg, step, values)
            case_step.with_options(**_options(cfg, step))(
                step, case_id, command, key=cache_key(case_id, step, digest, command))
            i += 1
            continue
        if GPU_STEP in steps[i:] and not sims and not failures:
            # Size the GPU limits to what the host has now (idempotent, cheap).
            gpu_pool(cfg).ensure_limit(gpu_host(cfg))
        chain = []  # consecutive per-beam steps run as one chain per beam, beams in parallel
        while i < len(steps) and steps[i] in BEAM_STEPS:
            chain.append(steps[i])
            i += 1
        sims, failures = _run_beam_chains(cfg, info, layout, chain)
        if failures:
            break
    if failures:
        raise CaseFailed(f"case {case_id}: " + "; ".join(failures))

    beams = [b.number for b in info.beams]
    downloaded = download_stage.with_options(**_options(cfg, "download"))(
        case_id, key=cache_key(case_id, "download", digest, *steps, *sorted(sims)))
    files = verify_stage(case_id, beams)
    report = report_stage(info, workflow, sims, files, started)
    if cfg.paths.clean_remote_work_dir:
        gpu_host(cfg).run(f"rm -rf -- {shlex.quote(layout.work_dir)}", stream=False,
                          check=False)
    logger.info("case %s COMPLETED%s: results in %s", case_id,
                " (SIMULATED)" if cfg.simulated else "", results_dir(cfg, case_id))
    return {"case_id": case_id, "results": str(results_dir(cfg, case_id)), "report": report,
            "gpus": {b: s.get("gpu") for b, s in sims.items()},
            "download_seconds": downloaded.get("seconds")}


def _run_beam_chains(cfg: MqiConfig, info: CaseInfo, layout: RemoteLayout,
                     chain: list[str]) -> tuple[dict[int, dict], list[str]]:
    """Submit every beam's chain of steps; wait for all; return sim results and failures."""
    case_id, digest = info.case_id, info.manifest_digest
    futures: dict[int, list[tuple[str, Any]]] = {}
    for beam in info.beams:
        upstream = None
        futures[beam.number] = []
        for step in chain:
            values = {"case_id": case_id, "case_dir": layout.case_dir,
                      "work_dir": layout.work_dir, "output_dir": layout.output_dir,
                      "log_dir": layout.log_dir, "beam_number": beam.number,
                      "beam_name": beam.name,
                      "beam_dir": f"{layout.case_dir}/{beam.delivery_dir}"}
            if step == GPU_STEP:
                # The GPU index is part of neither the key nor the cache: any GPU will do.
                probe = render_step_command(cfg, step, {
                    **values, "gpu_id": "{gpu}", "input_file": layout.input_file(beam.number),
                    "raw_dir": layout.raw_dir(beam.number)})
                key = cache_key(case_id, step, digest, beam.number, probe,
                                cfg.moqui.input_template, cfg.moqui.output_format,
                                cfg.moqui.random_seed, sorted(cfg.moqui.parameters.items()))
                future = simulate_beam.with_options(**_options(cfg, step)).submit(
                    case_id, beam.number, beam.gantry_num, key=key,
                    wait_for=[upstream] if upstream else None)
            else:
                if step == "convert_to_dicom":
                    values |= {"raw_dir": layout.raw_dir(beam.number),
                               "dicom_dir": layout.dicom_dir(beam.number)}
                command = render_step_command(cfg, step, values)
                future = beam_step.with_options(**_options(cfg, step)).submit(
                    step, case_id, beam.number, command,
                    key=cache_key(case_id, step, digest, beam.number, command),
                    wait_for=[upstream] if upstream else None)
            futures[beam.number].append((step, future))
            upstream = future
    wait([f for fs in futures.values() for _, f in fs])
    sims: dict[int, dict] = {}
    failures: list[str] = []
    for beam_number, steps in futures.items():
        for step, future in steps:
            state = future.state
            if state.is_completed():
                if step == GPU_STEP:
                    sims[beam_number] = future.result()
                continue
            if state.name in ("NotReady", "Pending"):
                break  # its upstream failed: that one is reported
            try:
                future.result()
            except StageFailed as exc:  # already names the step and the beam
                failures.append(str(exc).splitlines()[0])
            except Exception as exc:  # noqa: BLE001 - collected, reported together
                failures.append(f"{step} [beam {beam_number}]: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}")
            break
    return sims, failures


def _tag_run(info: CaseInfo) -> None:
    """Label the flow run with the case id (and the pseudonym, where config allows)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    cfg = get_config()
    tags = {f"case:{info.case_id}"}
    if cfg.cases.patient_id_in_logs == "hash":
        tags.add(f"patient:{info.patient_hash}")
    if cfg.simulated:
        tags.add("SIMULATED")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, tags=sorted(set(run.tags) | tags))
