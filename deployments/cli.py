"""The ``mqi`` command line: parsing, and one thin function per command.

    mqi config check [PATH]        validate a configuration; print it resolved, secrets masked
    mqi up [--config PATH]         start the system on this machine and print the UI address
    mqi demo [--once]              the system on the demo profile, with one synthetic case
    mqi run CASE_DIR [--workflow W]   process one case in the foreground
    mqi status [--failed] [--json] [--all-gpus]   one line per case (runs and the sensor's
                                   intake states), from the Prefect API and the ledger
    mqi rerun CASE_ID | --all-failed  retry failed runs on serve/workers; finished stages reused
    mqi logs CASE_ID [--step S] [--beam N]   a case's stage logs, patient ids redacted
    mqi deploy [--config PATH]     publish the blocks, create the work pool, deploy for workers
    mqi doctor [--config PATH]     check that everything a case needs is there and answers
    mqi archive [--dry-run] [--case ID]   archive finished cases now, in the foreground
    mqi gpus [--json]              the GPU pool now: one line a GPU, who holds it, usable or why not

Exit status 0 means success. Every expected failure is an ``MqiError``: its
message goes to stderr as ``mqi: <message>`` and its ``exit_status`` is the exit
status (2 for a configuration problem, which names the file and key path), never
a traceback. Which configuration file and Prefect API a command uses is said once,
as the first line on stderr (``-v``/``--verbose`` adds mqi's own log lines after it).

Nothing here imports Prefect at module level: Prefect reads its settings at
import, and the commands set the API address first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from config import DEFAULT_PATH, DEMO_PATH, ENV_VAR, MqiConfig, MqiError, load_config
from deployments import server


def masked_config(cfg: MqiConfig) -> dict[str, Any]:
    """The resolved configuration as plain data, safe to print.

    Secrets never live in the file, so there are none to print; what could carry
    one is masked (a password inside a URL), and each ``*_env`` key shows only
    whether its variable is set, never its value.
    """
    data = cfg.model_dump(mode="json")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if isinstance(key, str) and key.endswith("_env") and value:
                    state = "set" if os.environ.get(value) else "not set"
                    out[key] = f"{value} ({state})"
                elif isinstance(key, str) and key.endswith("_url") and isinstance(value, str):
                    out[key] = server.mask_url(value)
                else:
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(data)


def config_file(given: str | None, *, flag: str = "--config",
                default: Path | None = None) -> Path:
    """The configuration file a command uses, said once on stderr with where it came from
    and the Prefect API it names: the first line of what every command says there, its
    errors included, so that no command looks at another installation unnoticed.

    ``given`` (named ``flag`` in the message) wins; then the command's own
    ``default`` (``mqi demo``'s profile); then ``$MQI_CONFIG_PATH``; then the
    bundled config.default.yaml.
    """
    if given is not None:
        path, source = Path(given), flag
    elif default is None and os.environ.get(ENV_VAR):
        path, source = Path(os.environ[ENV_VAR]), f"from {ENV_VAR}"
    else:
        path, source = default or DEFAULT_PATH, "default"
    path = path.resolve()
    print(f"mqi: config {path} ({source}); {api_of(path)}", file=sys.stderr, flush=True)
    return path


def api_of(path: Path) -> str:
    """``Prefect API <url>`` as the configuration at ``path`` names it (the command then
    loads it again, and says what is wrong with it when it is not valid)."""
    try:
        return f"Prefect API {load_config(path).prefect.effective_api_url}"
    except MqiError:
        return "Prefect API unknown (the configuration is not valid)"


def cmd_config_check(args: argparse.Namespace) -> int:
    path = config_file(args.path, flag="argument")
    cfg = load_config(path)
    print(f"# {path}: valid")
    print(yaml.safe_dump(masked_config(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from deployments.up import run_system

    path = config_file(args.config)
    cfg = load_config(path)
    if args.only:
        # e.g. the sensor alone, on the machine that sees the scan root, beside workers
        cfg = cfg.model_copy(update={"processes": cfg.processes.model_copy(
            update={"start": list(dict.fromkeys(args.only))})})
    run_system(cfg, path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deployments.demo import run_demo

    path = config_file(args.config, default=DEMO_PATH)
    run_demo(load_config(path), path, once=args.once, timeout=args.timeout)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from deployments.foreground import run_case, use_config

    use_config(config_file(args.config))
    run_case(Path(args.case_dir), args.workflow, debug=args.debug)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deployments.foreground import use_config

    cfg = use_config(config_file(args.config))
    from deployments.intake_ledger import ledger_path
    from deployments.status import COMPLETED_GPUS, case_statuses, format_table

    # the sensor's ledger: folders not started (yet) are listed beside the runs
    rows = case_statuses(only_failed=args.failed, ledger=ledger_path(cfg),
                         completed_gpus=None if args.all_gpus else COMPLETED_GPUS)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows, only_failed=args.failed))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from deployments.foreground import use_config
    from deployments.logs_cli import case_logs

    cfg = use_config(config_file(args.config))
    for line in case_logs(cfg, args.case_id, args.step, args.beam):
        print(line)
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from deployments.foreground import chosen_for_rerun, rerun, use_config

    # The CLI never runs the case itself: serve or a worker must be there to take it.
    use_config(config_file(args.config), need_server="a rerun is handed to serve or a worker")
    rerun(chosen_for_rerun(None if args.all_failed else args.case_id, force=args.force),
          args.workflow, wait=not args.no_wait)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from deployments import server

    path = config_file(args.config)
    cfg = load_config(path)
    api = cfg.prefect.effective_api_url
    if not server.is_healthy(api):
        raise server.ServerError(f"the Prefect API at {api} does not answer: start it (or "
                                 f"`mqi up`), or set prefect.api_url")
    os.environ.update(server.client_env(cfg))  # before Prefect is imported
    from deployments.deploy import deploy

    for line in deploy(cfg, path):
        print(line)
    print("workers: PREFECT_API_URL=" + cfg.prefect.effective_api_url +
          " prefect worker start --pool mqi-process")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from deployments.doctor import diagnose

    return diagnose(load_config(config_file(args.config)))


def cmd_gpus(args: argparse.Namespace) -> int:
    path = config_file(args.config)
    cfg = load_config(path)
    # The API adds what the host alone cannot say (task runs, GPUs gone since the
    # curator's last look); without it the host is still read.
    answering = server.is_healthy(cfg.prefect.effective_api_url)
    if answering:
        os.environ.update(server.client_env(cfg))  # before Prefect is imported
    from flows.curator import gpus_now
    from flows.gpu_table import format_table

    rows, notes = gpus_now(cfg, with_api=answering)
    if args.json:
        print(json.dumps([r.as_record() for r in rows], indent=2))
    else:
        print(format_table(rows, notes))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from deployments.archive_cli import run_archiver
    from deployments.foreground import use_config

    use_config(config_file(args.config))
    for line in run_archiver(args.dry_run, args.case, debug=args.debug):
        print(line)
    return 0


def _config_option(default: str) -> argparse.ArgumentParser:
    """A parent parser: the ``--config`` option every command that loads one shares."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", metavar="PATH",
                        help=f"configuration file (default: {default})")
    return parent


