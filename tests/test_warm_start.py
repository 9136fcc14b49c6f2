"""How flow runs start: forked from a pre-imported forkserver (prefect.warm_start), and
the sensor's client re-asking a busy API within milliseconds instead of 2 s later."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest

from deployments.busy_retry import BusyRetryTransport
from tests.support.pipeline import REPO


def test_warm_start_forks_flow_runs_from_a_preloaded_forkserver(prefect_api, tmp_path):
    """Prefect's own run_flow_in_subprocess, after warm_start.enable(), in a fresh
    interpreter as the serve process runs it."""
    out = tmp_path / "where.json"
    script = textwrap.dedent(f"""
        from deployments import warm_start
        assert warm_start.enable()
        import prefect.flow_engine as engine
        from tests.support.where_flow import where_am_i
        process = engine.run_flow_in_subprocess(where_am_i, parameters={{"out": {str(out)!r}}})
        process.join(120)
        print(type(process).__name__, process.exitcode)
    """)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ForkServerProcess", "0"], done.stdout + done.stderr[-3000:]
    where = json.loads(out.read_text())
    assert "multiprocessing.forkserver" in where["parent_cmdline"]
    assert where["pipeline_preloaded"]  # imported once in the forkserver, not per run


def _flaky(statuses: list[int], seen: list[bytes]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.read())
        status = statuses.pop(0) if statuses else 200
        return httpx.Response(status, json={"status": status})
    return httpx.MockTransport(handler)


def test_busy_answers_are_asked_again_at_once_with_the_same_body():
    seen: list[bytes] = []
    transport = BusyRetryTransport(_flaky([503, 503, 502], seen), delays=(0.01,) * 5)
    with httpx.Client(transport=transport, base_url="http://api") as client:
        response = client.post("/create", json={"idempotency_key": "c1:abc"})
    assert response.status_code == 200
    assert len(seen) == 4 and len(set(seen)) == 1 and b"c1:abc" in seen[0]


def test_other_errors_pass_through_and_a_busy_api_is_given_up_on():
    seen: list[bytes] = []
    transport = BusyRetryTransport(_flaky([500], seen), delays=(0.01,) * 3)
    with httpx.Client(transport=transport, base_url="http://api") as client:
        assert client.get("/x").status_code == 500
        assert len(seen) == 1
        seen.clear()
        transport.inner = _flaky([503] * 10, seen)
        assert client.get("/x").status_code == 503  # Prefect's own retries take over
        assert len(seen) == 4


@pytest.mark.integration
def test_the_sensors_client_re_asks_a_busy_api_itself(prefect_api):
    """The wrap is on Prefect's own transport (TLS, limits, auth kept); if Prefect's
    client insides change, this fails rather than starts silently getting slower."""
    from deployments.run_starter import PrefectStarter

    starter = PrefectStarter()
    try:
        starter.warm_up()
        transport = starter._client._client._transport
        assert isinstance(transport, BusyRetryTransport)
        assert isinstance(transport.inner, httpx.HTTPTransport)
    finally:
        starter.close()
