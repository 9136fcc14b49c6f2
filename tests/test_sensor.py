"""The sensor against a real Prefect server: runs are created through the real
deployment (nothing serves it here, so runs stay Scheduled and can be counted),
and bad input never crashes it."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from config import DEFAULT_PATH
from config.loader import parse_config
from demo.synthetic_case import write_case
from deployments.sensor import CaseSensor
from flows.case_inspection import content_digest, read_plan_info
from flows.naming import run_name
from tests.support.pipeline import REPO, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def api(prefect_api: str) -> str:
    return prefect_api


def sensor_config(root: Path, **scanner):
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["scanner"].update({"target_directory": str(root), "stability_seconds": 1.0, **scanner})
    data["paths"]["data_dir"] = str(root.parent / "data")  # the sensor's ledger is here
    return parse_config(data, root.parent / "mqi.yaml")


def runs_of(case_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name(case_id)])))


class Running:
    """A sensor running in a thread, as `python -m deployments.sensor` runs it."""

    def __init__(self, cfg) -> None:
        import contextvars

        self.sensor = CaseSensor(cfg)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._run,), daemon=True)

    def _run(self) -> None:
        try:
            self.sensor.run(self.stop, tick=0.1)
        except BaseException as exc:  # noqa: BLE001 - the test asserts there is none
            self.errors.append(exc)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive() and not self.errors, self.errors


def finish(run_id) -> None:
    """End a run as a worker would have: the case has no active run any more."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Completed(), force=True)


def drop(root: Path, staging: Path, case_id: str, marker: bool = True, **kw) -> Path:
    case = write_case(staging, case_id, beams=1, layers=1, spots_per_layer=10, **kw)
    os.replace(case, root / case_id)
    if marker:
        (root / case_id / "_CASE_READY").write_text("")
    return root / case_id


def test_missing_scan_root_is_waited_for_not_fatal(api, tmp_path, caplog):
    root = tmp_path / "not-yet"
    with caplog.at_level(logging.ERROR, logger="mqi.sensor"), Running(sensor_config(root)):
        time.sleep(0.5)
        assert any("does not exist or is not readable" in r.message for r in caplog.records)
        root.mkdir()
        time.sleep(0.3)
        drop(root, tmp_path / "staging", "late-root")
        wait_for(lambda: runs_of("late-root"), 10, "the case after the root appeared")
    assert sum("does not exist" in r.message for r in caplog.records) == 1  # said once


def test_two_sensors_duplicate_events_and_restart_make_one_run(api, tmp_path):
    root = tmp_path / "scan"
    root.mkdir()
    cfg = sensor_config(root)
    with Running(cfg), Running(cfg):
        case = drop(root, tmp_path / "staging", "dup-case")
        wait_for(lambda: runs_of("dup-case"), 10, "the run")
        for path in list(case.rglob("*.ptn")):
            path.write_bytes(path.read_bytes())  # same content again: duplicate events
        time.sleep(1.5)
    with Running(cfg):  # a restarted sensor's catch-up scan
        time.sleep(1.5)
    assert len(runs_of("dup-case")) == 1
    # changed content (a re-delivered beam) is a new run, once the first has ended
    # (nothing serves the deployment here: the first run stays Scheduled until told)
    ptn = next(case.rglob("*.ptn"))
    ptn.write_bytes(ptn.read_bytes()[::-1])
    with Running(cfg) as sensor:
        wait_for(lambda: sensor.sensor.intake["dup-case"].state == "QUEUED", 10,
                 "the new content queued behind the active run")
        assert len(runs_of("dup-case")) == 1
        finish(runs_of("dup-case")[0].id)
        wait_for(lambda: len(runs_of("dup-case")) == 2, 10, "a run for the new content")
    newest = max(runs_of("dup-case"), key=lambda r: r.created)
    assert newest.idempotency_key == f"dup-case:{content_digest(case, {'_CASE_READY'})[:32]}"


def test_files_still_arriving_never_start_a_run(api, tmp_path):
    root = tmp_path / "scan"
    root.mkdir()
    staged = write_case(tmp_path / "staging", "arriving", beams=2, layers=2, seed=4)
    with Running(sensor_config(root, stability_seconds=1.5)):
        for path in sorted(staged.rglob("*")):
            target = root / "arriving" / path.relative_to(staged)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                time.sleep(0.2)
            assert runs_of("arriving") == []
        wait_for(lambda: runs_of("arriving"), 10, "the run once the files settle")