def _workflow_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--workflow", default="default_qa", metavar="NAME",
                        help="the workflow (a key of `workflows` in the config; default: "
                             "%(default)s)")
    return parent


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
             func: Callable[[argparse.Namespace], int], text: str,
             *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand: ``text`` is its line in ``mqi --help`` and the top of its own help."""
    parser = sub.add_parser(name, parents=list(parents), help=text, description=text)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqi", description="MQI Communicator: automated treatment verification with MOQUI.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also say on stderr what mqi does (its INFO log lines); the "
                             "first line names the config file and the Prefect API")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of:")
    config = _config_option(f"${ENV_VAR}, else the bundled config.default.yaml")
    workflow = _workflow_option()

    config_sub = sub.add_parser("config", help="work with the configuration file") \
        .add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND",
                        help="one of:")
    check = _command(config_sub, "check", cmd_config_check,
                     "validate a configuration and print it resolved, with secrets masked")
    check.add_argument("path", nargs="?", help=f"the file (default: ${ENV_VAR}, else the "
                                               f"bundled config.default.yaml)")

    up = _command(sub, "up", cmd_up, "start the system on this machine: server, serve and "
                  "sensor, supervised until Ctrl+C", config)
    up.add_argument("--only", action="append", choices=["server", "serve", "sensor"],
                    help="start only this part (repeatable); default: processes.start")

    demo = _command(sub, "demo", cmd_demo, "start the system on the demo profile, process one "
                    "synthetic case, and keep running",
                    _config_option("the bundled demo profile"))
    demo.add_argument("--once", action="store_true",
                      help="stop after the demo case; exit 0 only if it COMPLETED")
    demo.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                      help="seconds to wait for the demo case (default: %(default)g)")

    run = _command(sub, "run", cmd_run, "process one case in the foreground; exit 0 only when "
                   "it COMPLETED", config, workflow)
    run.add_argument("case_dir", help="the case folder (its name is the case id)")
    run.add_argument("--debug", action="store_true",
                     help="show Python tracebacks in the terminal (the run log always has them)")

    status = _command(sub, "status", cmd_status, "one line per case from the Prefect API, "
                      "and per folder the sensor has not started", config)
    status.add_argument("--failed", action="store_true",
                        help="only failed cases and refused folders")
    status.add_argument("--all-gpus", action="store_true",
                        help="read the GPUs of every COMPLETED case, not only of the "
                             "newest (slower)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    logs = _command(sub, "logs", cmd_logs, "print a case's stage logs (from its results "
                    "folder, else from the Prefect API), patient ids redacted", config)
    logs.add_argument("case_id", help="the case")
    logs.add_argument("--step", metavar="STEP",
                      help="only this stage (run_interpreter, run_moqui_sim, ...)")
    logs.add_argument("--beam", type=int, metavar="N", help="only this beam's logs")

    rerun = _command(sub, "rerun", cmd_rerun, "run a failed case again; stages that completed "
                     "for the same inputs are not repeated", config, workflow)
    which = rerun.add_mutually_exclusive_group(required=True)
    which.add_argument("case_id", nargs="?", help="the case to run again")
    which.add_argument("--all-failed", action="store_true",
                       help="every case whose newest run FAILED, CRASHED or was CANCELLED")
    rerun.add_argument("--force", action="store_true", help="also rerun a COMPLETED case")
    rerun.add_argument("--no-wait", action="store_true",
                       help="return once the runs are scheduled instead of following them")
    _command(sub, "deploy", cmd_deploy, "for workers: publish the configuration, host and "
             "result-storage blocks, create the work pool and deploy every deployment on it",
             config)
    gpus = _command(sub, "gpus", cmd_gpus, "the GPU pool now, one line a GPU: memory, "
                    "load, temperature, processes, which case and beam hold it, whether it "
                    "is usable (the curator's gpu-pool table)", config)
    gpus.add_argument("--json", action="store_true", help="machine-readable output")
    _command(sub, "doctor", cmd_doctor, "check the key, host key, SSH login, tools, remote "
             "work root, GPUs, local folders and Prefect API of a configuration", config)
    archive = _command(sub, "archive", cmd_archive, "archive finished cases now, as the "
                       "scheduled archiver does: one verified archive per case, then the "
                       "originals deleted", config)
    archive.add_argument("--dry-run", action="store_true",
                         help="only list what would be done (case, age, sizes, what would be "
                              "deleted); change nothing")
    archive.add_argument("--case", metavar="ID",
                         help="only this case (and say why, when it is not due)")
    archive.add_argument("--debug", action="store_true",
                         help="show Python tracebacks in the terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mqi: %(name)s: %(message)s"))
        mqi_logs = logging.getLogger("mqi")
        mqi_logs.addHandler(handler)
        mqi_logs.setLevel(logging.INFO)
        mqi_logs.propagate = False  # once, even where a command configures the root logger
    try:
        return int(args.func(args))
    except MqiError as exc:
        print(f"mqi: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
