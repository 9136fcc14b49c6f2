"""The ``mqi`` command line.

    mqi config check [PATH]        validate a configuration; print it resolved, secrets masked
    mqi up [--config PATH]         start the system on this machine and print the UI address
    mqi run CASE_DIR [--workflow W]   process one case in the foreground
    mqi status [--failed] [--json]    one line per case, from the Prefect API
    mqi rerun CASE_ID | --all-failed  run failed cases again; finished stages are not repeated

Exit status 0 means success; a configuration problem exits 2 with the file and
key path on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from config import ConfigError, MqiConfig, config_path, load_config
from deployments import server

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def masked_config(cfg: MqiConfig) -> dict[str, Any]:
    """The resolved configuration as plain data, safe to print.

    Secrets never live in the file, so there are none to print; what could carry
    one is masked (a password inside a URL), and each ``*_env`` key shows only
    whether its variable is set, never its value.
    """
    data = cfg.model_dump(mode="json")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
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


def cmd_config_check(args: argparse.Namespace) -> int:
    path = config_path(args.path)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    print(f"# {path.resolve()}: valid")
    print(yaml.safe_dump(masked_config(cfg), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    api = cfg.prefect.effective_api_url
    proc = None
    if cfg.prefect.api_url is not None:
        if not server.is_healthy(api):
            print(f"error: the Prefect API at {api} (prefect.api_url) is not reachable",
                  file=sys.stderr)
            return EXIT_RUNTIME
    elif server.is_healthy(api):
        print(f"error: a Prefect server already answers at {api}; stop it first, or set "
              f"prefect.api_url to use it", file=sys.stderr)
        return EXIT_RUNTIME
    else:
        log_file = Path(cfg.paths.data_dir) / "logs" / "server.log"
        print(f"starting the Prefect server at {api} (log: {log_file}) ...", flush=True)
        try:
            proc = server.start_server(cfg, log_file)
        except server.ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
    print(f"MQI Communicator is up. Dashboard: {server.ui_url(cfg)}", flush=True)
    stop = _wait_for_signal(proc)
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001 - a server that ignores SIGTERM gets SIGKILL
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if stop == "exited":
        print(f"error: the Prefect server exited with code {proc.returncode if proc else '?'}",
              file=sys.stderr)
        return EXIT_RUNTIME
    print("stopped.")
    return 0


def _load_for_work(path: str | None) -> MqiConfig:
    """Load the config and point this process (and the flows in it) at it and its API.

    Must run before Prefect is imported: Prefect reads its settings at import.
    """
    resolved = config_path(path).resolve()
    cfg = load_config(resolved)
    os.environ["MQI_CONFIG_PATH"] = str(resolved)
    api = cfg.prefect.effective_api_url
    if cfg.prefect.api_url is not None or server.is_healthy(api):
        if not server.is_healthy(api):
            raise server.ServerError(f"the Prefect API at {api} (prefect.api_url) is not "
                                     f"reachable")
        os.environ.update(server.client_env(cfg))
    else:
        # No server running: Prefect's in-process server on the same database, so
        # what this run records is there when `mqi up` starts.
        env = server.server_env(cfg)
        env.pop("PREFECT_API_URL")
        env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
        os.environ.pop("PREFECT_API_URL", None)
        os.environ.update(env)
        server.prefect_home(cfg).mkdir(parents=True, exist_ok=True)
        print(f"note: no Prefect server at {api}; using an in-process one on "
              f"{server.prefect_home(cfg)}", file=sys.stderr)
    return cfg


def _process(case_dir: str, workflow: str) -> bool:
    """Run process_case in this process; print the outcome; True when COMPLETED."""
    from flows.process_case import process_case

    state = process_case(case_dir=case_dir, workflow=workflow, return_state=True)
    name = Path(case_dir).name
    if state.is_completed():
        result = state.result()
        print(f"case {name}: COMPLETED — results in {result['results']} "
              f"(report: {result['report']})")
        return True
    print(f"case {name}: {state.type.value}: {state.message or ''}".rstrip(), file=sys.stderr)
    return False


def cmd_run(args: argparse.Namespace) -> int:
    try:
        _load_for_work(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except server.ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    case_dir = Path(args.case_dir)
    if not case_dir.is_dir():
        print(f"error: not a case folder: {case_dir}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0 if _process(str(case_dir.absolute()), args.workflow) else EXIT_RUNTIME


def cmd_status(args: argparse.Namespace) -> int:
    try:
        _load_for_work(args.config)
    except (ConfigError, server.ServerError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_RUNTIME
    from deployments.status import case_statuses, format_table

    rows = case_statuses(only_failed=args.failed)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(format_table(rows, only_failed=args.failed))
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    if not args.case_id and not args.all_failed:
        print("error: name a CASE_ID or give --all-failed", file=sys.stderr)
        return EXIT_CONFIG
    try:
        _load_for_work(args.config)
    except (ConfigError, server.ServerError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_RUNTIME
    from deployments.status import case_statuses

    rows = case_statuses()
    if args.all_failed:
        chosen = [r for r in rows if r.status in ("FAILED", "CRASHED", "CANCELLED")]
        if not chosen:
            print("no failed cases")
            return 0
    else:
        chosen = [r for r in rows if r.case_id == args.case_id]
        if not chosen:
            print(f"error: no run of case {args.case_id!r} is known", file=sys.stderr)
            return EXIT_RUNTIME
        if chosen[0].status == "COMPLETED" and not args.force:
            print(f"case {args.case_id} is already COMPLETED (use --force to run it again)")
            return 0
        if chosen[0].status == "QUEUED" or chosen[0].status.startswith("RUNNING"):
            print(f"error: case {args.case_id} is {chosen[0].status}; not starting a second "
                  f"run", file=sys.stderr)
            return EXIT_RUNTIME
    ok = True
    for row in chosen:
        if not row.case_dir or not Path(row.case_dir).is_dir():
            print(f"error: case {row.case_id}: its folder {row.case_dir} is gone",
                  file=sys.stderr)
            ok = False
            continue
        print(f"rerunning case {row.case_id} (was {row.status}); finished stages are reused")
        ok = _process(row.case_dir, args.workflow) and ok
    return 0 if ok else EXIT_RUNTIME


def _wait_for_signal(proc: Any) -> str:
    """Block until SIGINT/SIGTERM ("signal") or the server exits ("exited")."""
    received: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not received:
        if proc is not None and proc.poll() is not None:
            return "exited"
        time.sleep(0.2)
    return "signal"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqi", description="MQI Communicator: automated treatment verification with MOQUI.")
    sub = parser.add_subparsers(dest="command", required=True)

    config_p = sub.add_parser("config", help="work with the configuration file")
    config_sub = config_p.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate a configuration and print it resolved, with secrets masked")
    check.add_argument("path", nargs="?", help="the file (default: $MQI_CONFIG_PATH or the "
                                                "bundled config.default.yaml)")
    check.set_defaults(func=cmd_config_check)

    up = sub.add_parser("up", help="start the system on this machine")
    up.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    up.set_defaults(func=cmd_up)

    run = sub.add_parser("run", help="process one case in the foreground; exit 0 only when it "
                                     "COMPLETED")
    run.add_argument("case_dir", help="the case folder (its name is the case id)")
    run.add_argument("--workflow", default="default_qa")
    run.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="one line per case from the Prefect API")
    status.add_argument("--failed", action="store_true", help="only failed cases")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    status.set_defaults(func=cmd_status)

    rerun = sub.add_parser("rerun", help="run a failed case again; stages that completed for "
                                         "the same inputs are not repeated")
    rerun.add_argument("case_id", nargs="?")
    rerun.add_argument("--all-failed", action="store_true")
    rerun.add_argument("--force", action="store_true", help="also rerun a COMPLETED case")
    rerun.add_argument("--workflow", default="default_qa")
    rerun.add_argument("--config", help="configuration file (default: $MQI_CONFIG_PATH)")
    rerun.set_defaults(func=cmd_rerun)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
