"""Typed configuration: one pydantic model per section of the YAML file.

Every model forbids unknown keys, so a misspelt setting is an error rather than
a silently ignored default. Checks that span sections (a workflow naming a
step with no command, a template using an unknown placeholder) live in
``cross_section_issues`` so that each problem is reported at its own key path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from config.schedules import check_cron, check_timezone
from config.templates import TemplateError, check_placeholders


def _local_path(value: object, info: ValidationInfo) -> object:
    """Expand ``~`` and ``$VARS``; a relative path is relative to the config file's folder."""
    if not isinstance(value, str | Path):
        return value  # let the Path validator report the wrong type
    path = Path(os.path.expandvars(os.path.expanduser(str(value))))
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return path


LocalPath = Annotated[Path, BeforeValidator(_local_path)]
"""A path on the machine that runs MQI Communicator."""
RemotePath = Annotated[str, StringConstraints(min_length=1)]
"""A path on the GPU host: kept as written (no expansion here)."""
Port = Annotated[int, Field(ge=1, le=65535)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
PositiveSeconds = Annotated[float, Field(gt=0)]
Seconds = Annotated[float, Field(ge=0)]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Section(BaseModel):
    # Defaults are validated too, so a default path gets the same expansion as a written one.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PrefectSettings(Section):
    """Where the Prefect API (the state store) is, or how to start the embedded one."""

    api_url: str | None = Field(
        default=None, description="URL of an existing Prefect API; null: `mqi up` starts the "
        "embedded server at server_host:server_port.")
    server_host: str = "127.0.0.1"
    server_port: Port = 4200
    database_url: str | None = Field(
        default=None, description="null: SQLite under paths.data_dir. Otherwise a "
        "postgresql+asyncpg:// URL (password from database_password_env).")
    database_password_env: EnvName | None = None
    runner_poll_seconds: PositiveSeconds = 0.5
    warm_start: bool = Field(
        default=True, description="Fork each flow run from a process that has already "
        "imported the pipeline, instead of starting a fresh interpreter (~2 s) per case.")
    result_storage: LocalPath | None = Field(
        default=None, description="Folder of the stage results every process (serve, "
        "workers, the CLI) reuses; null: <data_dir>/prefect/storage. Several machines: a "
        "folder all of them mount at the same path.")
    result_storage_block: str | None = Field(
        default=None, pattern=r"^[a-z0-9-]+/[a-z0-9-]+$",
        description="A Prefect filesystem block ('<type-slug>/<name>', e.g. "
        "remote-file-system/mqi-results) to keep the results in instead of a folder.")

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(sqlite\+aiosqlite|postgresql\+asyncpg)://",
                                              value):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @property
    def effective_api_url(self) -> str:
        return self.api_url or f"http://{self.server_host}:{self.server_port}/api"


class PathsSettings(Section):
    data_dir: LocalPath = Path("~/.mqi")
    results_root: LocalPath = Path("~/mqi/results")
    remote_work_root: RemotePath = "/tmp/mqi/cases"
    clean_remote_work_dir: bool = True


class ScannerSettings(Section):
    target_directory: LocalPath
    observer: Literal["inotify", "polling"] = "inotify"
    polling_interval_seconds: PositiveSeconds = 5.0
    stability_seconds: Seconds = 30.0
    rescan_interval_seconds: PositiveSeconds = 300.0
    incomplete_report_after_seconds: PositiveSeconds = 600.0
    ready_marker: Annotated[str, StringConstraints(pattern=r"^[^/\x00]+$")] = "_CASE_READY"


class CasesSettings(Section):
    id_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
    patient_id_in_logs: Literal["never", "hash"] = "hash"
    max_concurrent: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Most cases (flow runs) in flight at once per installation; "
        "the others wait as Scheduled (QUEUED). null: the usable GPUs + 2.")

    @field_validator("id_pattern")
    @classmethod
    def _valid_anchored_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if not (value.startswith("^") and value.endswith("$")):
            raise ValueError("must be anchored with ^ and $ so the whole id is checked")
        # A case id names folders locally and on the GPU host: it must never be
        # able to climb out of them or be empty.
        for bad in ("", ".", "..", "a/b", "../a", "a\nb", "a\0b"):
            if re.fullmatch(value, bad):
                raise ValueError(f"must not accept {bad!r} as a case id")
        return value


