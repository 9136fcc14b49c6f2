"""The archiver against a real Prefect server and real files.

Cases are written with demo.synthetic_case.write_case, their results folders
with fake RT Dose files, stage logs and a report.md rendered by
flows.reporting.render_report; their process_case runs are created with the
client and set to their final state. The server stamps every state with its own
clock (a timestamp the client sends is not kept), so a run cannot be backdated:
the tests use ``archiver.keep_days: 0`` ("due as soon as it COMPLETED") to make
a case due, and ``keep_days: 1`` for one that is not. The flow runs in this
process, as `mqi archive` runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from config import DEFAULT_PATH, ENV_VAR, ConfigError, load_config
from demo.synthetic_case import write_case
from flows.layout import results_dir
from flows.naming import ARCHIVER_DEPLOYMENT, run_name
from tests.support.pipeline import REPO

pytestmark = pytest.mark.integration


@pytest.fixture
def api(prefect_api: str) -> str:
    return prefect_api


def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch | None = None, **archiver):
    """A configuration with its own scan root, results and archive folders; with
    ``monkeypatch``, the flows in this process use it (as `mqi archive` does)."""
    path = config_file(tmp_path, **archiver)
    if monkeypatch is not None:
        monkeypatch.setenv(ENV_VAR, str(path))
    return load_config(path)


def config_file(tmp_path: Path, *, api_url: str | None = None, **archiver) -> Path:
    """Each call writes a file of its own: a process loads each file once."""
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["scanner"]["target_directory"] = str(tmp_path / "scan")
    data["paths"].update(data_dir=str(tmp_path / "data"),
                         results_root=str(tmp_path / "results"))
    data["prefect"]["api_url"] = api_url
    data["archiver"].update({"archive_dir": str(tmp_path / "archive"), **archiver})
    path = tmp_path / f"mqi-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "scan").mkdir(exist_ok=True)
    return path


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def write_results(cfg, case_dir: Path, *, beams: int = 1, dose_bytes: int = 4000) -> Path:
    """A results folder as a COMPLETED run leaves it: RT Dose per beam, stage logs,
    and report.md listing each RT Dose with its SHA-256 (flows/reporting.py)."""
    from flows.case_inspection import inspect_case
    from flows.reporting import render_report

    info = inspect_case(case_dir, id_pattern=cfg.cases.id_pattern, ignore={"_CASE_READY"})
    out = results_dir(cfg, info.case_id)
    files: dict[str, dict[str, str]] = {}
    for beam in info.beams[:beams]:
        dose = out / "dicom" / f"beam_{beam.number}" / f"RD.{beam.number}.dcm"
        dose.parent.mkdir(parents=True)
        dose.write_bytes(os.urandom(dose_bytes))
        files[str(beam.number)] = {dose.relative_to(out).as_posix():
                                   hashlib.sha256(dose.read_bytes()).hexdigest()}
    (out / "logs").mkdir()
    (out / "logs" / "run_interpreter.log").write_text("interpreted (SIMULATED)\n")
    (out / "report.md").write_text(render_report(cfg, info, "default_qa", {}, files, 12.5))
    return out


def add_run(case_id: str, state: str):
    """A process_case run of the case, now in ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed, Running, Scheduled

    from flows.process_case import process_case

    made = {"COMPLETED": Completed, "RUNNING": Running, "SCHEDULED": Scheduled,
            "FAILED": lambda: Failed(message="beam 2: exit code 3")}[state]
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(process_case, name=run_name(case_id),
                                     parameters={"case_dir": case_id}, state=Scheduled())
        if state != "SCHEDULED":
            client.set_flow_run_state(run.id, made(), force=True)
        return client.read_flow_run(run.id)


def finished_case(cfg, label: str, state: str = "COMPLETED", case_id: str | None = None,
                  **case) -> str:
    """A case folder, its results folder and its run in ``state``, in that order."""
    case_id = case_id or new_id(label)
    folder = write_case(cfg.scanner.target_directory, case_id, beams=1, layers=2,
                        spots_per_layer=50, ready_marker="_CASE_READY", seed=7, **case)
    write_results(cfg, folder)
    add_run(case_id, state)
    return case_id


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_archiver(**params):
    """archive_cases in this process: (final state, report or exception)."""
    from flows.archiver import archive_cases

    state = archive_cases(return_state=True, **params)
    return state, state.result(raise_on_failure=False)


