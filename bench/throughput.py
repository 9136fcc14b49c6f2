"""Throughput benchmark: N cases x B beams x S s on G simulated GPUs, dropped at once.

    python -m bench.throughput [--cases 40] [--beams 2] [--sim-seconds 3] [--gpus 4]
                               [--layers 2] [--max-concurrent N] [--timeout 900]
    python -m bench.throughput --cases 200 --sim-seconds 1      # memory stays flat?
    python -m bench.throughput --shell-rc     # sessions read this account's ~/.bashrc

Starts `mqi up` (server, serve, sensor) on a test installation whose GPU host is a
real sshd on this machine running the simulated tools, writes the cases in a
staging folder (ready marker included) and moves them into the scan root in one
go. From that moment until every flow run is in a final state it samples, every
~0.5 s, the number of RUNNING flow runs (the API) and the RSS and PSS of `mqi up`
and every process below it (/proc/<pid>/smaps_rollup; the simulators run under
sshd and are not counted). Then it prints:

- makespan (drop -> last run's end), the ideal cases*beams*S/G, their ratio;
- GPU utilisation from the simulators' own records: simulation busy time over
  G x the window from the first simulation start to the last simulation end, and
  over G x the makespan;
- the most flow runs RUNNING at once (sampled, and exact from the runs' times);
- per beam, where its time goes: waiting for a GPU slot (task run started ->
  Prefect's prefect.concurrency-limit.acquired event), choosing an index (-> the
  "GPU i is ours" log line), launch (-> the simulator's own start record: SSH,
  flock, interpreter start), the simulation, and the release (-> the .released
  event -> the task run's end);
- the window's GPU-seconds split into busy, idle while beams waited (of which a
  slot was free: admission delay) and idle with no beam ready (starved: the
  cases' other stages or the cases not yet started could not feed the GPUs),
  the GPU-seconds slots were held without a simulation running, and how many
  beams waited for a slot while one was free;
- per GPU: idle gaps between consecutive simulations while beams were waiting;
- a coarse timeline, and peak RSS/PSS of the process tree against its idle figure
  measured before the drop in the same run.

It measures, it asserts nothing about timings; it exits 1 on timeout (after
printing what it has) and 2 when a run did not complete or a case ran twice.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.memory_up import pss_kib, rss_kib
from blocks import procfs
from flows.naming import DEPLOYMENT, SIMULATION_TASK, run_name

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
SAMPLE_SECONDS = 0.5
RUNS_EVERY = 4  # fetch the runs themselves (to see whether all are final) every 4th sample
ADMITTED = re.compile(r"beam (\d+): GPU (\d+) is ours")
INPUT = re.compile(r"/run-([0-9a-f]{8})/moqui/beam_(\d+)\.in$")
EVENTS_PAGE = 50  # the most /events/filter gives per page
WAITED_WHILE_FREE = 0.5  # s of admission wait with a free slot before a beam counts


@dataclass
class Sample:
    t: float
    running: int | None
    rss_kib: int
    pss_kib: int
    processes: int


@dataclass
class Beam:
    """One simulation: its task run (Prefect) matched with the simulator's record."""

    case: str
    beam: int
    ready: float | None = None      # simulate_beam task run started (waits for admission)
    acquired: float | None = None   # its GPU admission slot acquired (Prefect's event)
    chosen: float | None = None     # "GPU i is ours" logged: an index chosen and locked
    sim_start: float | None = None  # tps_env recorded its start
    sim_end: float | None = None
    released: float | None = None   # the slot released (Prefect's event)
    done: float | None = None       # task run ended
    gpu: int | None = None
    arrival: float | None = None    # its case's arrival: the flow run's expected start

    @property
    def slot_from(self) -> float | None:
        return self.acquired or self.chosen or self.sim_start

    @property
    def slot_until(self) -> float | None:
        return self.released or self.done or self.sim_end


