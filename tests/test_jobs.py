"""The `ray job submit` entrypoints in jobs/.

In-process: each job's `main(argv)` on tiny data (prepare, train --local, reproduce), and the serve
job refusing to start a Ray of its own. On a real cluster: a `ray start --head` of this test's own
(127.0.0.1, its own ports and temp dir, token authentication with a token of its own), jobs/train.py
submitted with `ray job submit --working-dir`, its checkpoint checked, jobs/serve.py deploying
that checkpoint and a request scored over HTTP, then that cluster stopped through its own
processes (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray_processes
from builders import write_tiny_dataset
from serve_helpers import offline_scores, payloads

from din_ray import checkpoint as ckpt
from din_ray.data.format import PreparedDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `jobs` is a folder of scripts at the repository root

import jobs.prepare  # noqa: E402
import jobs.reproduce  # noqa: E402
import jobs.serve  # noqa: E402
import jobs.train  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# Tiny model: the point is the plumbing, not the fit.
TINY = ["--epochs", "1", "--batch-size", "32", "--embedding-dim", "4", "--attention-hidden",
        "8,4", "--mlp-hidden", "16,8", "--threads", "1", "--patience", "0"]
# Kept out of the uploaded working directory besides what .gitignore names (.venv, runs/).
UPLOAD_EXCLUDES = [".git", "benchmarks/results", "docs", "*.png"]
# Time allowed for starting the test's cluster, attempts included (see LocalCluster.start).
START_BUDGET_S = 1200
STARTUP_NICE = -10  # the cluster session's priority while it starts (see _session_priority)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("jobs") / "data", rows=256, items=60,
                              cates=8)


# --- in-process -----------------------------------------------------------------------------
def test_prepare_job_writes_a_prepared_dataset(tmp_path):
    out = tmp_path / "synthetic"
    assert jobs.prepare.main(["synthetic", "--rows", "400", "--output", str(out)]) == 0
    ds = PreparedDataset.open(out)
    assert sum(ds.num_rows(s) for s in ("train", "valid", "test")) == 400


def test_train_job_writes_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    assert jobs.train.main(["--data", str(data), "--output", str(out), "--local", *TINY]) == 0
    c = ckpt.Checkpoint.open(out / "checkpoint")
    assert c.manifest["world_size"] == 1
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1


def test_train_job_reports_bad_arguments(data, tmp_path, capsys):
    assert jobs.train.main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path),
                            "--local", *TINY]) == 2
    assert "missing" in capsys.readouterr().err


def test_reproduce_job_writes_its_table(data, tmp_path):
    out = tmp_path / "reproduce"
    assert jobs.reproduce.main(["--data", str(data), "--output", str(out), "--quick",
                                "--seeds", "1", "--epochs", "1", "--models", "din",
                                "--regs", "none"]) == 0
    assert "DIN" in (out / "table.md").read_text()


def test_serve_job_needs_a_cluster(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.serve.main(["--checkpoint", str(tmp_path)]) == 2
    assert "ray job submit" in capsys.readouterr().err
    assert jobs.serve.main(["--checkpoint", str(tmp_path), "--address", "127.0.0.1:1",
                            "--num-cpus", "2"]) == 2
    assert "--num-cpus" in capsys.readouterr().err


# --- on a cluster of the test's own -----------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_priority(leader: int, nice: int) -> None:
    """Set the CPU priority of the session led by `leader` (Linux autogroups: with
    kernel.sched_autogroup_enabled, CPU time is shared between sessions first, and a process's
    own nice value counts only inside its session).

    Used while the cluster starts, and undone as soon as it is up: `ray start` gives the raylet
    30 s to register, and the raylet gives its dashboard agent about 15 s to start, both fixed
    in Ray 2.60. The agent needs about 2 s of CPU, and on a machine that other test runs keep
    busy its session's share is too small to get them in time. Does nothing where autogroups
    are off or the priority may not be raised."""
    try:
        Path(f"/proc/{leader}/autogroup").write_text(str(nice))
    except OSError:
        pass


class LocalCluster:
    """A `ray start --head --block` in a session of its own, so that every process it starts
    can be found again (by session id, or its temp dir on the command line) and stopped."""

    def __init__(self, root: Path) -> None:
        self.token = secrets.token_hex(32)
        # Token authentication (Ray 2.60's default) with this cluster's own token: the head,
        # its processes and every client here read RAY_AUTH_TOKEN when RAY_AUTH_MODE=token.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        # Ray's memory monitor kills workers when the *machine* is nearly full,
                        # which other test runs here can make it; the kernel's OOM killer stays.
                        RAY_memory_monitor_refresh_ms="0",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        self.log = root / "head.log"
        self.proc: subprocess.Popen | None = None
        self.temp_dir = ""

    def start(self) -> None:
        deadline = time.monotonic() + START_BUDGET_S
        attempts = 0
        while attempts == 0 or time.monotonic() < deadline:
            attempts += 1
            self.temp_dir = f"/tmp/rj-{uuid.uuid4().hex[:6]}"  # unix socket paths stay short
            (gcs, dash, client, agent, agent_grpc, metrics, env_agent,
             self.serve_port) = _free_ports(8)
            self.gcs_port = gcs
            self.dashboard = f"http://127.0.0.1:{dash}"
            # Ray Train's placement-group cleaner finds the dashboard from this, else from the
            # address file under /tmp/ray, which names another cluster or several (see
            # din_ray.ray_session).
            self.env["RAY_API_SERVER_ADDRESS"] = self.dashboard
            cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                   "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard",
                   "true", "--ray-client-server-port", str(client),
                   "--dashboard-agent-listen-port", str(agent),
                   "--dashboard-agent-grpc-port", str(agent_grpc),
                   "--metrics-export-port", str(metrics), "--runtime-env-agent-port",
                   str(env_agent), "--temp-dir", self.temp_dir, "--num-cpus", "4",
                   "--disable-usage-stats"]
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(cmd, env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            _session_priority(self.proc.pid, STARTUP_NICE)
            started = self._wait_started(timeout_s=300)
            _session_priority(self.proc.pid, 0)
            if started:
                return
            # The raylet gives its dashboard agent about 15 s to come up, and `ray start` gives
            # the raylet 30 s to register (both fixed in Ray 2.60): on a machine loaded by other
            # test runs an attempt can miss them, and a later one make it.
            self.stop()
        raise RuntimeError(f"ray start failed {attempts} times in {START_BUDGET_S} s; see "
                           f"{self.log}")

    def _wait_started(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                try:
                    self.get("/api/version")
                    return True
                except OSError:
                    pass  # the dashboard is still coming up
            time.sleep(2)
        return False

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.dashboard + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def submit(self, *entrypoint: str, timeout_s: float = 1800) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir REPO -- python ENTRYPOINT...`, waiting for the end."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
               "--", "python", *entrypoint]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                              timeout=timeout_s)

    def processes(self) -> list[int]:
        """This cluster's processes: those in the head's session (everything `ray start` and the
        raylet spawned), any naming the cluster's temp dir on its command line, and their
        descendants (a job's driver runs in a session of its own, started by the job's
        supervisor)."""
        return ray_processes.processes(self.temp_dir or "\0",  # "\0": no command line has it
                                       self.proc.pid if self.proc is not None else None)

    def stop(self) -> list[int]:
        """SIGTERM every process of the cluster at once, then SIGKILL what is left after a
        grace period. Returns the pids still alive (none, normally).

        Not the head first: on SIGTERM `ray start --block` stops its processes one after
        another, waiting on each, which took 32 s here with a Serve application running;
        signalled together they are gone in a second or two. The grace is short because
        multiprocessing's resource tracker and forkserver (started by a job's driver) ignore
        SIGTERM and are only ever stopped by the SIGKILL."""
        left = ray_processes.stop(self.temp_dir or "\0",
                                  self.proc.pid if self.proc is not None else None, grace_s=3)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)  # reap the head
            except subprocess.TimeoutExpired:
                left.append(self.proc.pid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"cluster processes still running after stop: {left}"


def _job_output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@pytest.mark.timeout(1200)  # a loaded machine may need several attempts to start the cluster
def test_submitted_train_and_serve_jobs_run_on_the_cluster(cluster, data, tmp_path):
    out, storage = tmp_path / "run", tmp_path / "storage"
    result = cluster.submit("jobs/train.py", "--data", str(data), "--output", str(out),
                            "--workers", "1", "--storage-path", str(storage),
                            "--run-name", "din-job", *TINY)
    log = _job_output(result)
    assert result.returncode == 0 and "succeeded" in result.stdout, log
    # The driver joined this cluster instead of starting a Ray of its own.
    # (Ray names the GCS by the machine's address, whatever --node-ip-address says.)
    joined = re.search(r"Connecting to existing Ray cluster at address: \S+:(\d+)", log)
    assert joined and int(joined[1]) == cluster.gcs_port, log
    assert "Started a local Ray instance" not in log, log
    jobs_seen = cluster.get("/api/jobs/")
    assert [j["status"] for j in jobs_seen] == ["SUCCEEDED"], jobs_seen

    # Outputs where the command said: the checkpoint and metrics in OUTPUT, every epoch's
    # sharded checkpoint under the storage path.
    c = ckpt.Checkpoint.open(out / "checkpoint")
    assert c.manifest["world_size"] == 1
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 1
    assert (storage / "din-job" / "epoch-0001" / ckpt.MANIFEST).exists()

    # Serve that checkpoint from a second job; the application outlives the job.
    result = cluster.submit("jobs/serve.py", "--checkpoint", str(out), "--port",
                            str(cluster.serve_port), "--max-candidates", "8")
    log = _job_output(result)
    assert result.returncode == 0 and "succeeded" in result.stdout, log
    payload = payloads(data, 1)[0]
    req = urllib.request.Request(f"http://127.0.0.1:{cluster.serve_port}/v1/ctr",
                                 data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        scores = json.loads(resp.read())["scores"]
    expected, _ = offline_scores(out / "checkpoint", payload)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
