"""Join a running Ray cluster, or start a local one that training, tuning and serving can rely on.

This is the only module that calls `ray.init` (tests/test_layout.py checks it). Every din-ray
command that needs Ray goes through `connect` (or the `session` context that also shuts down what
it started): with an address (the argument or $RAY_ADDRESS) it joins that cluster; without one it
starts a local Ray in this process the way this module's two fixes require:

* The dashboard is on, on a port chosen here, and its address is exported to every Ray process.
  A Tune trial that ASHA stops is killed mid-run; Ray Train's detached `PlacementGroupCleaner`
  then removes the placement group of the dead run, but it finds the controller's state through
  the dashboard's State API, located from RAY_API_SERVER_ADDRESS, RAY_ADDRESS or the address file
  of a `ray start` cluster. A cluster started by `ray.init` has none of these, and with several
  Ray instances on the machine the lookup fails; the cleaner's thread dies, the placement group
  stays, and the next trial waits for its CPUs forever. The raylet and its workers take this
  process's environment when they start, so exporting the address here reaches all of them.
* Ray gives its raylet a fixed 30 s to register, which a machine under heavy load can miss; a
  failed start is cleaned up (its processes stopped) and retried.

It also shortens Ray Train's worker poll on a local Ray (`TRAIN_POLL_S`): the controller moves a
run on (workers started, a report, the end) only at its next poll, every 2 s by default, which
on a short local run is seconds of waiting (a 2-worker, 2-epoch run of 256 rows: 27.5 -> 23.9 s
and 22.7 -> 19.5 s, first and second run in one Ray, 2 cores). A cluster keeps its own setting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Where Ray processes look for the dashboard's API server.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
START_ATTEMPTS = 3
# Ray Train's controller polls its workers this often (Ray's default 2 s); read in the
# controller's process, which a local Ray starts with this process's environment.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"


def connect(address: str | None = None, num_cpus: int | None = 4, dashboard: bool = True,
            temp_dir: str | None = None, **init_kwargs) -> bool:
    """Join the running Ray (this process's, `address` or $RAY_ADDRESS), else start a local one
    with `num_cpus` logical CPUs (None: this machine's) and its files under `temp_dir`. Returns
    whether this call connected (and so should `ray.shutdown()` when done). `init_kwargs` go to
    `ray.init` either way (e.g. `log_to_driver`).

    `dashboard=False` starts a local Ray without the dashboard, for work with no Tune trials
    to stop: the dashboard's processes (a head and nine modules) take seconds of CPU to start,
    which a small training run feels, and the placement-group cleanup it serves only matters
    for trials killed while the cluster lives on (a local Ray ends with this process anyway)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _remember(ray.init(address=address, **init_kwargs))
    else:
        start_local_ray(num_cpus, temp_dir=temp_dir, dashboard=dashboard, **init_kwargs)
    return True


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = 4, dashboard: bool = True,
            temp_dir: str | None = None, **init_kwargs) -> Iterator[None]:
    """`connect` for the length of a `with` block; shuts down only a Ray this block started or
    joined (a Ray already running in this process is left as it was)."""
    import ray

    connected = connect(address, num_cpus, dashboard, temp_dir, **init_kwargs)
    try:
        yield
    finally:
        if connected:
            ray.shutdown()


# The dashboard of the Ray this module last connected to ("" = none), from ray.init's context,
# keyed by that cluster's GCS address.
_dashboard: dict[str, str] = {}


def _remember(context) -> None:
    import ray

    _dashboard.clear()
    _dashboard[ray.get_runtime_context().gcs_address] = context.dashboard_url or ""


def dashboard_url() -> str:
    """The dashboard of the Ray cluster this process is connected to, as an http:// URL (Serve's
    REST API, which `din_ray.serve.deploy` deploys through, is part of it).

    Raises:
        RuntimeError: not connected, or the cluster runs without its dashboard.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("connect to a Ray cluster first (din_ray.ray_session.connect)")
    url = _dashboard.get(ray.get_runtime_context().gcs_address)
    if url is None:  # connected by someone else: ask ray.init, which then starts nothing
        # but installs its own SIGTERM handler again (sys.exit); keep the caller's.
        previous = signal.getsignal(signal.SIGTERM)
        url = ray.init(ignore_reinit_error=True).dashboard_url or ""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    if not url:
        raise RuntimeError("the connected Ray cluster runs without its dashboard, which serves "
                           "the Serve REST API; start it with one (connect(dashboard=True), "
                           "`ray start --include-dashboard true`)")
    return url if "://" in url else f"http://{url}"


def start_local_ray(num_cpus: int | None, temp_dir: str | None = None, dashboard: bool = True,
                    **init_kwargs) -> None:
    """Start a local Ray in this process whose workers can reach its own dashboard (see the
    module docstring; `dashboard=False`: none, see `connect`), retrying a start that times
    out. `init_kwargs` go to `ray.init`."""
    import ray

    previous = os.environ.get(API_SERVER_ENV)
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)  # a value the user set is kept
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            before = _own_sessions(temp_dir)
            port = _free_port()  # a fresh one: a failed attempt's dashboard may still hold its
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
            try:
                _remember(ray.init(
                    address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                    dashboard_port=port if dashboard else None, _temp_dir=temp_dir, **init_kwargs))
                break
            except Exception as e:  # Ray raises a plain Exception for this one
                if "timed out during startup" not in str(e) or attempt == START_ATTEMPTS:
                    raise
                log.warning("local Ray did not start in time (attempt %d of %d); retrying",
                            attempt, START_ATTEMPTS)
                ray.shutdown()
                _stop_failed_session(before, temp_dir)
    finally:
        if previous is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = previous


def _own_sessions(temp_dir: str | None) -> set[str]:
    """Ray session directories this process started (their names end in its pid)."""
    root = Path(temp_dir or "/tmp/ray")
    return {p.name for p in root.glob(f"session_*_{os.getpid()}")}


def _stop_failed_session(before: set[str], temp_dir: str | None) -> None:
    """Stop the processes of a session whose start timed out. `ray.shutdown` cannot: the node
    never registered, so this process holds no handle on its GCS, raylet or dashboard."""
    failed = _own_sessions(temp_dir) - before
    if not failed or not Path("/proc").is_dir():
        return
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # exited meanwhile, or not ours to read
        if any(name in cmdline for name in failed):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass  # already gone
    log.warning("stopped the processes of the failed Ray session %s", ", ".join(sorted(failed)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