@dataclass
class Measured:
    drop: float
    idle: tuple[int, int, int] = (0, 0, 0)  # rss, pss, processes before the drop
    samples: list[Sample] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, float] = field(default_factory=dict)  # task run id -> when
    slots: dict[str, dict[str, float]] = field(default_factory=dict)  # acquired/released
    sims: dict[int, list[tuple[float, float, str]]] = field(default_factory=dict)
    collisions: int = 0
    timed_out: bool = False
    finished_seen: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # part -> CPU s during the run
    sim_cpu: dict[str, float] = field(default_factory=dict)  # simulator -> its own CPU s


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


class Api:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)

    def paged(self, path: str, body: dict[str, Any], limit: int = 200) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.client.post(path, json={**body, "limit": limit, "offset": len(out)})
            page.raise_for_status()
            rows = page.json()
            out += rows
            if len(rows) < limit:
                return out

    def deployment_ready(self) -> bool:
        flow, name = DEPLOYMENT.split("/")
        try:
            return self.client.get(f"/deployments/name/{flow}/{name}").status_code == 200
        except httpx.HTTPError:
            return False

    def running(self) -> int:
        reply = self.client.post("/flow_runs/count", json={
            "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}})
        reply.raise_for_status()
        return int(reply.json())

    def runs(self, names: list[str]) -> list[dict[str, Any]]:
        return self.paged("/flow_runs/filter", {"flow_runs": {"name": {"any_": names}}})

    def sim_tasks(self, flow_run_ids: list[str]) -> list[dict[str, Any]]:
        rows = self.paged("/task_runs/filter", {
            "flow_runs": {"id": {"any_": flow_run_ids}},
            "task_runs": {"name": {"like_": "run_moqui_sim"}}})
        return [r for r in rows if SIMULATION_TASK.fullmatch(r["name"])]

    def chosen(self, task_run_ids: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        for i in range(0, len(task_run_ids), 100):
            logs = self.paged("/logs/filter", {
                "logs": {"task_run_id": {"any_": task_run_ids[i:i + 100]}},
                "sort": "TIMESTAMP_ASC"})
            for log in logs:
                when = ts(log["timestamp"])
                if ADMITTED.search(log["message"]) and when is not None:
                    found.setdefault(log["task_run_id"], when)
        return found

    def slot_events(self, limit_name: str, since: float) -> dict[str, dict[str, float]]:
        """task run id -> {"acquired": t, "released": t} from Prefect's own
        prefect.concurrency-limit.* events (emitted by the flow-run process)."""
        page = self.client.post("/events/filter", json={"limit": EVENTS_PAGE, "filter": {
            "event": {"prefix": ["prefect.concurrency-limit."]},
            "occurred": {"since": datetime.fromtimestamp(since, UTC).isoformat(),
                         "until": datetime.now(UTC).isoformat()}}})
        found: dict[str, dict[str, float]] = defaultdict(dict)
        while True:
            page.raise_for_status()
            body = page.json()
            for event in body["events"]:
                if event["resource"].get("prefect.resource.name") != limit_name:
                    continue
                phase = event["event"].rsplit(".", 1)[-1]
                when = ts(event["occurred"])
                for related in event.get("related", []):
                    rid = related.get("prefect.resource.id", "")
                    if rid.startswith("prefect.task-run.") and when is not None:
                        found[rid.removeprefix("prefect.task-run.")][phase] = when
            if not body.get("next_page"):
                return dict(found)
            page = self.client.get(body["next_page"])


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS KiB, PSS KiB, processes) of ``root`` and every process below it."""
    from deployments.supervisor import descendants

    pids = [root, *descendants(root)]
    return sum(map(rss_kib, pids)), sum(map(pss_kib, pids)), len(pids)


def _cpu_ticks(pid: int) -> int:
    """User + system ticks of ``pid`` and of its children it has reaped (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
    except OSError:
        return 0
    return sum(int(f) for f in fields[11:15])  # utime stime cutime cstime


def cpu_by_part(up_pid: int, sshd_pid: int | None) -> dict[str, float]:
    """CPU seconds used so far by each part: each child of `mqi up` with everything
    below it (named by its role), `mqi up` itself, and the sshd with its sessions and
    the simulators. A process that ended counts in its reaper's children's time."""
    from deployments.supervisor import descendants

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {"mqi up": _cpu_ticks(up_pid) / tick}
    roles = ("housekeeping", "sensor", "server", "serve")  # first match wins
    children = [p.pid for p in procfs.all_stats() if p.ppid == up_pid]
    for child in children:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        role = next((r for r in roles if r in argv), f"pid {child}")
        total = sum(_cpu_ticks(p) for p in [child, *descendants(child)])
        out[role] = out.get(role, 0.0) + total / tick
    if sshd_pid is not None:
        out["sshd + simulators"] = sum(
            _cpu_ticks(p) for p in [sshd_pid, *descendants(sshd_pid)]) / tick
    return out


def all_final(runs: list[dict[str, Any]], names: list[str]) -> bool:
    return ({r["name"] for r in runs} >= set(names)
            and all(r["state"]["type"] in FINAL for r in runs))


def setup_installation(work: Path, sshd: Any, args: argparse.Namespace) -> Any:
    from tests.support.pipeline import write_installation

    inst = write_installation(work / "mqi", sshd)
    data = yaml.safe_load(inst.config.read_text())
    data["scanner"].update(stability_seconds=1.0)
    if args.max_concurrent is not None:
        data.setdefault("cases", {})["max_concurrent"] = args.max_concurrent
    if args.database_url:
        data["prefect"]["database_url"] = args.database_url
    inst.config.write_text(yaml.safe_dump(data, sort_keys=False))
    inst.set_control(duration=args.sim_seconds, batches=args.batches, gpus=args.gpus)
    return inst


def stage_cases(staging: Path, args: argparse.Namespace, marker: str) -> list[Path]:
    from demo.synthetic_case import write_case

    return [write_case(staging, f"tp-{i:04d}", beams=args.beams, layers=args.layers,
                       spots_per_layer=args.spots, ready_marker=marker, seed=i)
            for i in range(args.cases)]


def measure(inst: Any, api: Api, up_pid: int, staged: list[Path],
            args: argparse.Namespace, sshd_pid: int | None = None) -> Measured:
    names = [run_name(p.name) for p in staged]
    deadline = time.monotonic() + 120
    while not api.deployment_ready():  # serve has registered process_case
        if time.monotonic() > deadline:
            raise RuntimeError("the process_case deployment did not appear within 120 s")
        time.sleep(0.5)
    idle = []
    for _ in range(int(args.settle / SAMPLE_SECONDS) or 1):  # idle memory: the baseline
        idle.append(tree_memory(up_pid))
        time.sleep(SAMPLE_SECONDS)
    cpu_before = cpu_by_part(up_pid, sshd_pid)
    out = Measured(drop=time.time(), idle=max(idle))
    for path in staged:  # one go: every case arrives complete, marker included
        os.replace(path, inst.scan_root / path.name)
    end_by = time.monotonic() + args.timeout
    tick = 0
    while True:
        started = time.monotonic()
        rss, pss, procs = tree_memory(up_pid)
        try:
            running: int | None = api.running()
            if tick % RUNS_EVERY == 0:
                out.runs = api.runs(names)
        except httpx.HTTPError as exc:
            running = None
            print(f"  (API call failed at +{time.time() - out.drop:.1f} s: {exc})", flush=True)
        out.samples.append(Sample(time.time(), running, rss, pss, procs))
        if tick % RUNS_EVERY == 0 and all_final(out.runs, names):
            out.finished_seen = time.time()
            break
        if time.monotonic() > end_by:
            out.timed_out = True
            break
        if tick % 20 == 0:
            states = Counter(r["state"]["type"] for r in out.runs)
            print(f"  +{time.time() - out.drop:6.1f} s: {running} running, "
                  f"{dict(sorted(states.items()))}, {rss / 1024:.0f} MiB RSS", flush=True)
        tick += 1
        time.sleep(max(0.0, SAMPLE_SECONDS - (time.monotonic() - started)))
    cpu_after = cpu_by_part(up_pid, sshd_pid)
    out.cpu = {part: cpu_after[part] - cpu_before.get(part, 0.0) for part in cpu_after}
    collect(inst, api, names, out)
    return out


def collect(inst: Any, api: Api, names: list[str], out: Measured) -> None:
    """What the API and the simulators' record say, once the runs are over (or not)."""
    limit_name = yaml.safe_load(inst.config.read_text())["gpu"]["concurrency_limit"]
    try:
        out.runs = api.runs(names)
        out.tasks = api.sim_tasks([r["id"] for r in out.runs])
        out.chosen = api.chosen([t["id"] for t in out.tasks])
    except httpx.HTTPError as exc:
        print(f"  (could not read the runs' details: {exc})", flush=True)
    try:
        # Events reach the server's store a little after they are sent: wait until
        # every simulation task has its pair (or 20 s have passed).
        deadline = time.monotonic() + 20
        while True:
            out.slots = api.slot_events(limit_name, out.drop - 60)
            paired = sum(1 for v in out.slots.values() if len(v) == 2)
            if paired >= len(out.tasks) or time.monotonic() > deadline:
                break
            time.sleep(2)
    except httpx.HTTPError as exc:
        print(f"  (could not read the concurrency-limit events: {exc})", flush=True)
    out.sims = dict(inst.sim_intervals())
    out.collisions = sum(1 for e in inst.events("tps_env") if e["event"] == "collision")
    # Each simulator's own CPU: the largest `cpu` any of its records gives, per process.
    latest: dict[tuple[str, int], float] = {}
    for e in inst.events():
        key = (e["tool"], e["pid"])
        latest[key] = max(latest.get(key, 0.0), float(e.get("cpu", 0.0)))
    for (tool, _), secs in latest.items():
        out.sim_cpu[tool] = out.sim_cpu.get(tool, 0.0) + secs


def beams_of(out: Measured) -> list[Beam]:
    by_id = {r["id"]: r for r in out.runs}
    beams: dict[tuple[str, int], Beam] = {}
    short: dict[str, str] = {}  # short run id -> case
    for r in out.runs:
        short[r["id"].replace("-", "")[:8]] = r["name"]
    for task in out.tasks:
        match = SIMULATION_TASK.fullmatch(task["name"])
        run = by_id.get(task["flow_run_id"])
        if match is None or run is None:
            continue
        slot = out.slots.get(task["id"], {})
        b = Beam(run["name"], int(match.group(1)), ready=ts(task["start_time"]),
                 done=ts(task["end_time"]), chosen=out.chosen.get(task["id"]),
                 acquired=slot.get("acquired"), released=slot.get("released"),
                 arrival=ts(run.get("expected_start_time")))
        beams[(run["id"].replace("-", "")[:8], b.beam)] = b
    for gpu, spans in out.sims.items():
        for start, end, path in spans:
            found = INPUT.search(path)
            if found is None:
                continue
            key = (found.group(1), int(found.group(2)))
            b = beams.setdefault(key, Beam(short.get(key[0], "?"), key[1]))
            b.sim_start, b.sim_end, b.gpu = start, end, gpu
    return list(beams.values())


def passed_by_newer(beams: list[Beam]) -> list[tuple[int, Beam]]:
    """For each beam, how many beams of cases that arrived later took a GPU slot while it
    was already waiting for one (0 everywhere: admission in arrival order)."""
    known = [b for b in beams if b.arrival is not None and b.ready is not None
             and b.acquired is not None]
    return [(sum(1 for o in known if o.arrival > a.arrival  # type: ignore[operator]
                 and a.ready < o.acquired < a.acquired), a)  # type: ignore[operator]
            for a in known]


def concurrency(spans: Iterable[tuple[float, float]]) -> int:
    points = sorted((t, d) for s, e in spans for t, d in ((s, 1), (e, -1)))
    now = most = 0
    for _, delta in points:
        now += delta
        most = max(most, now)
    return most


class Steps:
    """Counts that change only at given instants: how many intervals cover each moment."""

    def __init__(self, **kinds: list[tuple[float, float]]) -> None:
        points = sorted({t for spans in kinds.values() for span in spans for t in span})
        self.points = points
        self.counts: dict[str, list[int]] = {}
        for kind, spans in kinds.items():
            delta: dict[float, int] = defaultdict(int)
            for start, end in spans:
                if end > start:
                    delta[start] += 1
                    delta[end] -= 1
            now, counts = 0, []
            for t in points:
                now += delta.get(t, 0)
                counts.append(now)  # on [points[i], points[i + 1])
            self.counts[kind] = counts

    def at(self, kind: str, t: float) -> int:
        i = bisect.bisect_right(self.points, t) - 1
        return self.counts[kind][i] if 0 <= i < len(self.points) else 0

    def integral(self, start: float, end: float, value: Callable[[int], float]) -> float:
        """Integral over [start, end] of ``value(i)``, i the index of the segment."""
        total = 0.0
        i = max(0, bisect.bisect_right(self.points, start) - 1)
        while i < len(self.points) - 1 and self.points[i] < end:
            a, b = max(start, self.points[i]), min(end, self.points[i + 1])
            if b > a:
                total += value(i) * (b - a)
            i += 1
        return total


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return (f"median {statistics.median(values):6.2f}  p90 {p90:6.2f}  max {values[-1]:6.2f}"
            f"  (n={len(values)})")


def report(out: Measured, args: argparse.Namespace) -> int:
    g, drop = args.gpus, out.drop
    names = {run_name(f"tp-{i:04d}") for i in range(args.cases)}
    per_name = Counter(r["name"] for r in out.runs)
    states = Counter(r["state"]["type"] for r in out.runs)
    ends = [e for r in out.runs if (e := ts(r.get("end_time"))) is not None]
    done = not out.timed_out and all_final(out.runs, sorted(names))
    last = max(ends) if done and ends else (out.samples[-1].t if out.samples else time.time())
    makespan = last - drop
    ideal = args.cases * args.beams * args.sim_seconds / g
    spans = [(s, e, gpu) for gpu, rows in out.sims.items() for s, e, _ in rows]
    busy = sum(e - s for s, e, _ in spans)
    window = (max(e for _, e, _ in spans) - min(s for s, _, _ in spans)) if spans else 0.0
    run_spans = [(s, e if e is not None else last) for r in out.runs
                 if (s := ts(r.get("start_time"))) is not None
                 for e in [ts(r.get("end_time"))]]
    sampled = [s.running for s in out.samples if s.running is not None]
    beams = beams_of(out)
    passed_beams = passed_by_newer(beams)
    passed = [n for n, _ in passed_beams]

    print(f"\n== {args.cases} cases x {args.beams} beams x {args.sim_seconds:g} s on {g} "
          f"simulated GPUs (max_concurrent: {args.max_concurrent}, "
          f"{'PostgreSQL' if args.database_url else 'SQLite'})"
          + ("  ** TIMED OUT: partial figures **" if out.timed_out else ""))

    # -- per beam: where a beam's time goes -------------------------------------------
    print("\nper beam (s):")
    def gaps_of(pairs: Iterable[tuple[float | None, float | None]]) -> list[float]:
        return [b - a for a, b in pairs if a is not None and b is not None]

    for what, pairs in (
            ("waiting for a GPU slot", [(b.ready, b.acquired) for b in beams]),
            ("choosing an index (slot->ours)", [(b.acquired, b.chosen) for b in beams]),
            ("launch (ours->tool started)", [(b.chosen, b.sim_start) for b in beams]),
            ("simulation", [(b.sim_start, b.sim_end) for b in beams]),
            ("tool ended->slot released", [(b.sim_end, b.released) for b in beams]),
            ("slot released->task ended", [(b.released, b.done) for b in beams])):
        print(f"  {what:<31} {stats(gaps_of(pairs))}")
    if not out.slots:
        print("  (no prefect.concurrency-limit events: slot times taken from the log and "
              "the simulator's record)")

    # -- per case: the stages around the simulations ------------------------------------
    first_ready: dict[str, float] = {}
    last_sim: dict[str, float] = {}
    for b in beams:
        if b.ready:
            first_ready[b.case] = min(first_ready.get(b.case, b.ready), b.ready)
        if b.sim_end:
            last_sim[b.case] = max(last_sim.get(b.case, b.sim_end), b.sim_end)
    created = [c - drop for r in out.runs if (c := ts(r.get("created"))) is not None]
    started = [s - drop for s, _ in run_spans]
    pre = [first_ready[r["name"]] - s for r in out.runs
           if (s := ts(r.get("start_time"))) and r["name"] in first_ready]
    post = [e - last_sim[r["name"]] for r in out.runs
            if (e := ts(r.get("end_time"))) and r["name"] in last_sim]
    print("\nper flow run (s):")
    print(f"  {'created after the drop':<31} {stats(created)}")
    print(f"  {'RUNNING after the drop':<31} {stats(started)}")
    print(f"  {'start -> first beam task':<31} {stats(pre)}")
    print(f"  {'last sim end -> run end':<31} {stats(post)}")

    # -- GPUs: idle gaps while beams were waiting ---------------------------------------
    def span(start: float | None, end: float | None) -> list[tuple[float, float]]:
        return [] if start is None else [(start, last if end is None else end)]

    steps = Steps(
        # ready (task run started) but not simulating yet
        waiting=[x for bm in beams for x in span(bm.ready, bm.sim_start)],
        # ready but no admission slot yet
        awaiting=[x for bm in beams for x in span(bm.ready, bm.slot_from)],
        # admission slots held
        held=[x for bm in beams for x in span(bm.slot_from, bm.slot_until)],
        busy=[(s, e) for s, e, _ in spans],
        running=run_spans)

    def waiting_at(t: float) -> int:
        return steps.at("waiting", t)

    print("\nidle gaps between simulations on one GPU while beams were waiting (s):")
    all_gaps: list[float] = []
    for gpu in sorted(out.sims):
        mine = sorted(out.sims[gpu])
        gaps = [nxt[0] - cur[1] for cur, nxt in zip(mine, mine[1:], strict=False)
                if waiting_at(cur[1]) > 0]
        all_gaps += gaps
        lead = mine[0][0] - min(s for s, _, _ in spans) if mine else 0.0
        print(f"  GPU {gpu}: {len(mine):3d} sims, busy {sum(e - s for s, e, _ in mine):6.1f}, "
              f"first start +{lead:4.1f} after the first; gaps {stats(gaps)}, "
              f"sum {sum(gaps):.1f}")
    print(f"  all GPUs: {stats(all_gaps)}")

    # GPU time over the simulation window = busy + idle while beams waited + idle with
    # nothing to run (no beam had reached its simulation: the cases' other stages, or
    # the cases not started, could not feed the GPUs).
    counts = steps.counts
    w0 = min((s for s, _, _ in spans), default=drop)
    w1 = max((e for _, e, _ in spans), default=drop)
    lost = steps.integral(w0, w1, lambda i: min(counts["waiting"][i], g - counts["busy"][i]))
    starved = g * window - busy - lost
    lost_slot_free = steps.integral(
        w0, w1, lambda i: min(counts["awaiting"][i], max(0, g - counts["held"][i])))
    held_not_busy = steps.integral(w0, w1, lambda i: max(0, counts["held"][i] - counts["busy"][i]))
    waited_free = [steps.integral(bm.ready, bm.slot_from or bm.ready,
                                  lambda i: 1.0 if counts["held"][i] < g else 0.0)
                   for bm in beams if bm.ready is not None]

    # -- timeline ------------------------------------------------------------------------
    print("\ntimeline (from the drop):")
    print(f"  {'t s':>6} {'runs RUNNING':>12} {'beams waiting':>13} {'GPUs busy':>9} "
          f"{'slots held':>10} {'RSS MiB':>8} {'PSS MiB':>8}")
    for k in range(11):
        t = drop + makespan * k / 10
        near = min(out.samples, key=lambda s: abs(s.t - t)) if out.samples else None
        rss, pss = (near.rss_kib / 1024, near.pss_kib / 1024) if near else (0.0, 0.0)
        print(f"  {t - drop:6.1f} {steps.at('running', t):12d} {waiting_at(t):13d} "
              f"{steps.at('busy', t):9d} {steps.at('held', t):10d} {rss:8.0f} {pss:8.0f}")

    # -- the table -----------------------------------------------------------------------
    peak_rss = max(out.samples, key=lambda s: s.rss_kib) if out.samples else None
    peak_pss = max(out.samples, key=lambda s: s.pss_kib) if out.samples else None
    idle_rss, idle_pss, idle_procs = out.idle
    most = concurrency(run_spans)
    duplicates = sum(n - 1 for n in per_name.values() if n > 1)
    completed = done and states.get("COMPLETED", 0) == len(out.runs) == args.cases
    rows: list[tuple[str, str]] = [
        ("makespan (drop -> last run end)", f"{makespan:.1f} s"
         + ("" if done else " (not finished: so far)")),
        ("ideal (cases*beams*S/G)", f"{ideal:.1f} s"),
        ("makespan / ideal", f"{makespan / ideal:.2f}" if ideal else "-"),
        ("simulations recorded", f"{len(spans)} of {args.cases * args.beams}"
         + (f", {out.collisions} GPU collisions" if out.collisions else "")),
        ("sim window (first start -> last end)", f"{window:.1f} s"),
        ("GPU utilisation over the window", f"{busy / (g * window):.1%}" if window else "-"),
        ("GPU utilisation over the makespan",
         f"{busy / (g * makespan):.1%}" if makespan > 0 else "-"),
        ("GPU-s in the window", f"{g * window:.1f} = busy {busy:.1f} + idle while beams "
         f"waited {lost:.1f} + idle, no beam ready {starved:.1f}"),
        ("  idle while a beam waited, slot free", f"{lost_slot_free:.1f} GPU-s (admission)"),
        ("  slots held, GPU not simulating", f"{held_not_busy:.1f} GPU-s (choose, launch, "
         "release)"),
        (f"beams waiting >{WAITED_WHILE_FREE:g} s with a free slot",
         f"{sum(1 for w in waited_free if w > WAITED_WHILE_FREE)} of {len(waited_free)}"
         + (f" (max {max(waited_free):.1f} s)" if waited_free else "")),
        ("beams passed by a newer case's beam",
         f"{sum(1 for n in passed if n)} of {len(passed)}"
         + (f" ({sum(passed)} times, at most {max(passed)} for one beam)" if passed else "")),
        ("flow runs RUNNING at once (max)",
         f"{max(sampled, default=0)} sampled, {most} from the runs' times"),
        ("idle tree (before the drop)",
         f"{idle_rss / 1024:.0f} MiB RSS / {idle_pss / 1024:.0f} MiB PSS, {idle_procs} procs"),
        ("peak RSS of the tree", f"{peak_rss.rss_kib / 1024:.0f} MiB in {peak_rss.processes}"
         f" procs ({peak_rss.rss_kib / max(idle_rss, 1):.2f} x idle)" if peak_rss else "-"),
        ("peak PSS of the tree", f"{peak_pss.pss_kib / 1024:.0f} MiB in {peak_pss.processes}"
         f" procs ({peak_pss.pss_kib / max(idle_pss, 1):.2f} x idle)" if peak_pss else "-"),
        ("PSS per flow run at peak (approx.)",
         f"{(peak_pss.pss_kib - idle_pss) / 1024 / most:.0f} MiB"
         if peak_pss and most else "-"),
        ("all COMPLETED", f"{'yes' if completed else 'NO'}: {dict(sorted(states.items()))}"
         + ("" if len(per_name) == args.cases else f", runs for {len(per_name)} of "
            f"{args.cases} cases")),
        ("duplicate runs (>1 run per case)", f"{duplicates}"),
    ]
    failed = Counter(f"{r['state']['type']}: {(r['state'].get('message') or '')[:160]}"
                     for r in out.runs if r["state"]["type"] != "COMPLETED")
    if failed:
        print("\nruns not COMPLETED, by state message:")
        for message, n in failed.most_common(6):
            print(f"  {n:3d} x {message}")
    print()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    for n, b in sorted(passed_beams, key=lambda x: -x[0])[:3]:
        if n:
            print(f"  passed {n} times: {b.case} beam {b.beam} (arrived {b.arrival:.3f}, "
                  f"ready {b.ready:.3f}, slot {b.acquired:.3f})")
    if out.cpu:
        # Where the machine's CPU went from the drop to the last run's end: on a
        # small machine the cases' own overhead, not the GPUs, can set the pace.
        total = sum(out.cpu.values())
        seen = (out.finished_seen or last) - drop
        print(f"\nCPU time from the drop to the end ({seen:.1f} s wall, {os.cpu_count()} cores: "
              f"{total:.1f} CPU s = {total / max(seen, 1e-9):.2f} cores busy, "
              f"{total / max(args.cases, 1):.2f} CPU s per case):")
        for part, secs in sorted(out.cpu.items(), key=lambda kv: -kv[1]):
            print(f"  {part:<{width}}  {secs:7.1f} s  ({secs / max(total, 1e-9):5.1%}, "
                  f"{secs / max(args.cases, 1):.2f} s per case)")
            if part.startswith("sshd") and out.sim_cpu:
                # The GPU host's share split: the simulated tools (not ours: the clinic's
                # tools run there) and the rest (sshd, the account's shell per session).
                for tool, own in sorted(out.sim_cpu.items(), key=lambda kv: -kv[1]):
                    print(f"    {tool:<{width - 2}}  {own:7.1f} s  "
                          f"({own / max(args.cases, 1):.2f} s per case)")
                rest = secs - sum(out.sim_cpu.values())
                print(f"    {'the rest: sshd, shells, nvidia-smi':<{width - 2}}  {rest:7.1f} s  "
                      f"({rest / max(args.cases, 1):.2f} s per case)")
    sys.stdout.flush()
    if out.timed_out:
        return 1
    return 0 if completed and duplicates == 0 else 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--sim-seconds", type=float, default=3.0)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="energy layers per beam")
    parser.add_argument("--spots", type=int, default=20, help="spots per layer")
    parser.add_argument("--batches", type=int, default=5,
                        help="progress lines each simulation prints (streamed as logs)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="set cases.max_concurrent in the installation's config")
    parser.add_argument("--shell-rc", action="store_true",
                        help="the GPU host's sessions read this account's ~/.bashrc, as a "
                             "real host's do (tests/support/sshd.py: shell_rc)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds of idle memory sampling before the drop")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="give up (print what there is, exit 1) this long after the drop")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--postgres", action="store_true",
                        help="the embedded server on a fresh PostgreSQL database (the local "
                             "cluster, or one of its own: tests/support/postgres.py) "
                             "instead of SQLite")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from tests.support.pipeline import stop
    from tests.support.sshd import SshServer

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-throughput-"))
    sshd: SshServer | None = None
    up = None
    code = 1
    database = contextlib.ExitStack()
    args.database_url = None
    if args.postgres:
        from tests.support.postgres import postgres_database

        args.database_url = database.enter_context(postgres_database())
    try:
        sshd = SshServer(work / "sshd", shell_rc=args.shell_rc).start()
        inst = setup_installation(work, sshd, args)
        marker = yaml.safe_load(inst.config.read_text())["scanner"]["ready_marker"]
        t = time.monotonic()
        staged = stage_cases(work / "staging", args, marker)
        print(f"staged {len(staged)} cases in {time.monotonic() - t:.1f} s; starting mqi up",
              flush=True)
        up = inst.start_up()
        api = Api(inst.api_url)
        out = measure(inst, api, up.pid, staged, args,
                      sshd.process.pid if sshd.process is not None else None)
        code = report(out, args)
    finally:
        if up is not None:
            stop(up, grace=90)
        if sshd is not None:
            sshd.stop()
        database.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
