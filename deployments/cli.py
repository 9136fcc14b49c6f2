"""The ``mqi`` command line.

    mqi config check [PATH]   validate a configuration and print it resolved, secrets masked
    mqi up [--config PATH]    start the system on this machine and print the UI address

Exit status 0 means success; a configuration problem exits 2 with the file and
key path on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