class HostSettings(Section):
    kind: Literal["ssh", "local"]
    hostname: str | None = None
    port: Port = 22
    username: str | None = None
    private_key_path: LocalPath | None = None
    private_key_env: EnvName | None = None
    passphrase_env: EnvName | None = None
    password_env: EnvName | None = None
    known_hosts_path: LocalPath = Path("~/.ssh/known_hosts")
    auto_add_host_keys: bool = False
    connect_timeout_seconds: PositiveSeconds = 10.0
    keepalive_seconds: Annotated[int, Field(ge=0)] = 30
    transfer_idle_seconds: PositiveSeconds = Field(
        default=120.0, description="ssh hosts: a transfer that sends or receives nothing for "
        "this long fails as a lost connection (a stalled host or link), instead of waiting "
        "for ever.")
    connect_retries: Annotated[int, Field(ge=0, le=20)] = 3
    kill_grace_seconds: Seconds = 5.0
    working_dir: LocalPath | None = Field(
        default=None, description="local hosts: folder commands run in (default: the current "
        "one).")
    prefer_this_python: bool = Field(
        default=False, description="local hosts: put the Python that runs MQI Communicator "
        "first on PATH, so `python3` in commands is the one with its packages (the demo).")


class GpuHostEntry(Section):
    """One host of a pool of several GPU hosts (``gpu.hosts``)."""

    host: Identifier = Field(..., description="A name in hosts.")
    lock_dir: RemotePath | None = Field(
        default=None, description="This host's GPU lock folder; null: gpu.lock_dir.")
    remote_work_root: RemotePath | None = Field(
        default=None, description="This host's work folder; null: paths.remote_work_root.")


def _host_entry(value: object) -> object:
    """``gpu.hosts`` items may be a bare host name: ``[gpu_a, gpu_b]``."""
    return {"host": value} if isinstance(value, str) else value


class GpuSettings(Section):
    host: str = Field(default="gpu", description="The GPU host, when gpu.hosts is empty.")
    hosts: list[Annotated[GpuHostEntry, BeforeValidator(_host_entry)]] = Field(
        default=[], description="Several GPU hosts in one pool (each a name in hosts, or "
        "{host, lock_dir, remote_work_root}); empty: the one host gpu.host.")
    source: Literal["nvidia-smi", "nvml"] = "nvidia-smi"
    query_command: str = (
        "nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,"
        "utilization.gpu,temperature.gpu --format=csv,noheader,nounits")
    apps_command: str = (
        "nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits")
    indices: list[Annotated[int, Field(ge=0)]] | None = None
    min_free_memory_mib: Annotated[int, Field(ge=0)] = 8192
    skip_gpus_with_foreign_processes: bool = True
    concurrency_limit: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]+$")] = \
        "mqi-gpu"
    lease_seconds: Annotated[int, Field(ge=60)] = 300
    lock_dir: RemotePath = "/tmp/mqi/gpu-locks"
    set_cuda_visible_devices: bool = False
    poll_seconds: PositiveSeconds = 2.0
    max_slot_wait_seconds: PositiveSeconds = 1.0
    max_wait_seconds: PositiveSeconds = 3600.0
    query_timeout_seconds: PositiveSeconds = 30.0
    host_retry_seconds: PositiveSeconds = Field(
        default=30.0, description="Several GPU hosts: a host that did not answer is asked "
        "again after this long (its GPUs are out of the pool meanwhile).")

    @property
    def host_names(self) -> list[str]:
        """The GPU hosts, in order: gpu.hosts, or gpu.host alone."""
        return [e.host for e in self.hosts] if self.hosts else [self.host]

    @property
    def several_hosts(self) -> bool:
        """True when the pool spans more than one host (placement chooses among them)."""
        return len(self.hosts) > 1

    @property
    def primary(self) -> str:
        """The one GPU host, or the first of several."""
        return self.host_names[0]

    def host_entry(self, name: str) -> GpuHostEntry:
        """The entry of one GPU host (its own lock_dir and remote_work_root, if any)."""
        for entry in self.hosts:
            if entry.host == name:
                return entry
        return GpuHostEntry(host=name)


