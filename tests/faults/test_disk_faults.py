"""A full disk under `mqi up`: the GPU host's work folder (5) and the local results
folder (6), each a small tmpfs. The case fails saying where, nothing is deleted
locally, no half-written RT Dose stands as if complete, and `mqi rerun` completes
the same run once there is room."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.conftest import TERMINAL, drop_case, flow_runs, sim_starts, state_of
from tests.support.pipeline import Installation, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (needs root, as the CI runs)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs at {path} for the disk-full faults (these "
                    f"tests run as root, as the CI does): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    """Room again: the same tmpfs, bigger, its files kept."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def finished(api: str, case: str) -> str:
    return wait_for(lambda: (s := state_of(api, case)) in TERMINAL and s, 240,
                    f"{case} to finish")


def snapshot(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.scenario(budget=300)
def test_full_disks_fail_the_case_clearly_and_rerun_completes(up_inst: Installation,
                                                               tmp_path):
    inst, api = up_inst, up_inst.api_url
    with small_disk(inst.remote_root, "1m"), small_disk(inst.results, "2m"):
        up = inst.start_up()
        try:
            # 5: the GPU host's disk is full during the upload
            # ~2 MB of spot logs: more than the host's 1 MB
            case = drop_case(inst, tmp_path / "staging", "full-remote", beams=1, seed=40,
                             inflate=1500)
            before = snapshot(case)
            assert finished(api, "full-remote") == "FAILED"
            message = flow_runs(api, "full-remote")[0]["state"]["message"]
            assert "upload" in message and "127.0.0.1" in message \
                and str(inst.remote_root / "full-remote") in message, message
            assert "disk is full" in message, message
            assert snapshot(case) == before  # nothing deleted (or changed) locally
            grow(inst.remote_root, "64m")
            rerun = inst.mqi("rerun", "full-remote")
            assert rerun.returncode == 0, rerun.stdout + rerun.stderr
            assert [r["state"]["type"] for r in flow_runs(api, "full-remote")] == ["COMPLETED"]

            # 6: the local results disk is full while the RT Dose comes down
            inst.set_control(duration=0.3, batches=2, dose_padding_mb=3)
            drop_case(inst, tmp_path / "staging", "full-local", beams=1, seed=41)
            assert finished(api, "full-local") == "FAILED"
            message = flow_runs(api, "full-local")[0]["state"]["message"]
            assert "download" in message and "No space left on device" in message \
                and str(inst.results / "full-local" / "dicom") in message, message
            dicom = inst.results / "full-local" / "dicom"
            assert not list(dicom.rglob("*.dcm")), list(dicom.rglob("*"))  # none half-written
            assert not list(dicom.rglob("*.mqi-part"))
            grow(inst.results, "64m")
            rerun = inst.mqi("rerun", "full-local")
            assert rerun.returncode == 0, rerun.stdout + rerun.stderr
            assert [r["state"]["type"] for r in flow_runs(api, "full-local")] == ["COMPLETED"]
            dose = dicom / "beam_2" / "RTDOSE_beam2.dcm"
            assert dose.stat().st_size > 3 * 1024 * 1024
            assert sim_starts(inst) == {"2": 2}  # one per case: the rerun reused its beam
            stop(up, grace=90)
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
