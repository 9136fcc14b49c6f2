"""A case's flow on several GPU hosts (``gpu.hosts``): what ``process_case`` asks of them.

Which host a beam runs on is flows/placement.py's; this module is the case's side of it
(docs/gpu-allocation.md#several-gpu-hosts):

- ``home``: the host the case is uploaded to and interpreted on before its beams start;
- ``Chains``: each beam's chain of steps runs on the host its simulation got, followed by
  the download of that beam's RT Dose from there; when a host stops answering
  (``HostLost``) the beam runs again from its simulation on another host;
- ``remove_work`` / ``hosts_to_clean``: every host the run may have used.

With one GPU host ``home`` is None and ``process_case`` does what it always did.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

from prefect.futures import PrefectFuture

from blocks.errors import HostError
from blocks.host import Host
from config import MqiConfig
from config.models import BEAM_STEPS, GPU_STEP
from flows import placement
from flows.case_inspection import Beam, CaseInfo
from flows.commands import render_step_command
from flows.layout import remote_layout
from flows.outcomes import DownloadOutcome, SimulationOutcome
from flows.stages import beam_step, download_beam, prepare_host, simulate_beam

Logger = logging.Logger | logging.LoggerAdapter[Any]
DOWNLOAD = "download"
"""The last link of each beam's chain with several GPU hosts."""

_LOCK = threading.Lock()
_homes: dict[str, str] = {}
_download_seconds: dict[str, float] = {}


def start(cfg: MqiConfig, info: CaseInfo, run_id: str, steps: list[str],
          logger: Logger) -> str | None:
    """Several GPU hosts: the host this run starts on (placement.home), with the case
    uploaded there and its case steps run there; another host if that one is lost meanwhile.
    One GPU host: None (``process_case`` uploads and runs the case steps itself).

    Raises:
        HostLost: No GPU host answers.
    """
    if not cfg.gpu.several_hosts:
        return None
    hosts = placement.pool_hosts(cfg)
    lost: set[str] = set()
    case_steps = tuple(s for s in steps if s not in BEAM_STEPS)
    while True:
        first = placement.home(cfg, hosts, logger, run_id, lost)
        logger.info("GPU host %s takes the case first (most free GPUs)", first.name)
        try:
            placement.prepare(run_id, first.name, functools.partial(
                prepare_host, cfg, info.case_dir, info.case_id, info.manifest_digest, run_id,
                first.name, case_steps))
        except Exception as exc:
            if placement.host_trouble(exc) and placement.lost(cfg, first, exc, logger):
                lost.add(first.name)
                continue
            raise
        with _LOCK:
            _homes[run_id] = first.name
        return first.name


def ensure_limit_exists(cfg: MqiConfig, logger: Logger) -> None:
    """The admission limit, created (sized to the answering hosts) when there is none."""
    placement.ensure_limit(cfg, logger, only_if_missing=True)


class Chains:
    """How one case's beam chains run on several GPU hosts.

    Args:
        chain: The workflow's consecutive per-beam steps; ``DOWNLOAD`` is added.
        before: The workflow's steps before them: its case steps run on each new host.
    """

    def __init__(self, cfg: MqiConfig, info: CaseInfo, run_id: str, chain: list[str],
                 before: list[str]) -> None:
        self.cfg, self.info, self.run_id = cfg, info, run_id
        self.chain = [*chain, DOWNLOAD]
        self.prepare = tuple(s for s in before if s not in BEAM_STEPS)
        self.avoid: dict[int, set[str]] = {}
        with _LOCK:
            self.home = _homes[run_id]

    def submit(self, beam: Beam, position: int, sims: dict[int, SimulationOutcome],
               options: dict[str, Any]) -> PrefectFuture[Any]:
        """Submit link ``position`` of ``beam``'s chain, on the host of its simulation."""
        cfg, info, run_id = self.cfg, self.info, self.run_id
        step = self.chain[position]
        if step == GPU_STEP:
            return simulate_beam.with_options(**options).submit(
                info.case_id, info.manifest_digest, run_id, beam, info.case_dir,
                self.prepare, tuple(sorted(self.avoid.get(beam.number, ()))))
        ran = sims.get(beam.number)
        host = ran.host if ran is not None and ran.host is not None else self.home
        if step == DOWNLOAD:
            return download_beam.with_options(**options).submit(
                info.case_id, info.manifest_digest, run_id, beam.number, host)
        command = render_step_command(
            cfg, step, remote_layout(cfg, info.case_id, run_id, host).step_values(step, beam))
        return beam_step.with_options(**options).submit(
            step, info.case_id, info.manifest_digest, run_id, beam.number, command, host)

    def again(self, beam_number: int, lost: placement.HostLost) -> int | None:
        """Where ``beam_number``'s chain starts again after its host was lost: its
        simulation, on another host; None when the chain has no simulation to move."""
        if GPU_STEP not in self.chain:
            return None
        self.avoid.setdefault(beam_number, set()).add(lost.host)
        return self.chain.index(GPU_STEP)

    def done(self, step: str, outcome: Any) -> None:
        if step == DOWNLOAD and isinstance(outcome, DownloadOutcome):
            with _LOCK:
                _download_seconds[self.run_id] = \
                    _download_seconds.get(self.run_id, 0.0) + outcome.seconds


def downloaded(run_id: str) -> DownloadOutcome:
    """What the per-beam downloads of this run took, together (the files: verify's)."""
    with _LOCK:
        return DownloadOutcome(checksums={}, seconds=_download_seconds.get(run_id, 0.0))


def _answering(cfg: MqiConfig, hosts: dict[str, Host], logger: Logger) -> Iterator[
        tuple[str, Host]]:
    for name, host in hosts.items():
        try:
            host.run("true", stream=False, timeout=30)
        except HostError as exc:
            logger.warning("GPU host %s does not answer (%s): its work folder of this run is "
                           "left there", name, str(exc).splitlines()[0] if str(exc) else exc)
            continue
        yield name, host


def remove_work(cfg: MqiConfig, case_id: str, run_id: str, logger: Logger) -> None:
    """Remove this run's work folder on every GPU host that answers."""
    from flows.settings import flow_gpu_hosts

    for name, host in _answering(cfg, flow_gpu_hosts(cfg), logger):
        host.run(remote_layout(cfg, case_id, run_id, name).removal_command(), stream=False,
                 check=False)


def hosts_to_clean(cfg: MqiConfig, attempt: str, logger: Logger) -> list[tuple[str | None, Host]]:
    """The hosts whose pid files of a run the cancellation/crash hook reads: the one GPU
    host; or every one of several that answers."""
    from flows.settings import flow_gpu_hosts, flow_host

    if not cfg.gpu.several_hosts:
        return [(None, flow_host(cfg, attempt))]
    return list(_answering(cfg, flow_gpu_hosts(cfg, attempt), logger))
