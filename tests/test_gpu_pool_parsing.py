"""GPU discovery parses the real nvidia-smi output captured on an H100 (tests/fixtures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blocks.gpu_pool import GpuPool, GpuQueryError, parse_compute_apps, parse_gpu_query

REPO = Path(__file__).resolve().parents[1]
# Real nvidia-smi and NVML output captured on an NVIDIA H100 (see its README.md).
FIXTURES = REPO / "tests" / "fixtures" / "nvidia-h100"
SIM = REPO / "demo" / "simulators" / "nvidia_smi.py"


def fixture(name: str) -> str:
    path = FIXTURES / name
    assert path.exists(), f"fixture missing: {path}"
    return path.read_text()


def pool(**kw) -> GpuPool:
    return GpuPool(query_command="q", apps_command="a", **kw)


def test_idle_query_with_header_and_units():
    (gpu,) = parse_gpu_query(fixture("query_idle.csv"))
    assert gpu.index == 0 and gpu.uuid == "GPU-b4bf7697-7807-a5fa-e96c-8fca12d67f04"
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert (gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib) == (81559, 0, 81079)
    # the driver reserves some memory: used + free < total
    assert gpu.memory_used_mib + gpu.memory_free_mib < gpu.memory_total_mib
    assert (gpu.utilization_pct, gpu.temperature_c) == (0, 34)


def test_loaded_query_and_noheader_nounits_form():
    (loaded,) = parse_gpu_query(fixture("query_load.csv"))
    assert (loaded.memory_used_mib, loaded.memory_free_mib, loaded.utilization_pct) == \
        (21491, 59589, 100)
    # the noheader form of the 12-column capture: columns named by the fixture's header
    header = fixture("query_idle.csv").splitlines()[0]
    (same,) = parse_gpu_query(header + "\n" + fixture("query_idle_noheader.csv"))
    assert same == parse_gpu_query(fixture("query_idle.csv"))[0]


def test_configured_query_without_header_uses_the_configured_columns():
    line = "0, GPU-b4bf7697-7807-a5fa-e96c-8fca12d67f04, NVIDIA H100 80GB HBM3, 81559, 0, " \
           "81079, 0, 34\n"
    (gpu,) = parse_gpu_query(line)
    assert (gpu.index, gpu.memory_free_mib, gpu.temperature_c) == (0, 81079, 34)


def test_compute_apps_fixture():
    (app,) = parse_compute_apps(fixture("apps_load.csv"))
    assert (app.pid, app.gpu_uuid, app.used_memory_mib) == \
        (444, "GPU-b4bf7697-7807-a5fa-e96c-8fca12d67f04", 21482)
    assert parse_compute_apps("") == []


def test_nvml_capture_agrees_with_nvidia_smi():
    nvml = json.loads(fixture("nvml.json"))["devices"][0]
    (smi,) = parse_gpu_query(fixture("query_load.csv"))
    assert nvml["uuid"] == smi.uuid
    assert abs(nvml["mem_total"] // 2**20 - smi.memory_total_mib) <= 1


def test_garbage_is_a_clear_error():
    with pytest.raises(GpuQueryError, match="unexpected GPU query line"):
        parse_gpu_query("NVIDIA-SMI has failed because it couldn't communicate with the driver")


def test_usable_filters_memory_foreign_processes_and_selection():
    (loaded,) = parse_gpu_query(fixture("query_load.csv"))
    apps = parse_compute_apps(fixture("apps_load.csv"))
    assert pool(min_free_memory_mib=8192).usable([loaded], apps) == []          # foreign process
    assert pool(skip_gpus_with_foreign_processes=False).usable([loaded], apps) == [loaded]
    assert pool(skip_gpus_with_foreign_processes=False,
                min_free_memory_mib=60000).usable([loaded], apps) == []         # too little free
    assert pool(indices=[1]).usable([loaded], []) == []


@pytest.mark.parametrize("fields,fmt,fixture_name", [
    ("index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,utilization.memory,"
     "temperature.gpu,power.draw,pstate,compute_mode", "csv", "query_idle.csv"),
    ("index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,utilization.memory,"
     "temperature.gpu,power.draw,pstate,compute_mode", "csv,noheader,nounits",
     "query_idle_noheader.csv"),
])
def test_the_simulator_speaks_the_real_format(fields, fmt, fixture_name):
    out = subprocess.run([sys.executable, str(SIM), "--gpus", "1", f"--query-gpu={fields}",
                          f"--format={fmt}"], capture_output=True, text=True, check=True).stdout
    real = fixture(fixture_name).strip().splitlines()
    sim = out.strip().splitlines()
    assert len(sim) == len(real)
    for sim_line, real_line in zip(sim, real, strict=True):
        sim_cells, real_cells = sim_line.split(", "), real_line.split(", ")
        assert len(sim_cells) == len(real_cells)
        # identical except the device identity (uuid, name says SIMULATED) and power noise
        for i, (a, b) in enumerate(zip(sim_cells, real_cells, strict=True)):
            if i not in (1, 2, 9):
                assert a == b
    assert "SIMULATED" in out


def test_one_snapshot_reads_gpus_processes_and_held_locks_and_choosing_skips_them(tmp_path):
    """The one-round-trip snapshot (query, compute apps, index locks) against the H100
    captures on this machine's shell: a GPU whose lock a live process holds is never
    chosen; a foreign process's GPU neither."""
    from blocks.local_host import LocalHost

    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    (lock_dir / "gpu-1.lock").touch()  # a lock file nobody holds: free
    gpu_pool = GpuPool(query_command=f"cat {FIXTURES / 'query_idle.csv'}",
                       apps_command=f"cat {FIXTURES / 'apps_load.csv'}",
                       lock_dir=str(lock_dir), min_free_memory_mib=0,
                       skip_gpus_with_foreign_processes=False)
    host = LocalHost()
    gpus, apps, locked = gpu_pool.snapshot(host)
    assert gpus == parse_gpu_query(fixture("query_idle.csv"))
    assert apps == parse_compute_apps(fixture("apps_load.csv"))
    assert locked == set()
    holder = subprocess.Popen(["flock", str(lock_dir / "gpu-0.lock"), "sleep", "30"])
    try:
        deadline = 50
        while gpu_pool.snapshot(host)[2] != {0} and deadline:
            deadline -= 1
            subprocess.run(["sleep", "0.1"], check=True)
        assert gpu_pool.snapshot(host)[2] == {0}
        if len(gpus) > 1:
            assert {gpu_pool.choose_index(host, _quiet(), spread=s) for s in range(20)} \
                <= {g.index for g in gpus} - {0}
        else:  # one GPU, held: nothing to choose until it is free
            gpu_pool.max_wait_seconds, gpu_pool.poll_seconds = 0.3, 0.1
            with pytest.raises(GpuQueryError, match="no GPU became free"):
                gpu_pool.choose_index(host, _quiet())
    finally:
        holder.kill()
        holder.wait()
    failing = GpuPool(query_command="exit 9", apps_command="true", lock_dir=str(lock_dir))
    with pytest.raises(Exception, match="9"):
        failing.snapshot(host)


def _quiet():
    import logging

    return logging.getLogger("test.gpu_pool")


def test_a_slot_request_the_busy_api_failed_is_asked_again_a_refused_one_is_not():
    """Which failures of asking for a GPU slot are worth asking again."""
    import httpx
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError

    from blocks.gpu_pool import _transient

    def failed(cause: BaseException) -> ConcurrencySlotAcquisitionError:
        exc = ConcurrencySlotAcquisitionError("Unable to acquire concurrency slots")
        exc.__cause__ = cause
        return exc

    request = httpx.Request("POST", "http://127.0.0.1/api/v2/concurrency_limits/increment")
    for status, again in ((503, True), (500, True), (422, False), (404, False)):
        response = httpx.Response(status, request=request)
        assert _transient(failed(httpx.HTTPStatusError("x", request=request,
                                                       response=response))) is again
    assert _transient(failed(httpx.ConnectError("refused", request=request)))
    assert not _transient(ConcurrencySlotAcquisitionError("must be created before"))