class RestartPolicy(Section):
    max_restarts: Annotated[int, Field(ge=0)] = 5
    backoff_initial_seconds: PositiveSeconds = 1.0
    backoff_max_seconds: PositiveSeconds = 60.0


class ProcessesSettings(Section):
    start: list[Literal["server", "serve", "sensor"]] = ["server", "serve", "sensor"]
    restart: RestartPolicy = RestartPolicy()


class MoquiSettings(Section):
    input_template: str
    output_format: Literal["raw", "mhd", "mha", "npz", "dcm"] = "raw"
    random_seed: int = -1932780356
    gantry_numbers: dict[str, Annotated[int, Field(ge=1, le=2)]] = {"G1": 1, "G2": 2}
    parameters: dict[Identifier, str | int | float | bool] = {}
    success_pattern: str = "Total execution time"
    failure_patterns: list[str] = ["FATAL ERROR", "ERROR:", "Segmentation fault"]


class StepPolicy(Section):
    retries: Annotated[int, Field(ge=0, le=10)] | None = None
    retry_delay_seconds: Seconds | None = None
    backoff_factor: Annotated[float, Field(ge=1)] | None = None
    timeout_seconds: PositiveSeconds | None = None


class RetriesSettings(Section):
    default: StepPolicy = StepPolicy(retries=2, retry_delay_seconds=30, backoff_factor=2,
                                     timeout_seconds=3600)
    steps: dict[str, StepPolicy] = {}


