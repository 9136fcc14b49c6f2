"""What the GPU host says, in one round trip: its GPUs and compute processes, who holds
each GPU's index lock, our runs' work folders and pid files, and which process groups live.

The curator (flows/curator.py) and ``mqi gpus`` read the host through ``survey`` and
decide everything else here, on this side. The lock holders are read from
``/proc/locks`` rather than by trying each lock (``flock -n``, as
``GpuPool.locked_indices`` does): a probe holds the lock for a moment, and a
simulation starting at that moment would lose its GPU to the curator.

The GPU host needs a POSIX ``sh``, ``ps``, ``awk``, ``stat`` and ``find`` (Linux:
procps, coreutils, findutils), besides what docs/gpu-allocation.md lists.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from blocks.gpu_pool import ComputeApp, GpuInfo, GpuPool, parse_compute_apps, parse_gpu_query
from blocks.host import Host

_APPS_START, _APPS_END = "---mqi-survey-apps---", "---mqi-survey-end---"
_LOCK_FILE = re.compile(r"gpu-(\d+)\.lock")
_PID_FILE = re.compile(r"(?P<step>[A-Za-z_][A-Za-z0-9_]*?)(?:-beam(?P<beam>\d+))?\.pid")
_SHORT = re.compile(r"run-([0-9a-f]{8})")
LOOKS = 3
"""Looks at most, while a compute process ends during one (``ended_during_look``)."""


@dataclass(frozen=True)
class LockHolder:
    """The process holding one GPU's lock file, as ``/proc/locks`` names it.

    Attributes:
        pid: The process that took the lock (``flock``, the leader of its group).
        pgid: Its process group; the pid itself when that process is gone but a
            child still holds the inherited descriptor (our wrapper makes ``flock``
            the leader, so the two are the same).
    """

    pid: int
    pgid: int


@dataclass(frozen=True)
class PidFile:
    """A pid file of one stage of one flow run: ``<root>/<case>/run-<short>/pids/<name>``.

    Attributes:
        path: Its path on the host.
        case_id: The folder name above the run folder (not yet checked as a case id).
        short: The 8 hex digits of the run folder.
        step: The step (``run_moqui_sim``), from the file name.
        beam: The beam number, for per-beam steps.
        pgid: The process group the stage ran as; None when the file held no number.
        mtime: When it was written (host clock, epoch seconds).
    """

    path: str
    case_id: str
    short: str
    step: str
    beam: int | None
    pgid: int | None
    mtime: float


@dataclass(frozen=True)
class RunFolder:
    """A run's work folder ``<root>/<case>/run-<short>`` on the host."""

    path: str
    case_id: str
    short: str
    mtime: float


@dataclass
class HostSurvey:
    """Everything one look at the GPU host found.

    Attributes:
        gpus: What the GPU query reported.
        apps: The compute processes.
        lock_files: GPU index → the lock file exists (an index never used has none).
        holders: GPU index → who holds its lock now; an index missing is free.
        groups: pid → process group of every process (zombies left out).
        args: pid → command line, only for processes whose command line names the
            remote work root or the lock folder (the survey's own processes left out).
        pid_files: Every stage pid file under the remote work root.
        folders: Every run folder under the remote work root.
        now: The host's clock when it was read (epoch seconds): remote ages are
            measured against it, not against this machine's clock.
        before: The pids that lived just before the GPUs were read (None: not known).
    """

    gpus: list[GpuInfo]
    apps: list[ComputeApp]
    lock_files: set[int] = field(default_factory=set)
    holders: dict[int, LockHolder] = field(default_factory=dict)
    groups: dict[int, int] = field(default_factory=dict)
    args: dict[int, str] = field(default_factory=dict)
    pid_files: list[PidFile] = field(default_factory=list)
    folders: list[RunFolder] = field(default_factory=list)
    now: float = 0.0
    before: set[int] | None = None

    def ended_during_look(self) -> list[int]:
        """Compute processes that lived as the GPUs were read and are gone from the
        process table read after: their GPU's lock may have been let go meanwhile, and
        a process the table does not show would pass for a foreign one (an unusable
        GPU, a false warning, a smaller limit). Such a look is taken again."""
        if self.before is None:
            return []
        return [a.pid for a in self.apps if a.pid in self.before and a.pid not in self.groups]

    @property
    def live_groups(self) -> set[int]:
        return set(self.groups.values())

    def group_alive(self, pgid: int | None) -> bool:
        return pgid is not None and pgid in self.live_groups

    def group_args(self, pgid: int) -> list[str]:
        """Command lines of the group's members that name the work root or the lock folder."""
        return [a for pid, a in sorted(self.args.items()) if self.groups.get(pid) == pgid]