def test_bad_names_deleted_folders_and_a_thousand_folders_at_once(api, tmp_path, caplog):
    root = tmp_path / "scan"
    root.mkdir()
    staging = tmp_path / "staging"
    with caplog.at_level(logging.WARNING, logger="mqi.sensor"), \
            Running(sensor_config(root, incomplete_report_after_seconds=2.0)) as running:
        for name in ("with space", "ünïcødé", "$(touch pwned);x", "semi;colon"):
            folder = root / name
            folder.mkdir()
            (folder / "_CASE_READY").write_text("")
        gone = drop(root, staging, "vanishing", marker=False)
        shutil.rmtree(gone)  # deleted while watched
        for i in range(1000):  # a share re-mounted: a thousand folders appear at once
            (root / f"bulk-{i:04d}").mkdir()
            (root / f"bulk-{i:04d}" / "PlanInfo.txt").write_text("DICOM_BEAM_NUMBER,2\n")
        drop(root, staging, "real-one")
        wait_for(lambda: runs_of("real-one"), 30, "the complete case among a thousand")
        time.sleep(3)  # past incomplete_report_after_seconds
        assert running.thread.is_alive()
    refused = [r.message for r in caplog.records if "refused" in r.message]
    for name in ("with space", "ünïcødé", "$(touch pwned);x", "semi;colon"):
        assert sum(name in m for m in refused) == 1, (name, refused)
    assert not (root / "pwned").exists() and not Path("pwned").exists()
    # no plan can never start as it is: refused (and said once), not "incomplete"
    assert sum("bulk-0000" in m and "no RT Ion Plan" in m for m in refused) == 1, refused
    assert not [r for r in caplog.records if "still incomplete" in r.message]
    assert runs_of("vanishing") == [] and runs_of("bulk-0001") == []


def test_a_reader_does_not_hold_a_case_back(api, tmp_path):
    """Opening, reading and closing files (a viewer, a backup) is not activity: the run
    starts one stability window after the last write, while the reader still reads."""
    root = tmp_path / "scan"
    root.mkdir()
    stability = 1.0
    reads = 0
    stop = threading.Event()

    def read_all() -> None:
        nonlocal reads
        while not stop.is_set():
            for path in (root / "read-while-settling").rglob("*"):
                if path.is_file():
                    path.read_bytes()
                    reads += 1
            time.sleep(0.02)

    with Running(sensor_config(root, stability_seconds=stability)):
        time.sleep(0.5)  # watching
        # written in place, as a share writes: watchdog watches a folder moved in
        # without asking inotify for its reads, which would prove nothing here
        write_case(root, "read-while-settling", beams=2, layers=3, seed=6)
        last_write = time.time()
        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        try:
            runs = wait_for(lambda: runs_of("read-while-settling"), stability + 5,
                            "the run while a reader reads the case")
        finally:
            stop.set()
            reader.join(5)
    took = runs[0].created.timestamp() - last_write
    assert reads > 20, reads
    assert took < stability + 1.5, f"started {took:.2f} s after the last write"


