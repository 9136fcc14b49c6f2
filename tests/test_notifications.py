"""Notifications through Prefect automations (deployments/notifications.py).

The configuration's checks, then the real thing: a real Prefect server (the
embedded one, as `mqi up` starts it), a real SMTP server (aiosmtpd) and a real
HTTP receiver on 127.0.0.1, and a real process_case run (`mqi run`, the
bundled simulators on this machine) that fails in a stage whose output names a
spot-log file, whose name carries the patient id. The server must send the
e-mail through our block (blocks/notify.py, found by the entry point), the
webhook and an existing notification block; each message names the case, the
stage and reason and links to the run; none carries a patient id. A curator
warning and a case left incomplete reach every target too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from config import DEMO_PATH, ConfigError
from config.loader import parse_config
from tests.support.patients import patient_ids
from tests.support.pipeline import REPO
from tests.support.sshd import free_port

BASE: dict[str, Any] = yaml.safe_load(DEMO_PATH.read_text())


def config_with(tmp_path: Path, notifications: dict[str, Any]):
    data = yaml.safe_load(DEMO_PATH.read_text())
    data["notifications"] = notifications
    return parse_config(data, tmp_path / "mqi.yaml")


def issues(tmp_path: Path, *targets: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        config_with(tmp_path, {"targets": list(targets)})
    return dict(caught.value.issues)


# ------------------------------------------------------------------ configuration
SMTP = {"name": "desk", "kind": "smtp", "host": "smtp.example.org", "from": "mqi@example.org",
        "to": ["physics@example.org"]}


def test_no_targets_by_default_means_no_automations(tmp_path):
    from deployments.notifications import automations

    cfg = config_with(tmp_path, {})
    assert cfg.notifications.targets == []
    assert automations(cfg, {}) == []


def test_each_kind_needs_its_keys_and_only_its_keys(tmp_path):
    found = issues(
        tmp_path,
        {"name": "a", "kind": "smtp", "port": 25, "url": "https://x.example.org/h"},
        {"name": "b", "kind": "webhook", "host": "smtp.example.org"},
        {"name": "c", "kind": "block"},
        {**SMTP, "name": "d", "ssl": True, "password_env": "MQI_SMTP_PASSWORD"})
    assert found == {
        "notifications.targets[0].url": "not a key of an smtp target (its keys: from, host, "
                                        "password_env, port, ssl, starttls, to, username)",
        "notifications.targets[0].host": "required for an smtp target",
        "notifications.targets[0].from": "required for an smtp target",
        "notifications.targets[0].to": "required for an smtp target",
        "notifications.targets[1].host": "not a key of a webhook target (its keys: headers, "
                                         "headers_env, method, payload, url, url_env)",
        "notifications.targets[1].url": "a webhook target needs url or url_env (one)",
        "notifications.targets[2].block": "required for a block target",
        "notifications.targets[3].ssl": "implicit TLS and starttls exclude each other: set "
                                        "starttls false",
        "notifications.targets[3].username": "required with password_env",
    }


def test_bad_values_are_named_by_key(tmp_path):
    found = issues(
        tmp_path,
        {**SMTP, "name": "Desk 1", "to": ["not-an-address"], "port": 0, "pasword_env": "X"},
        {"name": "hook", "kind": "webhook", "url": "ftp://x", "method": "GET",
         "events": ["case_failed", "case_lost"]},
        {"name": "x", "kind": "pager"})
    assert set(found) == {
        "notifications.targets[0].name", "notifications.targets[0].to[0]",
        "notifications.targets[0].port", "notifications.targets[0].pasword_env",
        "notifications.targets[1].url", "notifications.targets[1].method",
        "notifications.targets[1].events[1]", "notifications.targets[2].kind"}
    assert "did you mean 'password_env'" in found["notifications.targets[0].pasword_env"]


def test_names_events_and_placeholders_are_checked_across_targets(tmp_path):
    found = issues(
        tmp_path, SMTP,
        {"name": "desk", "kind": "webhook", "url": "https://x.example.org/h",
         "events": ["case_failed", "case_failed"], "headers": {"X-Token": "a"},
         "headers_env": {"X-Token": "TOKEN"}, "payload": {"text": "{{subject}} {{patient}}"}})
    assert found == {
        "notifications.targets[1].name": "another target is named 'desk'",
        "notifications.targets[1].events": "case_failed appears more than once",
        "notifications.targets[1].headers_env.X-Token": "also in headers",
        "notifications.targets[1].payload.text": "unknown placeholder(s) patient (known: "
                                                 "subject, body)",
    }


def test_a_password_in_the_yaml_is_refused_with_the_way_out(tmp_path):
    found = issues(tmp_path, {**SMTP, "password": "hunter2"})
    assert "password_env" in found["notifications.targets[0].password"]


def test_the_published_configuration_reads_back_the_same(tmp_path):
    cfg = config_with(tmp_path, {"dashboard_url": "https://mqi.example.org", "targets": [
        SMTP, {"name": "hook", "kind": "webhook", "url_env": "HOOK_URL"},
        {"name": "chat", "kind": "block", "block": "slack-webhook/physics",
         "events": ["case_failed", "case_refused"], "enabled": False}]})
    dumped = cfg.model_dump(mode="json")
    assert dumped["notifications"]["targets"][0]["from"] == "mqi@example.org"
    assert parse_config(dumped, tmp_path / "again.yaml").notifications == cfg.notifications


def test_the_default_events_and_automation_names(tmp_path):
    from uuid import uuid4

    from deployments.notifications import automations

    cfg = config_with(tmp_path, {"targets": [
        SMTP, {**SMTP, "name": "off", "enabled": False},
        {"name": "hook", "kind": "webhook", "url": "https://x.example.org/h",
         "events": ["case_refused"]}]})
    names = [a.name for a in automations(cfg, {"desk": uuid4(), "hook": uuid4()})]
    assert names == ["mqi: case failed -> desk", "mqi: GPU warning -> desk",
                     "mqi: case incomplete -> desk", "mqi: case refused -> hook"]


# ------------------------------------------------------------------ receivers
class SmtpSink:
    """A real SMTP server on 127.0.0.1 that keeps every message it is sent."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[Any] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=email_policy))
        return "250 OK"