def index_lines(cfg) -> list[dict]:
    index = Path(cfg.archiver.archive_dir) / "index.jsonl"
    return [json.loads(x) for x in index.read_text().splitlines()] if index.exists() else []


def parts_left(cfg) -> list[Path]:
    folder = Path(cfg.archiver.archive_dir)
    return sorted(folder.glob(".*.mqi-part")) if folder.exists() else []


# ---------------------------------------------------------------------------- round trip

def test_round_trip_archives_verifies_indexes_and_deletes(api, tmp_path, monkeypatch):
    cfg = install(tmp_path, monkeypatch, keep_days=1)
    due = finished_case(cfg, "old")
    scan, results = Path(cfg.scanner.target_directory), Path(cfg.paths.results_root)
    before_in, before_out = tree(scan / due), tree(results / due)

    # COMPLETED just now, kept for a day: not due, untouched, and said so
    state, report = run_archiver(case_id=due)
    assert state.is_completed(), state.message
    [young] = report.outcomes
    assert (young.action, young.reason) == ("not due",
                                            "COMPLETED 0.0 days ago; archived after 1")
    assert (tree(scan / due), tree(results / due)) == (before_in, before_out)

    cfg = install(tmp_path, monkeypatch, keep_days=0)
    state, report = run_archiver()

    assert state.is_completed(), state.message
    [done] = [o for o in report.outcomes if o.case_id == due]
    assert done.action == "archived" and 0 <= done.age_days < 0.01
    assert not (scan / due).exists() and not (results / due).exists()
    assert sorted(done.deletes) == sorted([str(scan / due), str(results / due)])

    [line] = [x for x in index_lines(cfg) if x["case_id"] == due]
    archive = Path(line["archive"])
    assert archive.parent == Path(cfg.archiver.archive_dir) and archive.name.startswith(due)
    assert line["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert line["archive_bytes"] == archive.stat().st_size
    assert (line["input_files"], line["result_files"]) == (len(before_in), len(before_out))
    assert line["input_bytes"] == sum(map(len, before_in.values()))
    assert line["result_bytes"] == sum(map(len, before_out.values()))
    assert line["run_state"] == "COMPLETED" and line["inputs_included"] is True
    assert not parts_left(cfg)

    # What comes out is what went in, byte for byte, and SHA256SUMS says so too.
    out = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    assert tree(out / "input") == before_in and tree(out / "results") == before_out
    sums = dict(reversed(row.split("  ", 1)) for row in
                (out / "SHA256SUMS").read_text().splitlines())
    assert len(sums) == len(before_in) + len(before_out)
    for name, digest in sums.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    # The next run finds nothing left of it and archives nothing twice.
    state, report = run_archiver(case_id=due)
    assert state.is_completed()
    assert [(o.action, o.reason) for o in report.outcomes] == [
        ("gone", "nothing of it is left to archive")]
    assert len([x for x in index_lines(cfg) if x["case_id"] == due]) == 1


# ---------------------------------------------------------------------------- dry run

def test_dry_run_lists_the_case_and_changes_nothing(api, tmp_path):
    path = config_file(tmp_path, api_url=api, keep_days=0)
    cfg = load_config(path)
    due = finished_case(cfg, "dry")
    scan, results = Path(cfg.scanner.target_directory), Path(cfg.paths.results_root)
    before = tree(tmp_path / "scan"), tree(tmp_path / "results")
    stats = {p: p.stat().st_mtime_ns for p in (scan / due, results / due)}

    env = {**os.environ, "PREFECT_API_URL": api}
    env.pop(ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "archive", "--dry-run", "--config",
         str(path)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 0, done.stderr
    [line] = [x for x in done.stdout.splitlines() if x.startswith(f"case {due}:")]
    inputs = len(before[0])
    assert line.startswith(f"case {due}: would archive (ended 0.0 days ago): input "
                           f"{inputs} files, ")
    assert f"→ {cfg.archiver.archive_dir}/{due}_" in line
    assert line.endswith(f"would delete: {scan / due}, {results / due}")
    assert (tree(tmp_path / "scan"), tree(tmp_path / "results")) == before
    assert {p: p.stat().st_mtime_ns for p in stats} == stats
    assert not Path(cfg.archiver.archive_dir).exists()  # not even the folder
    print(done.stdout)  # shown with -s: what an operator reads


# ---------------------------------------------------------------------------- refusals

def test_running_scheduled_and_failed_cases_are_left_alone_with_the_reason(api, tmp_path,
                                                                          monkeypatch):
    cfg = install(tmp_path, monkeypatch, keep_days=0)
    running = finished_case(cfg, "running")
    add_run(running, "RUNNING")  # a rerun now runs
    queued = finished_case(cfg, "queued")
    add_run(queued, "SCHEDULED")
    failed = finished_case(cfg, "failed", state="FAILED")
    changed = finished_case(cfg, "changed")
    # new content arrives in the folder after its run: not archived with the old
    extra = Path(cfg.scanner.target_directory) / changed / "late.txt"
    before = tree(tmp_path / "scan"), tree(tmp_path / "results")
    extra.write_text("arrived later\n")

    state, report = run_archiver()

    assert state.is_completed(), state.message
    said = {o.case_id: (o.action, o.reason) for o in report.outcomes}
    assert said[running] == ("left alone", "it has an active run (RUNNING)")
    assert said[queued] == ("left alone", "it has an active run (SCHEDULED)")
    assert said[failed] == ("left alone",
                            "its newest run is FAILED (archiver.include_failed is off)")
    assert said[changed][0] == "left alone"
    assert "changed after its last run started" in said[changed][1]
    extra.unlink()
    assert (tree(tmp_path / "scan"), tree(tmp_path / "results")) == before
    assert index_lines(cfg) == []

    # include_failed: the failed case is archived too; the active ones still are not
    cfg = install(tmp_path, monkeypatch, keep_days=0, include_failed=True)
    state, report = run_archiver()
    said = {o.case_id: o.action for o in report.outcomes}
    assert said[failed] == "archived" and said[running] == said[queued] == "left alone"
    assert [x["run_state"] for x in index_lines(cfg)] == ["FAILED"]


# ---------------------------------------------------------------------------- integrity

def test_a_file_changed_after_the_manifest_is_caught_before_anything_is_deleted(tmp_path):
    from flows.archive_files import INPUT, ArchiveError, collect, pack

    cfg = install(tmp_path)
    case = write_case(cfg.scanner.target_directory, new_id("flip"), beams=1, layers=2,
                      spots_per_layer=50, seed=3)
    files = collect(case, INPUT, case.name)
    ptn = sorted(case.rglob("*.ptn"))[0]
    patient_part = ptn.name.split("_")[1]
    data = bytearray(ptn.read_bytes())
    data[20] ^= 0xFF  # same size: only the digest can tell
    ptn.write_bytes(bytes(data))
    before = tree(case)
    archive_dir = Path(cfg.archiver.archive_dir)
    archive_dir.mkdir(parents=True)

    with pytest.raises(ArchiveError) as caught:
        pack(case.name, [files], archive_dir, datetime.now(UTC))

    message = str(caught.value)
    assert message.startswith(f"case {case.name}: checksum mismatch: ")
    assert f"{ptn.parent.name}: the .ptn file of layer " in message
    assert message.endswith("nothing deleted")
    assert patient_part not in message and ptn.name not in message
    assert tree(case) == before
    assert list(archive_dir.iterdir()) == []  # no partial archive


def test_a_result_file_that_differs_from_its_report_fails_that_case_only(api, tmp_path,
                                                                       monkeypatch):
    cfg = install(tmp_path, monkeypatch, keep_days=0)
    bad = finished_case(cfg, "bad")
    good = finished_case(cfg, "good")
    dose = next((Path(cfg.paths.results_root) / bad / "dicom").rglob("*.dcm"))
    dose.write_bytes(b"overwritten after the report " + dose.read_bytes()[30:])
    before = tree(tmp_path / "scan" / bad), tree(tmp_path / "results" / bad)

    state, error = run_archiver()

    assert state.is_failed()  # red in the UI
    said = {o.case_id: o for o in error.report.outcomes}
    assert said[good].action == "archived"
    assert said[bad].action == "failed"
    assert said[bad].reason == (f"case {bad}: result file dicom/beam_2/RD.2.dcm does not "
                                f"match the SHA-256 in report.md (checksum mismatch); "
                                f"nothing deleted")
    assert f"case {bad}: result file" in state.message
    assert (tree(tmp_path / "scan" / bad), tree(tmp_path / "results" / bad)) == before
    assert [x["case_id"] for x in index_lines(cfg)] == [good]
    assert not parts_left(cfg)
    assert not list(Path(cfg.archiver.archive_dir).glob(f"{bad}_*"))


# ---------------------------------------------------------------------------- disk full

@contextmanager
def small_tmpfs(folder: Path, size: str = "256k"):
    """A real, small file system at ``folder``; None where mounting is not allowed."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


DISK_LIMIT_SCRIPT = """
import resource, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from flows.archive_files import INPUT, ArchiveError, collect, pack
case, archive_dir = Path(sys.argv[1]), Path(sys.argv[2])
files = collect(case, INPUT, case.name)          # read before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # a write past it fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
try:
    pack(case.name, [files], archive_dir, datetime.now(UTC))
except ArchiveError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_full_disk_stops_that_case_with_a_clear_error_and_keeps_the_originals(
        api, tmp_path, monkeypatch):
    cfg = install(tmp_path, monkeypatch, keep_days=0)
    case_id = new_id("big")
    # 1.3 MB of spot logs, 0.8 MB packed: more than the archive folder holds (256 KB)
    case = write_case(cfg.scanner.target_directory, case_id, beams=1, layers=20,
                      spots_per_layer=4000, ready_marker="_CASE_READY", seed=5)
    write_results(cfg, case)
    add_run(case_id, "COMPLETED")
    before = tree(case), tree(results_dir(cfg, case_id))

    with small_tmpfs(Path(cfg.archiver.archive_dir)) as mounted:
        if mounted:
            state, error = run_archiver(case_id=case_id)
            assert state.is_failed()
            [outcome] = error.report.outcomes
            assert outcome.reason == (f"case {case_id}: writing the archive: the disk is "
                                      f"full (No space left on device); nothing deleted")
            assert not parts_left(cfg) and index_lines(cfg) == []
            assert [p.name for p in Path(cfg.archiver.archive_dir).iterdir()] == \
                [".archiver.lock"]
        else:
            # No mount here (not root): the same write fails at a file-size limit.
            archive_dir = Path(cfg.archiver.archive_dir)
            done = subprocess.run([sys.executable, "-c", DISK_LIMIT_SCRIPT, str(case),
                                   str(archive_dir)], cwd=REPO, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 3, done.stdout + done.stderr
            assert done.stdout.strip() == (
                f"case {case_id}: writing the archive: no room for a file that large here "
                f"(File too large); nothing deleted")
            assert list(archive_dir.iterdir()) == []
    assert (tree(case), tree(results_dir(cfg, case_id))) == before


# ---------------------------------------------------------------------------- pruning

def test_pruning_deletes_old_finished_runs_but_a_case_still_here_keeps_its_newest(
        api, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from flows.run_pruning import delete_runs, prunable_runs

    cfg = install(tmp_path, monkeypatch, keep_days=0, prune_runs_after_days=1)
    older = add_run(new_id("pruned"), "FAILED")  # failed first, then COMPLETED
    archived = finished_case(cfg, "", case_id=older.name.removeprefix("case-"))
    kept = finished_case(cfg, "kept", state="FAILED")  # left alone: its run stays
    add_run(kept, "FAILED")
    active = finished_case(cfg, "active")
    add_run(active, "RUNNING")

    # Through the flow: the runs ended just now, a day is not over: none deleted.
    state, report = run_archiver()
    assert state.is_completed(), state.message
    assert report.pruned_runs == 0
    assert f"case {archived}: archived" in "\n".join(report.lines())

    def runs(client, case_id):
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[run_name(case_id)])))

    # Against a cutoff that has passed: what the flow keeps is what goes.
    with get_client(sync_client=True) as client:
        newest_kept = max(runs(client, kept), key=lambda r: r.created)
        mine = {run_name(c) for c in (archived, kept, active)}
        found = [r for r in prunable_runs(client, datetime.now(UTC) + timedelta(minutes=1),
                                          [], keep={newest_kept.id}) if r.name in mine]
        assert {r.id for r in found} == ({r.id for r in runs(client, archived)} |
                                         {r.id for r in runs(client, kept)} |
                                         {r.id for r in runs(client, active)
                                          if r.state.type.value == "COMPLETED"}) - \
            {newest_kept.id}
        assert older.id in {r.id for r in found}
        assert delete_runs(client, found) == len(found)
        assert runs(client, archived) == []
        assert [r.id for r in runs(client, kept)] == [newest_kept.id]
        assert [r.state.type.value for r in runs(client, active)] == ["RUNNING"]


# ---------------------------------------------------------------------------- deployment

def test_the_schedule_comes_from_the_config_for_serve_and_prefect_deploy(api, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.runner import Runner
    from prefect.utilities.templating import resolve_variables

    from deployments.definitions import DEPLOYMENTS, deployments_for
    from deployments.publish import publish_schedules
    from deployments.serve import remove_served

    cfg = install(tmp_path, schedule_cron="15 2 * * 1-5", schedule_timezone="Europe/Zurich")
    [spec] = [s for s in deployments_for(cfg) if s.name == ARCHIVER_DEPLOYMENT]
    assert spec.active and spec.schedule == {"cron": "15 2 * * 1-5",
                                             "timezone": "Europe/Zurich", "active": True}
    [made] = spec.options()["schedules"]
    assert (made.cron, made.timezone, made.active) == ("15 2 * * 1-5", "Europe/Zurich", True)

    # serve: registered with that schedule
    Runner(name="test-archiver").add_flow(spec.load(), **spec.options())
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(spec.full_name)
        [schedule] = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
            "15 2 * * 1-5", "Europe/Zurich", True)
        assert deployment.work_pool_name is None

        # turned off: serve leaves it out and removes the one it served before
        off = install(tmp_path, enabled=False)
        [spec_off] = [s for s in deployments_for(off) if s.name == ARCHIVER_DEPLOYMENT]
        assert not spec_off.active and spec_off.options()["schedules"][0].active is False
        assert remove_served(client, spec_off) is True
        assert remove_served(client, spec_off) is False
        from prefect.exceptions import ObjectNotFound

        with pytest.raises(ObjectNotFound):
            client.read_deployment_by_name(spec.full_name)

    # prefect deploy: prefect.yaml's schedule reads the variables mqi up / mqi deploy
    # publish, resolved as `prefect deploy` resolves them: the configuration's schedule.
    assert {"variable/mqi_archive_cases_active", "variable/mqi_archive_cases_cron",
            "variable/mqi_archive_cases_timezone"} <= set(publish_schedules(cfg))
    entry = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
                 if d["name"] == ARCHIVER_DEPLOYMENT)
    [resolved] = asyncio.run(resolve_variables(entry["schedules"]))
    assert resolved == spec.schedule
    publish_schedules(off)
    [resolved] = asyncio.run(resolve_variables(entry["schedules"]))
    assert resolved["active"] is False
    # with nothing configured, DEPLOYMENTS holds the defaults
    [default] = [s for s in DEPLOYMENTS if s.name == ARCHIVER_DEPLOYMENT]
    assert default.schedule == {"cron": "0 3 * * *", "timezone": "UTC", "active": True}