def survey_script(pool: GpuPool, remote_root: str, *, query: bool) -> str:
    """The one shell command that prints everything ``parse_survey`` reads.

    Args:
        pool: The GPU pool (its commands and lock folder).
        remote_root: ``paths.remote_work_root``; "" to look at no folders.
        query: Run the pool's nvidia-smi commands too (not for NVML, read here).
    """
    lock_dir = shlex.quote(pool.lock_dir.rstrip("/") or "/")
    root = shlex.quote(remote_root)
    parts = []
    if query:
        # a failing query's own words (nvidia-smi prints them on stdout) go to stderr
        fail = "{ s=$?; printf '%s\\n' \"$OUT\" >&2; exit $s; }"
        # the pids alive before the query: a simulation that ends between the query and
        # the process table below is told from a process of another pid namespace
        parts.append("b=$(ps -eo pid= | tr -s ' \\n' ' ')")
        parts.append(f"q=$({pool.query_command}) || {fail.replace('OUT', 'q')}; "
                     f"a=$({pool.apps_command}) || {fail.replace('OUT', 'a')}; "
                     f"printf '%s\\n{_APPS_START}\\n%s\\n{_APPS_END}\\n' \"$q\" \"$a\"; "
                     "echo \"before $b\"")
    parts += [
        "echo \"now $(date +%s)\"",
        # lock files: index, then the file system's device number and the inode, which
        # /proc/locks names as <hex major>:<hex minor>:<inode>
        f"for f in {lock_dir}/gpu-*.lock; do [ -e \"$f\" ] && "
        f"echo \"lockfile ${{f##*/}} $(stat -L -c '%d:%i' \"$f\")\"; done",
        # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"; waiters ("->") shift
        "awk '$2==\"FLOCK\" {print \"flock\", $5, $6}' /proc/locks 2>/dev/null",
        "me=$(ps -o pgid= -p $$ | tr -d ' ')",
        "ps -eo pid=,pgid=,stat= | awk '$3 !~ /^Z/ {print \"proc\", $1, $2}'",
        # command lines only of what names our folders (never the rest of the host's);
        # values through the environment, so awk sees no escape sequences in them
        f"ps -eo pid=,pgid=,args= | R={root} L={lock_dir} ME=\"$me\" awk "
        "'$2 != ENVIRON[\"ME\"] && ((ENVIRON[\"R\"] != \"\" && index($0, ENVIRON[\"R\"])) "
        "|| index($0, ENVIRON[\"L\"])) {print \"args\", $0}'",
    ]
    if remote_root:
        # -H: the root itself may be a link; nothing below it is followed
        parts += [
            f"find -H {root} -mindepth 2 -maxdepth 2 -type d -name 'run-*' "
            "-exec stat -c 'folder %Y %n' {} + 2>/dev/null",
            f"find -H {root} -mindepth 4 -maxdepth 4 -type f -path '*/run-*/pids/*.pid' "
            "-exec sh -c 'for f; do printf \"pidfile %s %s %s\\n\" \"$(stat -c %Y \"$f\")\" "
            "\"$(head -c 32 \"$f\" | tr -dc 0-9)\" \"$f\"; done' sh {} + 2>/dev/null",
        ]
    return "; ".join(parts) + "; true"


def _relative(root: str, path: str) -> list[str] | None:
    """``path``'s parts below ``root``; None when it is not below it."""
    root = root.rstrip("/") or "/"
    if not path.startswith(root + "/"):
        return None
    return path[len(root) + 1:].split("/")


