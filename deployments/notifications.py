"""Notifications through Prefect automations, made from the ``notifications`` section.

`mqi up` (where it publishes) and `mqi deploy` call ``apply_notifications``: for
every enabled target and each of its events one automation, named
``mqi: <event> -> <target>``, whose action is Prefect's send-notification with
the target's notification block. The Prefect server evaluates the triggers and
sends the messages; nothing of ours has to run for a notification to go out
(the e-mail block's class aside: blocks/notify.py says how the server finds it).

    case_failed      prefect.flow-run.* of flow process_case whose state type is
                     FAILED or CRASHED (Failed, TimedOut, Crashed, ...)
    gpu_warning      mqi.gpu.warning (flows/curator.py)
    case_incomplete  mqi.case.incomplete (deployments/sensor.py)
    case_refused     mqi.case.refused (deployments/sensor.py)
    case_qa          mqi.case.qa: a dose QA FAIL or REVIEW (flows/dose_qa.py)

What a message may say: the case id (the run's name, the event's resource
name), the flow run's state message and the events' payload texts. Each of those
passed config/redaction.py where it was made (a run's messages in its process,
the sensor's reasons, the curator's warnings); the templates add nothing else
about a case — never its parameters (folder paths) or its logs.

Automations and blocks are ours by name (``mqi: `` and ``mqi-notify-``): those
the configuration no longer names are removed, nothing else is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from config import MqiConfig, MqiError
from config.models import NotificationEvent, NotificationTarget
from deployments import server
from flows.naming import FLOW_NAME

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger

AUTOMATION_PREFIX = "mqi: "
BLOCK_PREFIX = "mqi-notify-"
OWN_BLOCK_TYPES = ("mqi-email", "custom-webhook")
"""The block types ``apply_notifications`` saves: only these are removed when stale."""
EVENT_TITLES: dict[NotificationEvent, str] = {
    "case_failed": "case failed",
    "gpu_warning": "GPU warning",
    "case_incomplete": "case incomplete",
    "case_refused": "case refused",
    "case_qa": "case QA",
}


class NotificationSetupError(MqiError):
    """A notification target cannot be set up (a block that is not there, a variable
    that is not set)."""

    exit_status = 2


@dataclass(frozen=True)
class Template:
    """The subject and body of one event's message (Jinja, rendered by the server)."""

    subject: str
    body: str


def dashboard(cfg: MqiConfig) -> str:
    """The dashboard address the links in messages start with."""
    return (cfg.notifications.dashboard_url or server.ui_url(cfg)).rstrip("/")


def templates(base: str) -> dict[NotificationEvent, Template]:
    """Every event's message. ``base``: the dashboard's address (no Jinja in it)."""
    # The run's state message holds "case <id>: <stage> [beam N] failed: <reason>" (or a
    # stage's summary, then its output's last lines): its first line is the reason.
    # The flow run's parameters (the folder path) are never used.
    case = '{% set case = flow_run.name | replace("case-", "", 1) %}'
    reason = ('{{ (flow_run.state.message or "(no message)").splitlines() | first '
              '| replace("Flow run encountered an exception: ", "") '
              '| replace("StageFailed: ", "") | replace("CaseFailed: ", "") }}')
    when = '{{ event.occurred.strftime("%Y-%m-%d %H:%M:%S UTC") }}'
    events = f"{base}/events?resource={{{{ event.resource.id | urlencode }}}}"
    return {
        "case_failed": Template(
            subject=case + "MQI: case {{ case }} {{ flow_run.state.name | lower }}",
            body=case + "\n".join([
                "Case {{ case }}: its run ended {{ flow_run.state.name }} at " + when + ".",
                "Reason: " + reason,
                "Flow run: " + base + "/runs/flow-run/{{ flow_run.id }}",
                "Rerun it, once the cause is fixed: mqi rerun {{ case }}",
            ])),
        "gpu_warning": Template(
            subject="MQI: GPU warning ({{ event.payload.kind }}) on {{ event.resource.name }}",
            body="\n".join([
                "{{ event.payload.message }}",
                "Where: {{ event.resource.name }}, at " + when + ".",
                "Its events: " + events,
            ])),
        "case_incomplete": Template(
            subject="MQI: case {{ event.resource.name }} still incomplete",
            body="\n".join([
                "The case folder {{ event.resource.name }} in the scan root has waited "
                "{{ event.payload.waited_s }} s and is still not complete: "
                "{{ event.payload.reason }}",
                "Reported at " + when + ".",
                "Its events: " + events,
            ])),
        "case_refused": Template(
            subject="MQI: case folder {{ event.resource.name }} refused",
            body="\n".join([
                "The case folder {{ event.resource.name }} in the scan root was refused: "
                "{{ event.payload.reason }}",
                "Reported at " + when + ".",
                "Its events: " + events,
            ])),
        "case_qa": Template(
            subject="MQI: case {{ event.resource.name }} dose QA {{ event.payload.verdict }}",
            body="\n".join([
                "Case {{ event.resource.name }}: {{ event.payload.summary }}",
                "Reported at " + when + ". The report (with its plots) is in the case's "
                "results folder.",
                "Its events: " + events,
            ])),
    }


