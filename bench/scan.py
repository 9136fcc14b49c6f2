"""A restarted sensor over a scan root full of processed cases: what does it cost?

The scan root holds ``--folders`` processed cases of realistic shape (one case
written by the demo's ``write_case`` with 3 beams x 35 layers — about 215 files
in 4 folders — and hard-linked into every other folder: same shape, no
disk to fill), and the sensor's ledger says each was started, as a sensor that
ran before would have left it. Then a new sensor starts (inotify observer, no
Prefect: a start would be a bug and fails the bench), and the bench prints

- time from start to watching (observer running, the catch-up scan done: every
  folder's directories compared with the ledger): goal <= 5 s;
- time until every file of every folder has been compared too (stats, no read:
  what finds a file rewritten in place while no sensor ran), a few folders a
  tick in the background;
- bytes read by the process meanwhile (``rchar`` of /proc/self/io: every read()
  — the ledger's SQLite pages included, printed beside it): goal, nothing but
  the ledger;
- the cost of one later rescan (directories alone) and the sensor's idle CPU;
- the baseline, measured in the same run on a sample: what the same restart
  cost before the ledger (every folder inspected and hashed), extrapolated.

    .venv/bin/python -m bench.scan [--folders 10000] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.sensor_idle import cpu_ns
from config import DEFAULT_PATH
from config.loader import parse_config
from demo.synthetic_case import write_case
from deployments.intake_ledger import IntakeEntry, IntakeLedger, IntakeState, ledger_path
from deployments.sensor import CaseSensor
from flows.case_inspection import content_digest, content_signature, folder_shape, inspect_case


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _never_start(case_dir: str, case_id: str, key: str) -> str:
    raise AssertionError(f"{case_id} was processed already, yet it was started again")


def populate(root: Path, folders: int) -> tuple[list[str], int]:
    """``folders`` processed cases, hard links of one realistic case; their names and
    the files of one."""
    # ~300 KB spot logs: ~34 MB a case, like a clinical one (the baseline hashes it)
    template = write_case(root.parent / "template", "template", beams=3, layers=35,
                          spots_per_layer=20_000, seed=1)
    files = [p.relative_to(template) for p in template.rglob("*") if p.is_file()]
    dirs = sorted({p.parent for p in files if p.parent != Path()})
    names = [f"case-{i:05d}" for i in range(folders)]
    for name in names:
        for d in dirs:
            (root / name / d).mkdir(parents=True, exist_ok=True)
        for rel in files:
            os.link(template / rel, root / name / rel)
    return names, len(files)


def write_ledger(cfg: object, root: Path, names: list[str]) -> Path:
    """What a sensor that started every folder leaves: STARTED, signature, shape, key."""
    path = ledger_path(cfg)  # type: ignore[arg-type]
    ledger = IntakeLedger(path)
    ledger._db.execute("BEGIN")
    for name in names:
        sig = content_signature(root / name, set())
        ledger.put(IntakeEntry(name, IntakeState.STARTED, listing=sig.listing,
                               shape=folder_shape(root / name), run_key=f"{name}:0",
                               flow_run_id="00000000-0000-0000-0000-000000000000",
                               since=time.time()))
    ledger._db.execute("COMMIT")
    ledger.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--sample", type=int, default=10,
                        help="folders the baseline inspects and hashes (then extrapolated)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="mqi-bench-scan-"))
    try:
        root = work / "scan"
        root.mkdir()
        data = yaml.safe_load(DEFAULT_PATH.read_text())
        data["scanner"]["target_directory"] = str(root)
        data["paths"]["data_dir"] = str(work / "data")
        cfg = parse_config(data, work / "mqi.yaml")
        made = time.perf_counter()
        names, per_case = populate(root, args.folders)
        print(f"scan root: {len(names)} processed folders x {per_case} files "
              f"({len(names) * per_case} files), made in {time.perf_counter() - made:.1f} s")
        ledger = write_ledger(cfg, root, names)
        print(f"ledger: {ledger.stat().st_size / 1e6:.1f} MB")

        # ------------------------------------------------------------ the restart
        stop = threading.Event()
        watching = threading.Event()
        errors: list[BaseException] = []
        read_before = rchar()
        started = time.perf_counter()
        sensor = CaseSensor(cfg, start=_never_start)

        def run() -> None:
            try:
                sensor.run(stop, ready=watching.set)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                watching.set()

        thread = threading.Thread(target=contextvars.copy_context().run, args=(run,),
                                  daemon=True)
        thread.start()
        watching.wait(600)
        to_watching = time.perf_counter() - started
        while (sensor.candidates or not sensor._caught_up) and not errors \
                and time.perf_counter() - started < 1200:
            time.sleep(0.05)
        caught_up = time.perf_counter() - started
        read = rchar() - read_before
        while (sensor._unverified or sensor.candidates) and not errors \
                and time.perf_counter() - started < 1800:
            time.sleep(0.05)
        verified = time.perf_counter() - started
        read_verified = rchar() - read_before
        if errors:
            raise SystemExit(f"the sensor failed: {errors[0]!r}")

        # ------------------------------------------------- a later rescan, and idle
        tids = [t for t in (thread.native_id,) if t is not None]
        cpu = cpu_ns(tids)
        rescan_started = time.perf_counter()
        sensor._last_rescan = float("-inf")  # the next step rescans
        sensor._wake.set()
        time.sleep(0.3)
        while sensor.candidates and time.perf_counter() - rescan_started < 600:
            time.sleep(0.05)
        rescan_s = time.perf_counter() - rescan_started
        rescan_cpu_s = (cpu_ns(tids) - cpu) / 1e9
        idle_from = cpu_ns(tids)
        time.sleep(args.idle_seconds)
        idle = 100 * (cpu_ns(tids) - idle_from) / 1e9 / args.idle_seconds
        stop.set()
        thread.join(30)
        if errors:
            raise SystemExit(f"the sensor failed: {errors[0]!r}")

        # ------------------------------------------------ baseline: before the ledger
        sample = names[:args.sample]
        base_read = rchar()
        base_started = time.perf_counter()
        for name in sample:
            inspect_case(root / name, id_pattern=cfg.cases.id_pattern, scan_root=root)
            content_digest(root / name, set())
        per_folder = (time.perf_counter() - base_started) / len(sample)
        per_folder_read = (rchar() - base_read) / len(sample)

        print(f"start to watching:            {to_watching:8.2f} s   (goal <= 5 s)")
        print(f"catch-up (every folder's dirs):{caught_up:7.2f} s")
        print(f"bytes read meanwhile:         {read / 1e6:8.2f} MB  (the ledger is "
              f"{ledger.stat().st_size / 1e6:.2f} MB; scan root {len(names) * per_case} "
              f"files)")
        print(f"every file compared (stats, in the background): {verified:.1f} s after "
              f"start; bytes read by then {read_verified / 1e6:.2f} MB")
        print(f"a later rescan (directories): {rescan_s:8.2f} s   wall, "
              f"{rescan_cpu_s:.2f} s CPU; every "
              f"{cfg.scanner.rescan_interval_seconds:g} s = "
              f"{100 * rescan_cpu_s / cfg.scanner.rescan_interval_seconds:.2f} % of a core")
        print(f"idle CPU after catch-up:      {idle:8.2f} % of a core (goal < 1 %)")
        print(f"baseline (no ledger; inspect + hash each folder, {len(sample)} sampled): "
              f"{per_folder * 1000:.0f} ms and {per_folder_read / 1e6:.1f} MB a folder -> "
              f"{per_folder * len(names):.0f} s and {per_folder_read * len(names) / 1e9:.1f} GB "
              f"for {len(names)}")
        print(f"ratio, catch-up time baseline/now: {per_folder * len(names) / caught_up:.0f}x; "
              f"bytes read baseline/now: {per_folder_read * len(names) / max(read, 1):.0f}x")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
