"""Running one stage's command on the GPU host and judging how it went.

A non-zero exit, a failure pattern in the output, or a missing success line is
a failed stage — never reported as success. The stage's whole output is kept
as a file in the case's results folder; the Prefect run log gets it line by
line while it runs (unless ``logging.stream_command_output`` is off).
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import get_run_logger

from blocks.errors import CommandError, CommandTimeoutError
from blocks.host import Host
from blocks.results import CommandResult
from config import MqiConfig
from flows.layout import RemoteLayout, results_dir
from flows.outcomes import StageFailed
from flows.reporting import StageLog

LineCallback = Callable[[str, str], None]
Verdict = Callable[[CommandResult], str | None]
"""Why a command that exited 0 still failed, or None when it succeeded."""


def run_remote(host: Host, cfg: MqiConfig, layout: RemoteLayout, step: str, command: str, *,
               beam: int | None = None, env: dict[str, str] | None = None,
               stdin: bytes | None = None, on_line: LineCallback | None = None,
               verdict: Verdict | None = None) -> CommandResult:
    """Run one stage's command with its log streamed and kept, and judge the outcome.

    Raises:
        StageFailed: Timeout, non-zero exit, or ``verdict(result)`` gave a reason.
        HostError: The host could not be reached (the task's retries apply).
    """
    logger = get_run_logger()
    label = step if beam is None else f"{step} [beam {beam}]"
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
        result = host.run(command, timeout=cfg.policy(step).timeout_seconds, env=env,
                          stdin=stdin, check=False, on_line=line,
                          pid_file=layout.pid_file(step, beam))
    except CommandTimeoutError as exc:  # the process group was already killed
        raise StageFailed(step, f"timed out after {exc.timeout:g} s; its process group on "
                                f"{exc.result.host} was killed", beam=beam,
                          log_path=str(log.path), detail=exc.result.tail(12)) from None
    except CommandError as exc:
        raise StageFailed(step, str(exc).splitlines()[0], beam=beam, log_path=str(log.path),
                          detail=exc.result.tail(12)) from None
    finally:
        log.close()
    reason = f"exit code {result.exit_code}" if result.exit_code != 0 else \
        (verdict(result) if verdict is not None else None)
    if reason:
        raise StageFailed(step, f"{reason}: {telling_line(cfg, result)}", beam=beam,
                          exit_code=result.exit_code, log_path=str(log.path),
                          detail=result.tail(12))
    logger.info("%s: done in %.1f s", label, result.duration)
    return result


def telling_line(cfg: MqiConfig, result: CommandResult) -> str:
    """The output line that best says why a command failed (for one-line summaries)."""
    lines = [ln for ln in (result.stdout + "\n" + result.stderr).splitlines() if ln.strip()]
    for line in reversed(lines):
        if any(p in line for p in cfg.moqui.failure_patterns):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


def moqui_verdict(cfg: MqiConfig) -> Verdict:
    """MOQUI's own judgement: no failure pattern in the output, and the success line."""

    def judge(result: CommandResult) -> str | None:
        text = result.stdout + "\n" + result.stderr
        for pattern in cfg.moqui.failure_patterns:
            if pattern in text:
                return f"log contains {pattern!r}"
        if cfg.moqui.success_pattern not in result.stdout:
            return f"no {cfg.moqui.success_pattern!r} line"
        return None

    return judge