class ArchiverSettings(Section):
    """The scheduled archiver (flows/archiver.py, docs/archiver.md)."""

    enabled: bool = Field(
        default=True, description="false: the archive-cases deployment is not served and its "
        "schedule makes no runs (`mqi archive` still runs by hand).")
    schedule_cron: str = Field(
        default="0 3 * * *", description="When it runs: minute hour day month weekday.")
    schedule_timezone: str = Field(
        default="UTC", description="The IANA time zone schedule_cron is read in.")
    keep_days: Annotated[int, Field(ge=0)] = Field(
        default=30, description="A case is archived once its newest process_case run "
        "COMPLETED more than this many days ago; 0: at the first run after it completed.")
    archive_dir: LocalPath = Path("~/mqi/archive")
    include_inputs: bool = Field(
        default=True, description="Pack the case folder from the scan root too (when it is "
        "still there), and delete it after verification; false: results only.")
    include_failed: bool = Field(
        default=False, description="Also archive cases whose newest run FAILED, CRASHED or "
        "was CANCELLED that long ago; false: left alone for the operator.")
    prune_runs_after_days: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Delete finished Prefect flow runs of MQI (with their task "
        "runs and artifacts; their logs at the server's orphan vacuum) that ended more than "
        "this many days ago, except a case's newest run while its folders exist; null: never.")

    @field_validator("schedule_cron")
    @classmethod
    def _cron_line(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("schedule_timezone")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        return check_timezone(value)


class CuratorSettings(Section):
    """The scheduled GPU curator (flows/curator.py, docs/curator.md)."""

    enabled: bool = Field(
        default=True, description="false: the curate-gpus deployment's schedule makes no runs "
        "(`mqi gpus` still reads the GPUs by hand).")
    interval_seconds: PositiveSeconds = 60.0
    max_temperature_c: Annotated[float, Field(gt=0)] = Field(
        default=85.0, description="A GPU hotter than this raises a mqi.gpu.warning event.")
    zombie_after_seconds: PositiveSeconds = Field(
        default=300.0, description="A RUNNING process_case run whose remote stage has no "
        "process left on the GPU host, and that said nothing (log line, state change) for "
        "this long, is marked Crashed. Keep it well above 30 s: a stage waiting for a GPU "
        "logs every 30 s.")
    remove_work_dirs_after_hours: Annotated[float, Field(ge=0)] | None = Field(
        default=72.0, description="The remote work folder of a run that COMPLETED more than "
        "this long ago is removed (only under paths.remote_work_root); null: never.")
    dry_run: bool = Field(
        default=False, description="Report stale processes, zombie runs and leftover folders "
        "without killing, marking or removing anything.")


NotificationEvent = Literal["case_failed", "gpu_warning", "case_incomplete", "case_refused",
                            "case_qa"]
"""What a notification target can be told of (deployments/notifications.py)."""
DEFAULT_NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = (
    "case_failed", "gpu_warning", "case_incomplete")
EmailAddress = Annotated[str, StringConstraints(pattern=r"^[^@\s<>,]+@[^@\s<>,]+$")]
NOTIFICATION_KEYS: dict[str, frozenset[str]] = {
    "block": frozenset({"block"}),
    "webhook": frozenset({"url", "url_env", "method", "headers", "headers_env", "payload"}),
    "smtp": frozenset({"host", "port", "from", "to", "username", "password_env", "starttls",
                       "ssl"}),
}
"""The keys of each kind of notification target, beside name, kind, enabled and events."""
WEBHOOK_PLACEHOLDERS = frozenset({"subject", "body"})


class NotificationTarget(Section):
    """Where notifications go: an existing Prefect notification block, a webhook or SMTP.

    One flat model for the three kinds, so that every problem is reported at its own
    key path; which keys belong to which kind is checked in ``cross_section_issues``.
    """

    # "from" is a Python keyword: the field is ``sender``, the key (both ways) "from".
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              serialize_by_alias=True)

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")] = Field(
        ..., description="Names the target's automations (`mqi: case failed -> <name>`) and "
        "the block made for it (mqi-notify-<name>): lowercase letters, digits, dashes.")
    kind: Literal["block", "webhook", "smtp"]
    enabled: bool = Field(
        default=True, description="false: its automations are removed (nothing is sent).")
    events: list[NotificationEvent] = Field(
        default=list(DEFAULT_NOTIFICATION_EVENTS), min_length=1,
        description="What it is told of: case_failed, gpu_warning, case_incomplete, "
        "case_refused, case_qa (a dose QA FAIL or REVIEW).")
    block: str | None = Field(
        default=None, pattern=r"^([a-z0-9-]+/)?[A-Za-z0-9][A-Za-z0-9 ._-]*$",
        description="kind block: an existing notification block, '<type-slug>/<name>' "
        "(e.g. slack-webhook/physics) or its name alone when no other block has it.")
    url: str | None = Field(
        default=None, pattern=r"^https?://\S+$", description="kind webhook: the URL.")
    url_env: EnvName | None = Field(
        default=None, description="kind webhook: a variable holding the URL instead (for "
        "URLs that carry a token).")
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = {}
    headers_env: dict[str, EnvName] = Field(
        default={}, description="kind webhook: headers whose values (tokens) come from "
        "these variables.")
    payload: dict[str, str] | None = Field(
        default=None, description="kind webhook: the JSON object sent, its values templates "
        "with {{subject}} and {{body}}; null: {subject: '{{subject}}', body: '{{body}}'}.")
    host: str | None = Field(default=None, description="kind smtp: the SMTP server.")
    port: Port = 587
    sender: EmailAddress | None = Field(default=None, alias="from")
    to: list[EmailAddress] = []
    username: str | None = None
    password_env: EnvName | None = None
    starttls: bool = True
    ssl: bool = Field(default=False, description="kind smtp: implicit TLS (port 465); "
                                                 "starttls must then be false.")

    @model_serializer(mode="wrap")
    def _own_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The other kinds' keys are noise in `mqi config check` and the published
        # configuration; left out, they read back as their defaults.
        data: dict[str, Any] = handler(self)
        keep = NOTIFICATION_KEYS[self.kind] | {"name", "kind", "enabled", "events"}
        return {k: v for k, v in data.items() if k in keep}

    @property
    def keys_given(self) -> set[str]:
        """The keys given a value other than their default, as written ("from", not
        "sender"). Not merely "set": the published configuration (every key, defaults
        included) is validated again on load."""
        fields = type(self).model_fields
        return {fields[f].alias or f for f in self.model_fields_set
                if getattr(self, f) != fields[f].get_default(call_default_factory=True)}