def trigger(event: NotificationEvent) -> EventTrigger:
    """The trigger of one kind of event (reactive: every matching event fires)."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    if event == "case_failed":
        # By state type, not name: TimedOut is FAILED too, and a crash is CRASHED.
        return EventTrigger(
            expect={"prefect.flow-run.*"},
            match={"prefect.resource.id": "prefect.flow-run.*",
                   "prefect.state-type": ["FAILED", "CRASHED"]},
            match_related={"prefect.resource.role": "flow",
                           "prefect.resource.name": FLOW_NAME},
            posture=Posture.Reactive, threshold=1, within=timedelta(0))
    name = {"gpu_warning": "mqi.gpu.warning", "case_incomplete": "mqi.case.incomplete",
            "case_refused": "mqi.case.refused", "case_qa": "mqi.case.qa"}[event]
    return EventTrigger(expect={name}, match={"prefect.resource.id": "mqi.*"},
                        posture=Posture.Reactive, threshold=1, within=timedelta(0))


def automation_name(event: NotificationEvent, target: str) -> str:
    return f"{AUTOMATION_PREFIX}{EVENT_TITLES[event]} -> {target}"


def is_ours(name: str) -> bool:
    """True for an automation ``automation_name`` makes (another ``mqi: `` one is not)."""
    return any(name.startswith(f"{AUTOMATION_PREFIX}{title} -> ")
               for title in EVENT_TITLES.values())


def automations(cfg: MqiConfig, blocks: dict[str, UUID]) -> list[AutomationCore]:
    """The automations the configuration asks for; ``blocks``: target name -> its block."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore

    texts = templates(dashboard(cfg))
    out = []
    for target in cfg.notifications.targets:
        if not target.enabled:
            continue
        for event in target.events:
            out.append(AutomationCore(
                name=automation_name(event, target.name),
                description=(f"MQI Communicator: {EVENT_TITLES[event]} to the notification "
                             f"target {target.name!r} (notifications.targets). Made by "
                             f"`mqi up` / `mqi deploy` from the configuration, which "
                             f"overwrite changes made here."),
                enabled=True,
                trigger=trigger(event),
                actions=[SendNotification(block_document_id=blocks[target.name],
                                          subject=texts[event].subject,
                                          body=texts[event].body)]))
    return out


# ------------------------------------------------------------------ target blocks
def block_name(target: str) -> str:
    """The block document made for a webhook or smtp target."""
    return f"{BLOCK_PREFIX}{target}"


def _env(index: int, key: str, variable: str) -> str:
    import os

    value = os.environ.get(variable)
    if value is None:
        raise NotificationSetupError(
            f"notifications.targets[{index}].{key} names the environment variable "
            f"{variable}, which is not set")
    return value


def _existing_block(client: SyncPrefectClient, index: int, ref: str) -> UUID:
    """The id of the notification block ``<type-slug>/<name>`` (or ``<name>``)."""
    from prefect.exceptions import ObjectNotFound

    where = f"notifications.targets[{index}].block"
    slug, _, name = ref.rpartition("/")
    found: list[dict[str, Any]]
    if slug:
        try:
            found = [client.read_block_document_by_name(
                name, slug, include_secrets=False).model_dump(mode="json")]
        except ObjectNotFound:
            found = []
    else:
        response = client.request("POST", "/block_documents/filter", json={
            "block_documents": {"name": {"any_": [name]}}, "include_secrets": False})
        found = response.json()
    if not found:
        raise NotificationSetupError(f"{where}: no block {ref!r} on the Prefect server (make "
                                     f"it on the dashboard's Blocks page first)")
    if len(found) > 1:
        kinds = ", ".join(sorted(f"{d['block_type']['slug']}/{name}" for d in found))
        raise NotificationSetupError(f"{where}: several blocks are named {name!r} ({kinds}): "
                                     f"say which, as <type-slug>/{name}")
    doc = found[0]
    capabilities = (doc.get("block_schema") or {}).get("capabilities") or []
    if "notify" not in capabilities:
        raise NotificationSetupError(f"{where}: {ref!r} is a {doc['block_type']['slug']} "
                                     f"block, which cannot send notifications")
    return UUID(doc["id"])


