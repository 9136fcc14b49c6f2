"""Transfer benchmark: RemoteHost.upload against OpenSSH scp, same sshd, same run.

    python -m bench.transfer [--large-mib 1024] [--files 200] [--file-kib 60] [--repeat 3]

Starts a real sshd on 127.0.0.1 (tests/support/sshd.py), then uploads

* one large file (default 1 GiB), and
* a case-shaped tree of many small files (default 200 x 60 KiB),

through ``RemoteHost.upload`` (verified: SHA-256 both ends, temp name + rename),
through ``scp`` / ``scp -r`` (unverified), and through a naive paramiko
``SFTPClient.put`` loop on a default ``SSHClient`` (the baseline that showed the
problem). Each is run ``--repeat`` times into a fresh destination; the best time
counts. Prints seconds, MB/s and the ratio to scp. Targets: large file
throughput >= 0.9x scp; small-file tree time <= 1.5x scp.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from tests.support.sshd import SshServer


def make_large(path: Path, mib: int) -> None:
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(block)


def make_tree(root: Path, files: int, kib: int) -> None:
    # Shaped like a case: a plan plus beam folders of .ptn/.mgn files.
    for i in range(files):
        beam = root / f"2025010112000{i % 3}00"
        beam.mkdir(parents=True, exist_ok=True)
        (beam / f"02_1234_plan_{i % 3 + 1}_{i:03d}.ptn").write_bytes(os.urandom(kib * 1024))


def best_of(repeat: int, fn: Callable[[int], None]) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def naive_put_tree(server: SshServer, local: Path, remote: str) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts))
    client.connect("127.0.0.1", port=server.port, username=server.username,
                   key_filename=str(server.client_key), allow_agent=False, look_for_keys=False)
    sftp = client.open_sftp()
    for dirpath, _, names in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        target = remote if rel == "." else f"{remote}/{rel}"
        with contextlib.suppress(OSError):
            sftp.mkdir(target)
        for name in names:
            sftp.put(os.path.join(dirpath, name), f"{target}/{name}")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--file-kib", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-naive", action="store_true",
                        help="do not run the naive paramiko baseline")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mqi-bench-"))
    server = SshServer(work / "sshd").start()
    host = server.remote_host()
    try:
        large = work / "src-large"
        large.mkdir()
        make_large(large / "big.bin", args.large_mib)
        tree = work / "src-tree"
        make_tree(tree, args.files, args.file_kib)
        dest = work / "dest"
        dest.mkdir()
        scp = ["scp", "-q", *server.ssh_args(), "-P", str(server.port)]
        target = f"{server.username}@127.0.0.1"
        large_bytes = args.large_mib * 1024 * 1024
        tree_bytes = args.files * args.file_kib * 1024

        def fresh(name: str, i: int) -> str:
            path = dest / f"{name}-{i}"
            shutil.rmtree(path, ignore_errors=True)
            return str(path)

        rows = []
        t_scp_large = best_of(args.repeat, lambda i: subprocess.run(
            [*scp, str(large / "big.bin"), f"{target}:{fresh('scp-large', i)}"], check=True))
        t_mqi_large = best_of(args.repeat, lambda i: host.upload(large, fresh("mqi-large", i)))
        rows.append(("large file", "scp", t_scp_large, large_bytes, 1.0))
        rows.append(("large file", "RemoteHost.upload", t_mqi_large, large_bytes,
                     t_scp_large / t_mqi_large))

        t_scp_tree = best_of(args.repeat, lambda i: subprocess.run(
            [*scp, "-r", str(tree), f"{target}:{fresh('scp-tree', i)}"], check=True))
        t_mqi_tree = best_of(args.repeat, lambda i: host.upload(tree, fresh("mqi-tree", i)))
        t_skip = best_of(1, lambda i: host.upload(tree, str(dest / "mqi-tree-0")))
        rows.append((f"{args.files} x {args.file_kib} KiB", "scp -r", t_scp_tree, tree_bytes, 1.0))
        rows.append((f"{args.files} x {args.file_kib} KiB", "RemoteHost.upload", t_mqi_tree,
                     tree_bytes, t_mqi_tree / t_scp_tree))
        rows.append((f"{args.files} x {args.file_kib} KiB", "upload again (all skipped)",
                     t_skip, tree_bytes, t_skip / t_scp_tree))
        if not args.skip_naive:
            t_naive = best_of(1, lambda i: naive_put_tree(server, tree, fresh("naive", i)))
            rows.append((f"{args.files} x {args.file_kib} KiB", "naive paramiko put", t_naive,
                         tree_bytes, t_naive / t_scp_tree))

        print(f"{'case':<18} {'method':<28} {'seconds':>8} {'MB/s':>8}  ratio")
        for case, method, secs, nbytes, ratio in rows:
            what = "throughput vs scp" if case == "large file" else "time vs scp"
            print(f"{case:<18} {method:<28} {secs:8.3f} {nbytes / 1e6 / secs:8.1f}  "
                  f"{ratio:.2f}x {what}")
        print()
        print(f"large file: RemoteHost throughput = {t_scp_large / t_mqi_large:.2f}x scp "
              f"(target >= 0.90x)")
        print(f"small files: RemoteHost time = {t_mqi_tree / t_scp_tree:.2f}x scp -r "
              f"(target <= 1.50x)")
    finally:
        host.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
