"""The sensor's idle CPU while waiting folders sit in the scan root.

Three real sensors (inotify observer, default tick, no Prefect: a start would be
a bug and fails the bench) run side by side in one process, each on its own scan
root, and are measured over the same window, thread by thread (the sensor's loop
and its observer's threads), so that the load of a shared machine weighs on all
three alike:

- baseline: an empty scan root;
- in place: ``--folders`` cases of realistic shape (3 beams x 30 layers, about 190
  files each) written where they lie, each missing one ``.ptn`` that its
  PlanRange.txt names, so each is judged "waiting" and must not be inspected
  again while nothing changes;
- moved in: the same kind of folders moved into the scan root while the sensor
  watches, the usual delivery of a finished copy. watchdog adds no watch inside
  them; the sensor adds its own (deployments/sensor.py watch_moved_in), and where
  it cannot, compares their listings (stats, no reads) once a stability window.

Figures are % of one core (goal: each waiting figure under 1 %). For scale, the
cost of inspecting every waiting folder at each tick, as the sensor did before
it kept its verdicts, is measured too.

    .venv/bin/python -m bench.sensor_idle [--folders 10] [--seconds 20] [--stability S]

``--stability`` is ``scanner.stability_seconds`` (default: the default config's),
which is also how often a moved-in folder's listing is compared: a short one
shows the worst case.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import yaml

from config import DEFAULT_PATH
from config.loader import parse_config
from demo.synthetic_case import write_case
from deployments.sensor import CaseSensor
from flows.case_inspection import CaseIncomplete, inspect_case

TICK = 0.25  # CaseSensor.run's default


def _never_start(case_dir: str, case_id: str, key: str) -> str:
    raise AssertionError(f"the bench's cases are incomplete, yet {case_id} was started")


class Watching:
    """One sensor running in a thread, as ``python -m deployments.sensor`` runs it."""

    def __init__(self, root: Path, stability: float) -> None:
        data = yaml.safe_load(DEFAULT_PATH.read_text())
        data["scanner"].update({"target_directory": str(root), "stability_seconds": stability})
        data["paths"]["data_dir"] = str(root.parent / "data")  # the sensor's ledger
        self.sensor = CaseSensor(parse_config(data, root.parent / "mqi.yaml"),
                                 start=_never_start)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=contextvars.copy_context().run,
                                       args=(self._run,), daemon=True)

    def _run(self) -> None:
        try:
            self.sensor.run(self.stop, tick=TICK)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.errors.append(exc)

    def check(self) -> None:
        if self.errors:
            raise SystemExit(f"a sensor failed: {self.errors[0]!r}")

    def judged(self, names: list[str]) -> bool:
        self.check()
        return all((c := self.sensor.candidates.get(n)) and c.verdict for n in names)

    def states(self, names: list[str]) -> set[str]:
        return {c.verdict.state for n in names
                if (c := self.sensor.candidates.get(n)) and c.verdict}

    def thread_ids(self) -> list[int]:
        """The sensor's loop and its observer's threads (the observer and its emitter)."""
        observer = self.sensor._observer
        threads: list[threading.Thread] = [self.thread]
        if observer is not None:
            threads += [observer, *observer.emitters]
        return [t.native_id for t in threads if t.native_id is not None]


def cpu_ns(thread_ids: list[int]) -> int:
    """Nanoseconds these threads of this process have run (the scheduler's own count)."""
    total = 0
    for tid in thread_ids:
        with contextlib.suppress(FileNotFoundError):
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
    return total


def inspect_every_tick(root: Path, names: list[str], rounds: int = 20) -> float:
    """% of a core that inspecting every folder at each tick would take."""
    pattern = parse_config(yaml.safe_load(DEFAULT_PATH.read_text()), DEFAULT_PATH) \
        .cases.id_pattern
    cpu = time.process_time()
    for _ in range(rounds):
        for name in names:
            with contextlib.suppress(CaseIncomplete):
                inspect_case(root / name, id_pattern=pattern, scan_root=root)
    return 100 * (time.process_time() - cpu) / rounds / TICK


def write_waiting(root: Path, names: list[str]) -> int:
    """Waiting cases written an hour ago (settled at the first look); the file count."""
    files = 0
    for i, name in enumerate(names):
        case = write_case(root, name, beams=3, layers=30, spots_per_layer=400, seed=i,
                          broken="missing_ptn")
        for path in case.rglob("*"):
            if path.is_file():
                os.utime(path, (time.time() - 3600,) * 2)
                files += 1
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--stability", type=float, default=None,
                        help="scanner.stability_seconds (default: the default config's)")
    args = parser.parse_args(argv)
    stability = args.stability if args.stability is not None else \
        yaml.safe_load(DEFAULT_PATH.read_text())["scanner"]["stability_seconds"]
    logging.basicConfig(level=logging.ERROR)
    names = [f"waiting-{i:02d}" for i in range(args.folders)]
    with tempfile.TemporaryDirectory(prefix="mqi-bench-sensor-") as tmp:
        work = Path(tmp)
        roots = {label: work / label for label in ("baseline", "in place", "moved in")}
        for root in roots.values():
            root.mkdir()
        files = write_waiting(roots["in place"], names)
        write_waiting(work / "staging", names)
        sensors = {label: Watching(root, stability) for label, root in roots.items()}
        for watching in sensors.values():
            watching.thread.start()
        try:
            time.sleep(1.0)  # all watching
            for name in names:  # delivered while watched
                os.replace(work / "staging" / name, roots["moved in"] / name)
            deadline = time.monotonic() + stability + 60
            while not (sensors["in place"].judged(names) and sensors["moved in"].judged(names)):
                if time.monotonic() > deadline:
                    raise SystemExit("the folders were not all judged in time")
                time.sleep(0.1)
            for label in ("in place", "moved in"):
                if sensors[label].states(names) != {"waiting"}:
                    raise SystemExit(f"{label}: expected every folder waiting, got "
                                     f"{sensors[label].states(names)}")
            ids = {label: w.thread_ids() for label, w in sensors.items()}
            before = {label: cpu_ns(t) for label, t in ids.items()}
            wall = time.monotonic()
            time.sleep(args.seconds)
            wall = time.monotonic() - wall
            used = {label: 100 * (cpu_ns(ids[label]) - before[label]) / 1e9 / wall
                    for label in ids}
            for watching in sensors.values():
                watching.check()
        finally:
            for watching in sensors.values():
                watching.stop.set()
            for watching in sensors.values():
                watching.thread.join(20)
        every_tick = inspect_every_tick(roots["in place"], names)

    print(f"sensor idle CPU over {args.seconds:g} s, three sensors side by side (stability "
          f"{stability:g} s, tick {TICK:g} s; {args.folders} waiting folders, {files} files)")
    base = used["baseline"]
    print(f"  baseline, empty scan root:  {base:5.2f} % of a core")
    for label in ("in place", "moved in"):
        print(f"  {label + ':':<27} {used[label]:5.2f} % of a core "
              f"({used[label] - base:+.2f} over the baseline; goal < 1 %)")
    worst = max(used["in place"], used["moved in"])
    print(f"  for scale, inspecting each at every tick: {every_tick:.1f} % of a core "
          f"({every_tick / max(worst, 0.01):.0f}x the larger waiting figure)")
    return 0 if worst < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