class HttpSink(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that keeps every request: (path, headers, JSON)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.requests.append((self.path, dict(self.headers), json.loads(raw or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)


def received(smtp: SmtpSink, http: HttpSink) -> dict[str, list[tuple[str, str]]]:
    """(subject, body) of everything sent, per receiver: mail, webhook, block."""
    out: dict[str, list[tuple[str, str]]] = {"mail": [], "webhook": [], "block": []}
    for msg in smtp.messages:
        out["mail"].append((str(msg["Subject"]), msg.get_content()))
    for path, _headers, data in http.requests:
        kind = "webhook" if path == "/hook" else "block"
        if kind == "webhook":
            out[kind].append((data["subject"], data["body"]))
        else:
            out[kind].append(tuple(data["text"].split("\n", 1)))  # type: ignore[arg-type]
    return out


def wait_for_all(smtp: SmtpSink, http: HttpSink, needle: str, timeout: float = 30.0
                 ) -> dict[str, tuple[str, str]]:
    """The message about ``needle`` in each receiver, once every one has it."""
    deadline = time.monotonic() + timeout
    while True:
        got = {kind: [m for m in msgs if needle in m[0] + m[1]]
               for kind, msgs in received(smtp, http).items()}
        if all(got.values()):
            assert all(len(m) == 1 for m in got.values()), got  # one message each
            return {kind: msgs[0] for kind, msgs in got.items()}
        if time.monotonic() > deadline:
            raise AssertionError(f"not every receiver got a message about {needle!r} in "
                                 f"{timeout:g} s: {received(smtp, http)}")
        time.sleep(0.2)


# ------------------------------------------------------------------ the real thing
@pytest.fixture(scope="module")
def sinks() -> Iterator[tuple[SmtpSink, HttpSink]]:
    smtp, http = SmtpSink(), HttpSink()
    smtp.controller.start()
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield smtp, http
    finally:
        http.shutdown()
        smtp.controller.stop()


@pytest.mark.integration
def test_failed_case_gpu_warning_and_incomplete_case_reach_every_target(
        prefect_api: str, sinks: tuple[SmtpSink, HttpSink], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from demo.synthetic_case import write_case
    from deployments.intake import emit
    from deployments.notifications import apply_notifications

    smtp, http = sinks
    hook = f"http://127.0.0.1:{http.server_address[1]}"
    # an existing notification block, made on the dashboard's Blocks page, say
    CustomWebhookNotificationBlock(
        name="ward", url=f"{hook}/block", json_data={"text": "{{subject}}\n{{body}}"},
        cookies=None, headers=None).save("test-ward-hook", overwrite=True)
    monkeypatch.setenv("MQI_TEST_HOOK_TOKEN", "token-from-the-environment")

    data = yaml.safe_load(DEMO_PATH.read_text())
    data["prefect"]["api_url"] = prefect_api
    data["paths"] = {"data_dir": str(tmp_path / "data"), "results_root": str(tmp_path / "res"),
                     "remote_work_root": str(tmp_path / "work")}
    data["scanner"]["target_directory"] = str(tmp_path / "scan")
    data["gpu"]["lock_dir"] = str(tmp_path / "locks")
    data["gpu"]["concurrency_limit"] = f"mqi-gpu-notify-{free_port()}"
    data["retries"] = {"default": {"retries": 0, "retry_delay_seconds": 0, "backoff_factor": 1,
                                   "timeout_seconds": 120}, "steps": {}}
    data["notifications"] = {"targets": [
        {"name": "desk", "kind": "smtp", "host": "127.0.0.1", "port": smtp.port,
         "starttls": False, "from": "mqi@clinic.example.org",
         "to": ["physics@clinic.example.org", "oncall@clinic.example.org"]},
        {"name": "ops", "kind": "webhook", "url": f"{hook}/hook",
         "headers_env": {"X-Token": "MQI_TEST_HOOK_TOKEN"}},
        {"name": "ward", "kind": "block", "block": "test-ward-hook"},
        {"name": "later", "kind": "smtp", "host": "127.0.0.1", "from": "a@b.example.org",
         "to": ["c@d.example.org"], "starttls": False, "enabled": False}]}
    config = tmp_path / "mqi.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = parse_config(data, config)

    try:
        lines = apply_notifications(cfg)
        assert sorted(lines) == sorted(
            [f"notification automation 'mqi: {e} -> {t}': created"
             for t in ("desk", "ops", "ward")
             for e in ("case failed", "GPU warning", "case incomplete")])
        again = apply_notifications(cfg)  # idempotent: nothing new, nothing changed
        assert all(line.endswith(": unchanged") for line in again) and len(again) == 9

        # a case fails in a stage whose output names a spot log (and so the patient id)
        case = write_case(tmp_path / "scan", "notify-fails", beams=2, layers=2,
                          spots_per_layer=10, seed=7)
        ids = patient_ids(case)
        control = tmp_path / "control.json"
        control.write_text(json.dumps({"fail": {"interpreter": True}}))
        env = {**os.environ, "MQI_SIM_CONTROL": str(control),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        ran = subprocess.run([sys.executable, "-m", "deployments.cli", "run", str(case),
                              "--config", str(config)], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=120)
        assert ran.returncode != 0 and "bad spot log" in ran.stdout + ran.stderr, ran
        failed = wait_for_all(smtp, http, "notify-fails failed")
        run = httpx.post(f"{prefect_api}/flow_runs/filter", json={
            "flow_runs": {"name": {"any_": ["case-notify-fails"]}}}).json()[0]
        link = f"{prefect_api.removesuffix('/api')}/runs/flow-run/{run['id']}"
        for subject, body in failed.values():
            assert subject == "MQI: case notify-fails failed"
            assert "Reason: run_interpreter failed: exit code 1: ERROR: " in body
            assert "Case notify-fails: its run ended Failed" in body
            assert "run_interpreter failed" in body and "bad spot log" in body
            assert f"Flow run: {link}" in body
        # the curator marks a zombie run Crashed: that is told too
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run["id"], Crashed(
                message="no process of this run is left on the GPU host"), force=True)
        crashed = wait_for_all(smtp, http, "notify-fails crashed")
        for _subject, body in crashed.values():
            assert "Reason: no process of this run is left on the GPU host" in body
            assert f"Flow run: {link}" in body

        mail = next(m for m in smtp.messages if "notify-fails" in str(m["Subject"]))
        assert mail["From"] == "mqi@clinic.example.org"
        assert mail["To"] == "physics@clinic.example.org, oncall@clinic.example.org"
        hook_headers = next(h for p, h, _ in http.requests if p == "/hook")
        assert hook_headers["X-Token"] == "token-from-the-environment"

        # a curator warning (the curator's event: docs/curator.md) and a case left waiting
        emit_event("mqi.gpu.warning", resource={
            "prefect.resource.id": "mqi.gpu.GPU-0c6d3e51", "prefect.resource.name":
            "GPU 1 on gpu", "mqi.gpu.index": "1", "mqi.gpu.host": "gpu"},
            payload={"kind": "hot", "message": "GPU 1 on gpu is at 91 °C (above 85 °C)",
                     "index": 1, "host": "gpu"})
        emit("mqi.case.incomplete", "notify-waits", waited_s=700,
             reason="1 of 2 beam folders (the plan has 2 treatment beams)")
        EventsWorker.drain_all()
        hot = wait_for_all(smtp, http, "GPU 1 on gpu")
        for subject, body in hot.values():
            assert subject == "MQI: GPU warning (hot) on GPU 1 on gpu"
            assert "GPU 1 on gpu is at 91 °C (above 85 °C)" in body
            assert "/events?resource=mqi.gpu.GPU-0c6d3e51" in body
        waits = wait_for_all(smtp, http, "notify-waits")
        for subject, body in waits.values():
            assert subject == "MQI: case notify-waits still incomplete"
            assert "has waited 700 s and is still not complete: 1 of 2 beam folders" in body

        # no patient id anywhere in what was sent, headers included (decoded: a
        # quoted-printable line break could hide one in the raw text)
        sent = "\n".join([f"{m.items()}\n{m.get_content()}" for m in smtp.messages] +
                         [json.dumps([p, h, d], ensure_ascii=False)
                          for p, h, d in http.requests])
        assert "notify-fails" in sent and "bad spot log" in sent
        assert not [i for i in ids if i.lower() in sent.lower()]
        print("\nthe e-mail of the failed case:\n" + mail.as_string())
        for kind, (subject, body) in {**hot, **waits}.items():
            print(f"--- {kind}\n{subject}\n{body}")

        # a target removed from the configuration: its automations and its block go
        data["notifications"]["targets"] = data["notifications"]["targets"][2:]
        fewer = apply_notifications(parse_config(data, config))
        assert sorted(line.split(": ", 2)[-1] for line in fewer) == \
            ["removed (no longer configured)"] * 6 + ["unchanged"] * 3
        blocks = httpx.post(f"{prefect_api}/block_documents/filter", json={}).json()
        assert not [b["name"] for b in blocks if b["name"].startswith("mqi-notify-")]
        assert "test-ward-hook" in [b["name"] for b in blocks]  # not ours: left alone
    finally:
        data["notifications"] = {}
        apply_notifications(parse_config(data, config))  # the session's server goes on
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.delete_block_document(client.read_block_document_by_name(
                "test-ward-hook", "custom-webhook").id)
    automations = httpx.post(f"{prefect_api}/automations/filter", json={}).json()
    assert not [a["name"] for a in automations if a["name"].startswith("mqi: ")]


@pytest.mark.integration
def test_mqi_up_makes_the_automations_and_says_so(sshd, tmp_path: Path):
    """`mqi up` where it publishes (`mqi deploy` calls the same apply_notifications after
    its deployments; the test above covers what it does)."""
    from tests.support.pipeline import stop, wait_for, write_installation

    inst = write_installation(tmp_path / "mqi", sshd)
    data = yaml.safe_load(inst.config.read_text())
    data["notifications"] = {"targets": [
        {"name": "ops", "kind": "webhook", "url": "http://127.0.0.1:9/hook",
         "events": ["case_failed", "case_refused"]}]}
    data["processes"] = {"start": ["server", "serve"]}  # publishing needs serve, not more
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    up = inst.start_up()
    try:
        log = inst.root / "up.log"  # what `mqi up` printed, once it said it is up
        said = wait_for(lambda: log.exists() and "Dashboard:" in log.read_text()
                        and log.read_text(), 30, "mqi up's output")
        assert "notification automation 'mqi: case failed -> ops': created\n" in said
        assert "notification automation 'mqi: case refused -> ops': created\n" in said
        found = httpx.post(f"{inst.api_url}/automations/filter", json={}, timeout=10).json()
        assert sorted(a["name"] for a in found) == ["mqi: case failed -> ops",
                                                     "mqi: case refused -> ops"]
        hook = httpx.post(f"{inst.api_url}/block_documents/filter", json={}).json()
        assert [b["block_type"]["slug"] for b in hook if b["name"] == "mqi-notify-ops"] == \
            ["custom-webhook"]
    finally:
        stop(up, grace=60)
