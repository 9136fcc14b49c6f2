"""The ``mqi`` command line.

    mqi config check [PATH]        validate a configuration; print it resolved, secrets masked
    mqi up [--config PATH]         start the system on this machine and print the UI address
    mqi demo [--once]              the system on the demo profile, with one synthetic case
    mqi run CASE_DIR [--workflow W]   process one case in the foreground
    mqi status [--failed] [--json]    one line per case, from the Prefect API
    mqi rerun CASE_ID | --all-failed  run failed cases again; finished stages are not repeated

Exit status 0 means success; a configuration problem exits 2 with the file and
key path on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from config import DEMO_PATH, ConfigError, MqiConfig, config_path, load_config
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
    config_file = config_path(args.config).resolve()
    return _run_system(cfg, config_file, on_up=None)


def _run_system(cfg: MqiConfig, config_file: Path, on_up: Any) -> int:
    """Bring everything up, call ``on_up(stop_requested)`` once it is, supervise until a
    signal (or ``on_up`` returning True), then stop everything."""
    from deployments.supervisor import ChildFailed
    from deployments.up import AlreadyRunning, bring_up, take_instance_lock

    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call is noise
    try:
        lock = take_instance_lock(cfg)
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    api = cfg.prefect.effective_api_url
    if cfg.prefect.api_url is not None and not server.is_healthy(api):
        print(f"error: the Prefect API at {api} (prefect.api_url) is not reachable",
              file=sys.stderr)
        return EXIT_RUNTIME
    if cfg.prefect.api_url is None and server.is_healthy(api):
        print(f"error: a Prefect server already answers at {api}; stop it first, or set "
              f"prefect.api_url to use it", file=sys.stderr)
        return EXIT_RUNTIME
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    print(f"starting MQI Communicator (config {config_file}, data {cfg.paths.data_dir}) ...",
          flush=True)
    try:
        supervisor = bring_up(cfg, config_file)
    except (ChildFailed, server.ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
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
        lock.close()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return EXIT_RUNTIME
    print("stopped.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    path = args.config or str(DEMO_PATH)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    config_file = Path(path).resolve()
    scan_root = Path(cfg.scanner.target_directory)
    outcome: dict[str, bool] = {}

    def drop_case_and_wait(stopping: Any) -> bool:
        from demo.synthetic_case import write_case
        from deployments.status import case_statuses

        scan_root.mkdir(parents=True, exist_ok=True)
        case_id = time.strftime("DEMO-%Y%m%d-%H%M%S")
        staging = scan_root.parent / ".demo-staging"
        case = write_case(staging, case_id, beams=3, layers=4)
        os.replace(case, scan_root / case_id)  # appears complete, in one step
        (scan_root / case_id / cfg.scanner.ready_marker).write_text("")
        print(f"dropped a synthetic 3-beam case (SIMULATED): {scan_root / case_id}", flush=True)
        deadline = time.monotonic() + args.timeout
        row = None
        while time.monotonic() < deadline and not stopping():
            rows = [r for r in case_statuses() if r.case_id == case_id]
            row = rows[0] if rows else None
            if row and row.status in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        if row is None or row.status != "COMPLETED":
            print(f"demo case {case_id}: {row.status if row else 'never started'} "
                  f"{(row.reason or '') if row else ''}", file=sys.stderr)
            outcome["ok"] = False
            return args.once
        results = Path(cfg.paths.results_root) / case_id
        print(f"demo case {case_id}: COMPLETED in {row.duration_s} s (SIMULATED)")
        for dose in sorted(results.glob("dicom/*/*.dcm")):
            print(f"  RT Dose: {dose}")
        print(f"  report:  {results / 'report.md'}")
        print(f"Dashboard: {server.ui_url(cfg)}", flush=True)
        outcome["ok"] = True
        return args.once

    code = _run_system(cfg, config_file, on_up=drop_case_and_wait)
    if code == 0 and args.once and not outcome.get("ok"):
        return EXIT_RUNTIME
    return code


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


def _prepare_work(path: str | None) -> int | None:
    """``_load_for_work`` for a command: None when ready, else the exit status (said why)."""
    try:
        _load_for_work(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except server.ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return None


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
    failed = _prepare_work(args.config)
    if failed is not None:
        return failed
    case_dir = Path(args.case_dir)
    if not case_dir.is_dir():
        print(f"error: not a case folder: {case_dir}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0 if _process(str(case_dir.absolute()), args.workflow) else EXIT_RUNTIME


def cmd_status(args: argparse.Namespace) -> int:
    failed = _prepare_work(args.config)
    if failed is not None:
        return failed
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
    failed = _prepare_work(args.config)
    if failed is not None:
        return failed
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

    demo = sub.add_parser("demo", help="start the system on the demo profile, process one "
                                       "synthetic case, and keep running")
    demo.add_argument("--once", action="store_true",
                      help="stop after the demo case; exit 0 only if it COMPLETED")
    demo.add_argument("--timeout", type=float, default=600,
                      help="seconds to wait for the demo case")
    demo.add_argument("--config", help="configuration file (default: the demo profile)")
    demo.set_defaults(func=cmd_demo)

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