def parse_survey(text: str, remote_root: str, gpus: list[GpuInfo] | None = None,
                 apps: list[ComputeApp] | None = None,
                 before: set[int] | None = None) -> HostSurvey:
    """Read ``survey_script``'s output (``gpus``/``apps``: already read, through NVML).

    Raises:
        GpuQueryError: The GPU query printed something that is not nvidia-smi CSV.
    """
    if gpus is None or apps is None:
        query, _, rest = text.partition(f"{_APPS_START}\n")
        apps_text, _, text = rest.partition(f"{_APPS_END}\n")
        gpus, apps = parse_gpu_query(query), parse_compute_apps(apps_text)
    found = HostSurvey(gpus=gpus, apps=apps, before=before)
    lock_ids: dict[tuple[int, int, int], int] = {}
    flocks: list[tuple[int, tuple[int, int, int]]] = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        words = rest.split()
        try:
            if kind == "now":
                found.now = float(words[0])
            elif kind == "before":
                found.before = {int(w) for w in words}
            elif kind == "lockfile":
                match = _LOCK_FILE.fullmatch(words[0])
                device, inode = (int(n) for n in words[1].split(":"))
                if match:
                    found.lock_files.add(int(match.group(1)))
                    key = (os.major(device), os.minor(device), inode)
                    lock_ids[key] = int(match.group(1))
            elif kind == "flock":
                hex_major, hex_minor, number = words[1].split(":")
                flocks.append((int(words[0]),
                               (int(hex_major, 16), int(hex_minor, 16), int(number))))
            elif kind == "proc":
                found.groups[int(words[0])] = int(words[1])
            elif kind == "args":
                number, _pgid, args = rest.strip().split(None, 2)
                found.args[int(number)] = args
            elif kind == "folder":
                mtime, path = rest.split(" ", 1)
                parts = _relative(remote_root, path)
                if parts and len(parts) == 2 and (m := _SHORT.fullmatch(parts[1])):
                    found.folders.append(RunFolder(path, parts[0], m.group(1), float(mtime)))
            elif kind == "pidfile":
                mtime, pgid, path = rest.split(" ", 2)
                _add_pid_file(found, remote_root, path, pgid, float(mtime))
        except (IndexError, ValueError):
            continue  # a line we cannot read (a strange name under the root): not ours
    for pid, key in flocks:
        index = lock_ids.get(key)
        if index is not None:
            found.holders[index] = LockHolder(pid, found.groups.get(pid, pid))
    return found


def _add_pid_file(found: HostSurvey, root: str, path: str, pgid: str, mtime: float) -> None:
    parts = _relative(root, path)
    if not parts or len(parts) != 4 or parts[2] != "pids":
        return
    short, name = _SHORT.fullmatch(parts[1]), _PID_FILE.fullmatch(parts[3])
    if short is None or name is None:
        return
    found.pid_files.append(PidFile(
        path=path, case_id=parts[0], short=short.group(1), step=name.group("step"),
        beam=int(name.group("beam")) if name.group("beam") else None,
        pgid=int(pgid) if pgid.isdigit() and int(pgid) > 1 else None, mtime=mtime))


def survey(host: Host, pool: GpuPool, remote_root: str) -> HostSurvey:
    """Look at the GPU host once (one command; NVML is read in this process).

    Args:
        host: The GPU host.
        pool: The GPU pool.
        remote_root: ``paths.remote_work_root``; "" (or "/", which is never walked)
            to look at no folders.

    Raises:
        HostError: The host did not answer, or the GPU query failed.
        GpuQueryError: The GPU query printed something that is not nvidia-smi CSV.
    """
    from blocks.gpu_pool import read_nvml

    root = posixpath.normpath(remote_root) if remote_root else ""
    root = "" if root == "/" else root
    nvml = pool.source == "nvml"
    for _ in range(LOOKS):
        # NVML is read here, and the GPU host is this machine: its pids before the read
        before = {int(n) for n in os.listdir("/proc") if n.isdigit()} if nvml else None
        gpus, apps = read_nvml() if nvml else (None, None)
        out = host.run(survey_script(pool, root, query=not nvml), stream=False,
                       timeout=60).stdout
        found = parse_survey(out, root, gpus, apps, before)
        if not found.ended_during_look():
            break
    return found
