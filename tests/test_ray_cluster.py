"""The encode job on a real two-node Ray cluster on this machine.

A head node and a worker node are started with ``ray start`` (each its own raylet, one CPU each),
the encode job runs against them once with ``--ray-address`` and once through ``ray job submit``
(the job server of ``ray[default]``), and both caches must equal a local-mode run byte for byte.
The test stops exactly the processes it started: each ``ray start`` runs in a session of its own,
and only the processes of those sessions are signalled (``ray stop`` would kill every Ray on the
machine, including other users' clusters).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from sfd.data.cache import LatentCache
from sfd.data.synthetic import write_image_folder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENCODE = [sys.executable, str(REPO / "pipeline" / "encode.py")]
COMMON = ["--image-size", "64", "--random-encoders", "0", "--rows-per-shard", "4", "--rows-per-chunk", "4",
          "--batch-size", "4", "--semvae", "random", "--repa-targets", "none", "--row-order", "sorted"]
ARRAYS = ("texture", "semantic", "valid", "labels", "paths", "reason", "shard_done")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sids: set[int]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) in sids:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


class LocalCluster:
    """Head + worker node via ``ray start``, each launched in its own session so ``stop`` can find
    every process (GCS, raylets, dashboard, agents, workers, job drivers) it caused, and nothing else."""

    def __init__(self) -> None:
        # Short temp dir: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="sfdray", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.sids: set[int] = set()
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

    def _ray_start(self, *args: str) -> None:
        proc = subprocess.Popen(["ray", "start", "--disable-usage-stats", "--num-cpus=1",
                                 f"--dashboard-agent-listen-port={free_port()}", *args],
                                env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.sids.add(proc.pid)  # the session id of everything it starts
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out

    def start(self) -> LocalCluster:
        self._ray_start("--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}",
                        "--include-dashboard=true", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}", '--resources={"head_node": 1}')
        self._ray_start(f"--address=127.0.0.1:{self.gcs_port}", '--resources={"worker_node": 1}')
        deadline = time.time() + 60  # the second raylet registers with the GCS shortly after
        while (n := self.alive_nodes()) < 2 and time.time() < deadline:
            time.sleep(1)
        assert n == 2, f"{n} node(s) alive"
        return self

    def alive_nodes(self) -> int:
        out = subprocess.run(["ray", "status", f"--address=127.0.0.1:{self.gcs_port}"], env=self.env,
                             capture_output=True, text=True, timeout=60).stdout
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"^\s*1 node_[0-9a-f]+", active, flags=re.M))

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in session_pids(self.sids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while session_pids(self.sids) and time.time() < deadline:
                time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        yield c.start()
    finally:
        c.stop()
        alive = session_pids(c.sids)
        subprocess.run(["rm", "-rf", c.temp_dir])
        assert not alive, f"processes of the test cluster still running: {alive}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, num_classes=8)
    return root


def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = LatentCache.open(a), LatentCache.open(b)
    assert ca.is_complete() and cb.is_complete()
    for name in ARRAYS:
        x, y = np.asarray(ca.group[name][:]), np.asarray(cb.group[name][:])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


def test_encode_on_a_two_node_cluster_equals_local_mode(cluster: LocalCluster, images: Path, tmp_path: Path) -> None:
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    assert cluster.alive_nodes() == 2

    local = tmp_path / "local" / "cache"
    run([*ENCODE, "--images", str(images), "--out", str(local), *COMMON, "--ray-num-cpus", "2"], env)

    # Driver here, actors on the cluster. One CPU per node and one CPU per actor: the two actors
    # can only be placed one on each node, so both raylets do work.
    direct = tmp_path / "direct" / "cache"
    log = run([*ENCODE, "--images", str(images), "--out", str(direct), *COMMON,
               "--ray-address", f"127.0.0.1:{cluster.gcs_port}"], env)
    assert "on 2 actor(s) {'num_cpus': 1.0}" in log, log
    assert_same_cache(direct, local)

    # Driver on the head node too, submitted through the job server; RAY_ADDRESS is set by Ray.
    submitted = tmp_path / "submitted" / "cache"
    log = run(["ray", "job", "submit", f"--address=http://127.0.0.1:{cluster.dashboard_port}", "--",
               *ENCODE, "--images", str(images), "--out", str(submitted), *COMMON], env)
    assert re.search(r"Job '\S+' succeeded", log), log
    summary = json.loads(next(line for line in log.splitlines() if line.startswith('{"encode_summary"')))
    assert [s["status"] for s in summary["encode_summary"]][0] == "done"
    assert_same_cache(submitted, local)
