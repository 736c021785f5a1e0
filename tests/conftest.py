"""Shared fixtures: the one way a test module gets a real local Ray cluster.

`ray_cluster` (4 logical CPUs, no dashboard) serves Ray Data and Ray Train tests;
`ray_serve_cluster` (4 CPUs, dashboard on) serves Serve, whose config deploys go through the
dashboard's Serve REST API (din_ray.serve.deploy); `ray_tune_cluster` (8 CPUs, dashboard on)
serves Tune, whose ASHA-stopped `TorchTrainer` trials need the dashboard's State API to clean
up their placement groups (din_ray.ray_session). Each
is module-scoped, started through `din_ray.ray_session.start_local_ray` (retried when a loaded
machine's raylet misses Ray's 30 s registration window) in a fresh, short temp dir (Ray's unix
socket paths must stay short), and shut down with its files removed after the module.
"""

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest

# Test helpers (tests/builders.py, serve_helpers.py, dist_helpers.py) import as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


@contextlib.contextmanager
def local_ray(num_cpus: int = 4, dashboard: bool = False):
    """A local Ray for the length of the block; yields its temp dir."""
    import ray

    from din_ray.ray_session import start_local_ray

    # Ray's memory monitor kills workers when the whole host passes 95 % memory, whoever uses
    # it; on a shared host that is other jobs' memory. These tests' own use is small.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    temp = f"/tmp/ray-t{uuid.uuid4().hex[:6]}"
    start_local_ray(num_cpus, temp_dir=temp, dashboard=dashboard, log_to_driver=False)
    try:
        yield temp
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(4) as temp:
        yield temp


@pytest.fixture(scope="module")
def ray_serve_cluster():
    with local_ray(4, dashboard=True) as temp:
        yield temp


@pytest.fixture(scope="module")
def ray_tune_cluster():
    with local_ray(8, dashboard=True) as temp:
        yield temp