class NotificationsSettings(Section):
    """Notifications through Prefect automations (deployments/notifications.py,
    docs/notifications.md)."""

    dashboard_url: str | None = Field(
        # no braces: it is written into the messages' (Jinja) templates as it is
        default=None, pattern=r"^https?://[^\s{}]+$",
        description="The dashboard's address as recipients open it, for the links; null: "
        "the embedded server's address (or prefect.api_url without /api).")
    targets: list[NotificationTarget] = Field(
        default=[], description="Each gets its events; none: no automations.")


class GammaCriterion(Section):
    """One gamma criterion: a dose difference (percent) and a distance to agreement."""

    dose_percent: Annotated[float, Field(gt=0, le=100)]
    distance_mm: Annotated[float, Field(gt=0, le=50)]
    decides: bool = Field(
        default=True, description="Its pass rate decides the verdict; false: reported "
        "beside the deciding ones only.")


class DoseQaSettings(Section):
    """The compare_dose step: recomputed dose vs the plan's reference RT Dose (gamma
    analysis with pymedphys; flows/dose_qa.py, docs/dose-qa.md)."""

    reference_root: LocalPath | None = Field(
        default=None, description="Also look for reference RT Doses in "
        "<reference_root>/<case_id>/ (beside RD*.dcm in the case folder); null: only there.")
    required: bool = Field(
        default=False, description="true: a case without a reference dose for every beam "
        "(or for the plan) FAILS; false: it completes with QA 'not assessed'.")
    criteria: list[GammaCriterion] = Field(
        default=[GammaCriterion(dose_percent=3, distance_mm=2),
                 GammaCriterion(dose_percent=2, distance_mm=2, decides=False)],
        min_length=1)
    lower_cutoff_percent: Annotated[float, Field(ge=0, lt=100)] = Field(
        default=10.0, description="Reference voxels below this percent of the reference "
        "maximum are not evaluated (TG-218: 10).")
    local_gamma: bool = Field(
        default=False, description="false: global normalisation (the reference maximum).")
    tolerance_percent: Annotated[float, Field(ge=0, le=100)] = Field(
        default=95.0, description="Pass rate at or above it: PASS.")
    action_percent: Annotated[float, Field(ge=0, le=100)] = Field(
        default=90.0, description="Pass rate below it: FAIL; between the two: REVIEW.")
    max_gamma: Annotated[float, Field(gt=1)] | None = Field(
        default=1.5, description="Stop searching beyond this gamma (pymedphys max_gamma); "
        "null: search on (slow where a dose fails).")
    interp_fraction: Annotated[int, Field(ge=1, le=20)] = Field(
        default=5, description="Search step: the distance criterion / this.")
    random_subset: Annotated[int, Field(ge=1000)] | None = Field(
        default=20000, description="Evaluate this many randomly chosen reference voxels "
        "above the cutoff (a few seconds on a 150x150x100 grid); null: all of them.")
    random_seed: int = Field(default=0, description="Makes the random subset reproducible.")
    plots: bool = Field(default=True, description="A PNG per comparison (profiles, "
                                                  "gamma histogram).")

    @field_validator("action_percent")
    @classmethod
    def _action_below_tolerance(cls, value: float, info: ValidationInfo) -> float:
        tolerance = info.data.get("tolerance_percent")
        if tolerance is not None and value > tolerance:
            raise ValueError(f"must not be above tolerance_percent ({tolerance})")
        return value


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stream_command_output: bool = True