def _saved_block(index: int, target: NotificationTarget) -> UUID:
    """Save the block a webhook or smtp target is sent through; its id."""
    from pydantic import SecretStr

    from blocks.notify import MqiEmail

    name = block_name(target.name)
    if target.kind == "smtp":
        MqiEmail.register_type_and_schema()
        password = _env(index, "password_env", target.password_env) \
            if target.password_env else None
        email = MqiEmail(
            smtp_host=target.host or "", smtp_port=target.port,
            from_address=target.sender or "", to_addresses=list(target.to),
            username=target.username,
            password=SecretStr(password) if password is not None else None,
            starttls=target.starttls, ssl=target.ssl)
        return UUID(str(email.save(name, overwrite=True)))
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.types import SecretDict

    # Secrets (a URL with a token, header values) live in the block's secret values,
    # filled into the request where Prefect builds it; the rest is shown as written.
    secrets: dict[str, str] = {}
    url = target.url or ""
    if target.url_env:
        secrets["url"] = _env(index, "url_env", target.url_env)
        url = "{{url}}"
    headers = dict(target.headers)
    for i, (header, variable) in enumerate(sorted(target.headers_env.items())):
        secrets[f"header{i}"] = _env(index, f"headers_env.{header}", variable)
        headers[header] = f"{{{{header{i}}}}}"
    hook = CustomWebhookNotificationBlock(
        name=name, url=url, method=target.method, headers=headers or None, cookies=None,
        json_data=dict(target.payload) if target.payload is not None
        else {"subject": "{{subject}}", "body": "{{body}}"},
        secrets=SecretDict(secrets))
    return UUID(str(hook.save(name, overwrite=True)))


def target_blocks(client: SyncPrefectClient, cfg: MqiConfig) -> dict[str, UUID]:
    """Each enabled target's notification block: found (kind block) or saved.

    Raises:
        NotificationSetupError: A block is missing or cannot notify; a variable is unset.
    """
    out: dict[str, UUID] = {}
    for index, target in enumerate(cfg.notifications.targets):
        if not target.enabled:
            continue
        out[target.name] = _existing_block(client, index, target.block or "") \
            if target.kind == "block" else _saved_block(index, target)
    return out


# ------------------------------------------------------------------ applying
def _same(existing: Automation, wanted: AutomationCore) -> bool:
    keys = {"description", "enabled", "trigger", "actions", "actions_on_trigger",
            "actions_on_resolve"}
    return existing.model_dump(include=keys) == wanted.model_dump(include=keys)


def apply_notifications(cfg: MqiConfig) -> list[str]:
    """Create, update or remove our automations to match the configuration.

    Returns:
        One line per automation (created, updated, unchanged, removed), for the terminal.

    Raises:
        NotificationSetupError: A target cannot be set up; no automation was changed then.
    """
    from prefect.client.orchestration import get_client

    lines: list[str] = []
    with get_client(sync_client=True) as client:
        wanted = automations(cfg, target_blocks(client, cfg))
        ours: dict[str, list[Automation]] = {}
        for found in _all_automations(client):
            if is_ours(found.name):
                ours.setdefault(found.name, []).append(found)
        for automation in wanted:
            same_name = ours.pop(automation.name, [])
            for extra in same_name[1:]:  # made twice by hand: keep one
                client.delete_automation(extra.id)
            if not same_name:
                client.create_automation(automation)
                verb = "created"
            elif not _same(same_name[0], automation):
                client.update_automation(same_name[0].id, automation)
                verb = "updated"
            else:
                verb = "unchanged"
            lines.append(f"notification automation {automation.name!r}: {verb}")
        for name, stale in sorted(ours.items()):
            for automation in stale:
                client.delete_automation(automation.id)
            lines.append(f"notification automation {name!r}: removed (no longer configured)")
        _remove_stale_blocks(client, {block_name(t.name) for t in cfg.notifications.targets
                                      if t.enabled and t.kind != "block"})
    return lines


def _all_automations(client: SyncPrefectClient, page: int = 200) -> list[Automation]:
    """Every automation on the server (the API answers a page at a time)."""
    found: list[Automation] = []
    while True:
        batch = client.read_automations(limit=page, offset=len(found))
        found += batch
        if len(batch) < page:
            return found


def _remove_stale_blocks(client: SyncPrefectClient, keep: set[str]) -> None:
    """Delete the blocks we saved for targets that are gone or disabled: an SMTP
    password must not outlive its target."""
    response = client.request("POST", "/block_documents/filter", json={
        "block_documents": {"name": {"like_": BLOCK_PREFIX}}, "include_secrets": False})
    for doc in response.json():
        if doc["name"].startswith(BLOCK_PREFIX) and doc["name"] not in keep \
                and doc["block_type"]["slug"] in OWN_BLOCK_TYPES:
            client.delete_block_document(UUID(doc["id"]))