def test_a_case_missing_a_file_its_planrange_names_waits_for_it(api, tmp_path, caplog):
    """Settled but missing a .ptn that PlanRange.txt names: no run, said once (without
    the patient ids the file names carry), not inspected again while nothing changes;
    one run once the file arrives (the folder is moved in: the sensor watches inside
    it although watchdog does not, and the periodic rescan is far off)."""
    root = tmp_path / "scan"
    root.mkdir()
    name = "waits-for-ptn"
    cfg = sensor_config(root, incomplete_report_after_seconds=2.0)
    assert cfg.scanner.rescan_interval_seconds >= 60
    with caplog.at_level(logging.INFO, logger="mqi.sensor"), Running(cfg) as running:
        time.sleep(0.5)  # watching
        staged = write_case(tmp_path / "staging", name, beams=2, layers=3, spots_per_layer=10,
                            broken="missing_ptn")
        os.replace(staged, root / name)
        case = root / name

        def verdict():
            cand = running.sensor.candidates.get(name)
            return cand and cand.verdict

        first = wait_for(verdict, 10, "the case to be judged")
        folder = sorted(p for p in case.iterdir() if p.is_dir())[0]
        assert (first.state, first.reason) == (
            "waiting", f"{folder.name}/PlanRange.txt row 2 (layer 2): the .ptn file it names "
                       f"is missing")
        time.sleep(2.5)  # past incomplete_report_after_seconds; ticks and listings go by
        assert verdict() is first  # the same listing: not judged again
        assert runs_of(name) == []

        layer_2 = (folder / "PlanRange.txt").read_text().splitlines()[2].split(",")
        (folder / layer_2[2]).write_bytes(bytes(16 * 10))  # the missing spot log arrives
        wait_for(lambda: runs_of(name), 10, "the run once the file arrived")
        time.sleep(1.5)  # events, ticks and rescans after the start
    assert len(runs_of(name)) == 1
    said = [r.getMessage() for r in caplog.records]
    incomplete = [m for m in said if "still waiting" in m]
    assert len(incomplete) == 1 and first.reason in incomplete[0], said
    ids = {v for k, v in read_plan_info(folder / "PlanInfo.txt").items()
           if k in ("DICOM_PATIENT_ID", "TCSC_PATIENT_ID")}
    assert len(ids) == 2 and not [m for m in said if any(i in m for i in ids)], said


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _drop_root_file_access() -> None:  # pragma: no cover - runs in the child before exec
    """Take from root the capabilities that let it read any file: after exec the
    process is root that permission bits apply to, as a clinic's service account is."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            os._exit(97)


def test_unreadable_root_and_file_are_reported_once_then_picked_up(api, tmp_path):
    """The real sensor process (`python -m deployments.sensor`), unable to read what
    permissions forbid: a scan root it may not list and a case with an unreadable file
    are each said once, never start a run and never stop the sensor; both are picked
    up once readable."""
    root = tmp_path / "scan"
    root.mkdir(mode=0)
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["scanner"].update({"target_directory": str(root), "stability_seconds": 1.0,
                            "rescan_interval_seconds": 1.0})
    data["paths"]["data_dir"] = str(tmp_path / "data")
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PREFECT_API_URL": api, "MQI_CONFIG_PATH": str(config),
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.Popen([sys.executable, "-m", "deployments.sensor"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_drop_root_file_access)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    said = lambda text: sum(text in line for line in list(lines))  # noqa: E731
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        cap_eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff:"))
                      .split()[1], 16)
        assert not cap_eff & (1 << CAP_DAC_OVERRIDE | 1 << CAP_DAC_READ_SEARCH), \
            "the sensor still bypasses file permissions; this test would prove nothing"

        wait_for(lambda: said("not readable"), 30, "the unreadable root to be reported")
        root.chmod(0o755)
        staged = write_case(tmp_path / "staging", "locked-case", beams=1, layers=1,
                            spots_per_layer=10)
        locked = next(staged.rglob("*.ptn"))
        locked.chmod(0)
        os.replace(staged, root / "locked-case")
        (root / "locked-case" / "_CASE_READY").write_text("")
        wait_for(lambda: said("cannot be read"), 30, "the unreadable file to be reported")
        time.sleep(2.5)  # ticks and rescans go by: still said once, still no run
        assert runs_of("locked-case") == []
        (root / "locked-case" / locked.relative_to(staged)).chmod(0o644)
        wait_for(lambda: runs_of("locked-case"), 30, "the run once the file is readable")
        assert proc.poll() is None, "".join(lines)
        assert said("not readable") == 1 and said("cannot be read") == 1, "".join(lines)
        assert said("Traceback") == 0, "".join(lines)
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, "".join(lines)


def test_every_broken_kind_is_said_at_once_with_its_reason_and_no_patient_id(api, tmp_path,
                                                                            caplog):
    """No marker, nothing else arriving: each broken folder is WAITING or REFUSED in the
    ledger (what `mqi status` shows) within the stability window + 2 s, with the
    reason inspection gives, said once in the log, and no patient id anywhere."""
    from demo.synthetic_case import BROKEN_KINDS, WAITING_KINDS
    from deployments.intake_ledger import IntakeLedger, ledger_path
    from tests.test_case_inspection import REASONS, patient_ids

    root = tmp_path / "scan"
    root.mkdir()
    cfg = sensor_config(root)
    ids: set[str] = set()
    with caplog.at_level(logging.INFO, logger="mqi.sensor"), Running(cfg):
        time.sleep(0.5)  # watching
        folders = {}
        for kind in BROKEN_KINDS:
            staged = write_case(tmp_path / "staging", f"broken-{kind}".replace("_", "-"),
                                spots_per_layer=10, broken=kind, seed=7)
            ids |= patient_ids(staged)
            os.replace(staged, root / staged.name)
            folders[kind] = staged.name
        dropped = time.monotonic()

        def judged():
            entries = IntakeLedger.read(ledger_path(cfg))
            states = {k: entries.get(name) for k, name in folders.items()}
            return states if all(e and e.state in ("WAITING", "REFUSED")
                                 for e in states.values()) else None

        states = wait_for(judged, cfg.scanner.stability_seconds + 2.0, "every verdict")
        took = time.monotonic() - dropped
        time.sleep(1.5)  # more ticks: nothing is said twice
    for kind, entry in states.items():
        assert entry.state == ("WAITING" if kind in WAITING_KINDS else "REFUSED"), (kind, entry)
        assert REASONS[kind] in entry.reason, (kind, entry.reason)
    assert took <= cfg.scanner.stability_seconds + 2.0
    said = [r.getMessage() for r in caplog.records]
    for name in folders.values():
        shown = name if name.isprintable() else repr(name)
        verdicts = [m for m in said if f"case folder {shown} " in m and
                    ("refused" in m or "waiting" in m)]
        assert len(verdicts) == 1, (name, verdicts)
    assert ids and not [m for m in said if any(i in m for i in ids)]
    ledger_text = ledger_path(cfg).read_bytes().decode(errors="replace")
    assert not [i for i in ids if i in ledger_text]
    assert runs_of(folders["missing_ptn"]) == []


def test_a_slow_writer_starts_the_case_once_when_it_is_complete(api, tmp_path):
    """Files copied one by one with gaps longer than the stability window: the case
    waits (a piece is missing) between them and starts exactly once, after the last."""
    root = tmp_path / "scan"
    root.mkdir()
    stability = 0.5
    staged = write_case(tmp_path / "staging", "slow-writer", beams=2, layers=2,
                        spots_per_layer=10, seed=5)
    # the plan first, then each beam's files: a treatment system's order
    files = sorted((p for p in staged.rglob("*") if p.is_file()),
                   key=lambda p: (p.parent != staged, str(p)))
    with Running(sensor_config(root, stability_seconds=stability)) as running:
        time.sleep(0.5)
        waiting_seen = set()
        for path in files:
            target = root / "slow-writer" / path.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            last_write = time.time()
            time.sleep(stability + 0.3)
            entry = running.sensor.intake.get("slow-writer")
            if entry is not None:
                waiting_seen.add(entry.state)
            if path != files[-1]:
                assert runs_of("slow-writer") == [], f"started before {path.name} arrived"
        runs = wait_for(lambda: runs_of("slow-writer"), 10, "the run once complete")
        time.sleep(1.5)
    assert len(runs_of("slow-writer")) == 1
    assert runs[0].created.timestamp() >= last_write - 0.1
    assert "WAITING" in waiting_seen


def test_a_restarted_sensor_reads_nothing_of_what_it_started(api, tmp_path, monkeypatch):
    """The ledger remembers what was started: after a restart an unchanged folder is
    compared by stats alone (never inspected or hashed) and not started again; a
    folder changed while the sensor was down is looked at again."""
    import deployments.sensor as sensor_module

    root = tmp_path / "scan"
    root.mkdir()
    cfg = sensor_config(root)
    cases = [drop(root, tmp_path / "staging", f"done-{i}") for i in range(3)]
    with Running(cfg):
        wait_for(lambda: all(runs_of(c.name) for c in cases), 15, "the three runs")
    for case in cases:
        finish(runs_of(case.name)[0].id)
    reads: list[str] = []

    def counted(real):
        def wrapper(case_dir, *args, **kwargs):
            reads.append(Path(case_dir).name)
            return real(case_dir, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(sensor_module, "content_digest", counted(sensor_module.content_digest))
    monkeypatch.setattr(sensor_module, "inspect_case", counted(sensor_module.inspect_case))
    changed = cases[2]
    ptn = next(changed.rglob("*.ptn"))
    ptn.write_bytes(ptn.read_bytes()[::-1])  # while no sensor runs
    with Running(cfg) as running:
        wait_for(lambda: len(runs_of(changed.name)) == 2, 10, "a run for the changed folder")
        time.sleep(1.0)
        assert running.sensor.intake[cases[0].name].state == "STARTED"
    assert set(reads) == {changed.name}, reads
    assert [len(runs_of(c.name)) for c in cases] == [1, 1, 2]


def test_a_started_folder_that_was_moved_in_is_watched_for_in_place_rewrites(api, tmp_path):
    """Cases are usually delivered by a move. watchdog adds no watch inside a tree moved
    in, and the rescans compare only directories: without the sensor's own watch, a
    spot log rewritten in place later would never be seen. It is, at once."""
    root = tmp_path / "scan"
    root.mkdir()
    cfg = sensor_config(root)
    assert cfg.scanner.rescan_interval_seconds >= 60
    with Running(cfg) as running:
        time.sleep(0.5)  # watching
        case = drop(root, tmp_path / "staging", "moved-in")
        wait_for(lambda: runs_of("moved-in"), 10, "the run")
        finish(runs_of("moved-in")[0].id)
        assert "moved-in" not in running.sensor._unwatched
        ptn = next(case.rglob("*.ptn"))
        ptn.write_bytes(ptn.read_bytes()[::-1])  # in place: no directory changes
        wait_for(lambda: len(runs_of("moved-in")) == 2, 10, "a run for the rewritten content")