class MqiConfig(Section):
    """The whole configuration. Sections without defaults must be present in the file."""

    prefect: PrefectSettings
    paths: PathsSettings
    scanner: ScannerSettings
    cases: CasesSettings = CasesSettings()
    hosts: dict[Identifier, HostSettings]
    gpu: GpuSettings
    processes: ProcessesSettings = ProcessesSettings()
    tools: dict[Identifier, str | list[str]] = Field(
        default={}, description="Paths (or argument lists) of the tools on the GPU host; each "
        "key is a placeholder in remote_commands, every word shell-quoted when filled in.")
    workflows: dict[Identifier, list[str]]
    remote_commands: dict[Identifier, str]
    moqui: MoquiSettings
    retries: RetriesSettings = RetriesSettings()
    archiver: ArchiverSettings = ArchiverSettings()
    curator: CuratorSettings = CuratorSettings()
    notifications: NotificationsSettings = NotificationsSettings()
    dose_qa: DoseQaSettings = DoseQaSettings()
    logging: LoggingSettings = LoggingSettings()
    simulated: bool = Field(
        default=False, description="True when the tools are the bundled simulators: every "
        "output is then labelled SIMULATED.")

    def policy(self, step: str) -> StepPolicy:
        """The retry/timeout policy of a step: its own settings over the defaults."""
        own = self.retries.steps.get(step)
        if own is None:
            return self.retries.default
        merged = self.retries.default.model_dump() | own.model_dump(exclude_none=True)
        return StepPolicy(**merged)


# ------------------------------------------------------------------ placeholders
CASE_PLACEHOLDERS = frozenset({"case_id", "case_dir", "work_dir", "output_dir", "log_dir"})
BEAM_PLACEHOLDERS = CASE_PLACEHOLDERS | {"beam_number", "beam_name", "beam_dir"}
STEP_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "run_interpreter": CASE_PLACEHOLDERS,
    "run_moqui_sim": BEAM_PLACEHOLDERS | {"gpu_id", "input_file", "raw_dir"},
    "convert_to_dicom": BEAM_PLACEHOLDERS | {"raw_dir", "dicom_dir"},
}
"""Values the code offers to each built-in step's command; other steps get the case's.

``flows.layout.RemoteLayout.step_values`` builds exactly these values; a test
holds the two together."""
GPU_STEP = "run_moqui_sim"
"""The step that holds one GPU while it runs."""
BEAM_STEPS = frozenset(s for s, names in STEP_PLACEHOLDERS.items() if "beam_number" in names)
"""Steps that run once per beam (as one chain per beam, beams in parallel)."""
MOQUI_PLACEHOLDERS = frozenset({
    "case_id", "gpu_id", "parent_dir", "dicom_dir", "log_dir", "output_dir", "beam_number",
    "gantry_num", "output_format", "random_seed"})
QA_STEP = "compare_dose"
"""The dose QA step: runs here (no remote command), after the results are verified."""
LOCAL_STEPS = frozenset({QA_STEP})
"""Workflow steps that run on this machine, not on the GPU host."""
BUILTIN_STAGES = frozenset({"inspect", "upload", "download", "verify", "report", QA_STEP})
SECRET_KEYS = re.compile(r"(password|passphrase|private_key|secret|token|api_key)$")


def step_placeholders(step: str, tools: dict[str, str | list[str]]) -> frozenset[str]:
    """The placeholders a command template of ``step`` may use."""
    return STEP_PLACEHOLDERS.get(step, CASE_PLACEHOLDERS) | set(tools)