def test_bad_archiver_settings_are_config_errors_naming_the_key(tmp_path):
    for setting, key in [({"schedule_cron": "0 25 * * *"}, "archiver.schedule_cron"),
                         ({"schedule_cron": "@daily"}, "archiver.schedule_cron"),
                         ({"schedule_timezone": "Mars/Olympus"}, "archiver.schedule_timezone"),
                         ({"keep_days": -1}, "archiver.keep_days"),
                         ({"prune_runs_after_days": 0}, "archiver.prune_runs_after_days"),
                         ({"include_failed": "sometimes"}, "archiver.include_failed"),
                         ({"archive_dir": str(tmp_path / "scan" / "archive")},
                          "archiver.archive_dir")]:
        with pytest.raises(ConfigError) as caught:
            install(tmp_path, **setting)
        assert key in str(caught.value), (setting, str(caught.value))


def test_an_unreadable_tree_member_is_named_without_the_patient_id(tmp_path):
    """A link inside a case folder (never followed) stops the case before packing."""
    from flows.archive_files import INPUT, ArchiveError, collect

    case = write_case(tmp_path / "scan", new_id("link"), beams=1, layers=1,
                      spots_per_layer=10, seed=1)
    ptn = next(case.rglob("*.ptn"))
    (ptn.parent / f"copy_{ptn.name}").symlink_to(ptn)
    with pytest.raises(ArchiveError) as caught:
        collect(case, INPUT, case.name)
    assert "is a symbolic link; it is not archived; nothing deleted" in str(caught.value)
    assert ptn.name.split("_")[1] not in str(caught.value)
    shutil.rmtree(case)