def cross_section_issues(cfg: MqiConfig) -> list[tuple[str, str]]:
    """Checks that need more than one section; returns (key path, message) pairs."""
    issues: list[tuple[str, str]] = []
    for name, host in cfg.hosts.items():
        if host.kind != "ssh":
            continue
        for key in ("hostname", "username"):
            if not getattr(host, key):
                issues.append((f"hosts.{name}.{key}", "required for an ssh host"))
        if host.working_dir or host.prefer_this_python:
            issues.append((f"hosts.{name}", "working_dir and prefer_this_python are for "
                                            "local hosts only"))
    if cfg.gpu.hosts:
        issues += gpu_host_issues(cfg)
    elif cfg.gpu.host not in cfg.hosts:
        issues.append(("gpu.host", f"no host named {cfg.gpu.host!r} in hosts "
                                   f"(have: {', '.join(cfg.hosts) or 'none'})"))
    elif cfg.gpu.source == "nvml" and cfg.hosts[cfg.gpu.host].kind != "local":
        issues.append(("gpu.source", "nvml reads GPUs of this machine only: use nvidia-smi "
                                     f"for the ssh host {cfg.gpu.host!r}"))
    for name in cfg.tools:
        if any(name in s for s in (*STEP_PLACEHOLDERS.values(), CASE_PLACEHOLDERS)):
            issues.append((f"tools.{name}", "clashes with a placeholder the code fills in"))
    if not cfg.workflows:
        issues.append(("workflows", "at least one workflow is needed"))
    for wf, steps in cfg.workflows.items():
        if not steps:
            issues.append((f"workflows.{wf}", "a workflow needs at least one step"))
        for i, step in enumerate(steps):
            if step in LOCAL_STEPS:
                if i != len(steps) - 1:
                    issues.append((f"workflows.{wf}[{i}]", f"{step} runs on the verified "
                                                          f"results: it must be the last step"))
            elif step not in cfg.remote_commands:
                issues.append((f"workflows.{wf}[{i}]", f"no remote command {step!r}"))
        for step in {s for s in steps if steps.count(s) > 1}:
            issues.append((f"workflows.{wf}", f"step {step!r} appears more than once"))
    for step, template in cfg.remote_commands.items():
        try:
            check_placeholders(template, step_placeholders(step, cfg.tools))
        except TemplateError as exc:
            issues.append((f"remote_commands.{step}", str(exc)))
    for name in cfg.moqui.parameters:
        if name in MOQUI_PLACEHOLDERS:
            issues.append((f"moqui.parameters.{name}", "clashes with a value the code fills in"))
    try:
        check_placeholders(cfg.moqui.input_template,
                           MOQUI_PLACEHOLDERS | set(cfg.moqui.parameters))
    except TemplateError as exc:
        issues.append(("moqui.input_template", str(exc)))
    archive = Path(cfg.archiver.archive_dir).resolve()
    for key, folder in (("scanner.target_directory", cfg.scanner.target_directory),
                        ("paths.results_root", cfg.paths.results_root)):
        if archive.is_relative_to(Path(folder).resolve()):
            # the sensor would take it for a case, or it would be archived into itself
            issues.append(("archiver.archive_dir", f"must not be inside {key}"))
    known_steps = BUILTIN_STAGES | set(cfg.remote_commands)
    for step in cfg.retries.steps:
        if step not in known_steps:
            issues.append((f"retries.steps.{step}",
                           f"no such step (known: {', '.join(sorted(known_steps))})"))
    issues += notification_issues(cfg.notifications)
    return issues


def gpu_host_issues(cfg: MqiConfig) -> list[tuple[str, str]]:
    """``gpu.hosts``: known, ssh or local hosts named once; nvml only for one local host;
    case steps only before the per-beam steps (they run on each host the beams use)."""
    issues: list[tuple[str, str]] = []
    gpu = cfg.gpu
    if gpu.host != GpuSettings.model_fields["host"].default and gpu.host not in gpu.host_names:
        issues.append(("gpu.host", "gpu.hosts lists the GPU hosts: leave gpu.host out (or "
                                   "name one of them)"))
    names = gpu.host_names
    for i, name in enumerate(names):
        if name not in cfg.hosts:
            issues.append((f"gpu.hosts[{i}].host", f"no host named {name!r} in hosts "
                                                   f"(have: {', '.join(cfg.hosts) or 'none'})"))
        if names.index(name) != i:
            issues.append((f"gpu.hosts[{i}].host", f"{name!r} is listed twice"))
        elif [n.lower() for n in names].index(name.lower()) != i:
            # each is published as block mqi-gpu-host-<name in lowercase>
            issues.append((f"gpu.hosts[{i}].host", f"{name!r} differs from another GPU host "
                                                   f"only in case"))
    if gpu.source == "nvml" and (len(names) > 1 or any(
            n in cfg.hosts and cfg.hosts[n].kind != "local" for n in names)):
        issues.append(("gpu.source", "nvml reads GPUs of this machine only: use nvidia-smi "
                                     "with several GPU hosts or an ssh host"))
    if len(names) > 1:
        for wf, steps in cfg.workflows.items():
            beam_at = [i for i, s in enumerate(steps) if s in BEAM_STEPS]
            # (steps on this machine, compare_dose, run after the results are back)
            late = [s for i, s in enumerate(steps) if beam_at and i > beam_at[0]
                    and s not in BEAM_STEPS and s not in LOCAL_STEPS]
            if late:
                issues.append((f"workflows.{wf}", f"with several GPU hosts, case steps "
                                                  f"({', '.join(late)}) must come before the "
                                                  f"per-beam steps"))
    return issues


def notification_issues(section: NotificationsSettings) -> list[tuple[str, str]]:
    """What each kind of notification target needs, and keys of another kind."""
    issues: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, target in enumerate(section.targets):
        at = f"notifications.targets[{i}]"
        if target.name in seen:
            issues.append((f"{at}.name", f"another target is named {target.name!r}"))
        seen.add(target.name)
        for event in {e for e in target.events if target.events.count(e) > 1}:
            issues.append((f"{at}.events", f"{event} appears more than once"))
        own = NOTIFICATION_KEYS[target.kind]
        a = "an" if target.kind == "smtp" else "a"
        for key in sorted(target.keys_given - own - {"name", "kind", "enabled", "events"}):
            issues.append((f"{at}.{key}", f"not a key of {a} {target.kind} target (its keys: "
                                          f"{', '.join(sorted(own))})"))
        if target.kind == "block" and target.block is None:
            issues.append((f"{at}.block", "required for a block target"))
        elif target.kind == "webhook":
            if (target.url is None) == (target.url_env is None):
                issues.append((f"{at}.url", "a webhook target needs url or url_env (one)"))
            for key, value in (target.payload or {}).items():
                unknown = set(re.findall(r"{{\s*([^{}\s]*)\s*}}", value)) - WEBHOOK_PLACEHOLDERS
                if unknown:
                    issues.append((f"{at}.payload.{key}",
                                   f"unknown placeholder(s) {', '.join(sorted(unknown))} "
                                   f"(known: subject, body)"))
            for name in set(target.headers) & set(target.headers_env):
                issues.append((f"{at}.headers_env.{name}", "also in headers"))
        elif target.kind == "smtp":
            given: dict[str, object] = {"host": target.host, "from": target.sender,
                                        "to": target.to}
            for needed, got in given.items():
                if not got:
                    issues.append((f"{at}.{needed}", "required for an smtp target"))
            if target.ssl and target.starttls:
                issues.append((f"{at}.ssl", "implicit TLS and starttls exclude each other: "
                                            "set starttls false"))
            if target.password_env and not target.username:
                issues.append((f"{at}.username", "required with password_env"))
    return issues


def secret_hint(key: Any) -> str:
    """Extra words for an unknown key that looks like a secret."""
    if isinstance(key, str) and SECRET_KEYS.search(key):
        return (f"; secrets never live in the YAML file: name an environment variable with "
                f"{key}_env (or store it in a Prefect block)")
    return ""
