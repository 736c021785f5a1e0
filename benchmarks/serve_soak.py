"""Serve under sustained load, and a serving replica killed mid-load.

    python benchmarks/serve_soak.py --checkpoint runs/ml-din --seconds 300 --kill-replica \
        --output benchmarks/results/serve_soak.json

Starts a local Ray cluster with the Serve app (one replica, access log off), then:

  * soak: a client in a SEPARATE process (this script with --client; aiohttp on 127.0.0.1)
    keeps --concurrency requests of --candidates ads in flight for --seconds, each with a
    bounded client time-out (--timeout-s). Meanwhile the resident memory (VmRSS) of the
    replica and the HTTP proxy process is sampled every --sample-s. Reported: requests, 5xx,
    other errors, time-outs, latency percentiles per --bucket-s window, memory over time and
    its growth from the first sample after warm-up to the last.
  * --kill-replica: the same load for --kill-seconds; after --kill-at seconds the replica's
    process (its PID from Ray's state API) gets SIGKILL. Serve starts a replacement. Reported:
    requests answered with an error or timed out (none may hang: the HTTP proxy answers 408
    past `REQUEST_TIMEOUT_S`, set by `app_config`, and the client time-out bounds the rest),
    seconds from the kill to the first success and to the last failure, and whether the
    replacement (a new PID) returns exactly the scores the killed replica gave for a fixed
    request.

Every loop here is bounded by time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_latency import _free_port, make_bodies, start_ray  # noqa: E402


# --- client (runs in its own process) -----------------------------------------------------------
async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float,
                timeout_s: float) -> tuple[float, list[tuple[float, float, str]]]:
    """The wall-clock time the offsets count from, and (start offset s, latency s, outcome) per
    request; outcome is the HTTP status, "timeout" or the client error's name."""
    import aiohttp

    records: list[tuple[float, float, str]] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    # Both clocks read together: the driver places its kill on this axis with time.time().
    t0_wall, t_start = time.time(), time.perf_counter()
    deadline = t_start + seconds
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers={
                            "content-type": "application/json"}) as r:
                        await r.read()
                        outcome = str(r.status)
                except asyncio.TimeoutError:
                    outcome = "timeout"
                except aiohttp.ClientError as e:
                    outcome = type(e).__name__
                    await asyncio.sleep(0.05)  # a refused connection must not spin
                records.append((t0 - t_start, time.perf_counter() - t0, outcome))
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return t0_wall, records


def client_main(args: argparse.Namespace) -> int:
    bodies = [json.dumps(b).encode() for b in json.loads(Path(args.bodies).read_text())]
    t0_wall, records = asyncio.run(_load(args.url, bodies, args.concurrency, args.seconds,
                                         args.timeout_s))
    Path(args.records).write_text(json.dumps({"t0_wall": t0_wall, "records": records}))
    return 0


def start_client(url: str, bodies: Path, records: Path, args: argparse.Namespace,
                 seconds: float) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--client", "--url", url, "--bodies", str(bodies),
           "--records", str(records), "--concurrency", str(args.concurrency),
           "--seconds", str(seconds), "--timeout-s", str(args.timeout_s)]
    return subprocess.Popen(cmd)


# --- measurements -------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def serve_pids() -> dict[str, int]:
    """PIDs of the live CTRServer replica and HTTP proxy, from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    out = {}
    # This script's cluster by its address: with none, the state API refuses to choose when
    # other Ray clusters run on the machine.
    address = ray.get_runtime_context().gcs_address
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")]):
        if a.class_name.endswith("CTRServer") and a.pid:
            out["replica"] = a.pid
        elif a.class_name == "ProxyActor" and a.pid:
            out["proxy"] = a.pid
    return out


class MemorySampler(threading.Thread):
    """Samples the RSS of the replica and proxy every `period` s until stopped."""

    def __init__(self, pids: dict[str, int], period: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append({"t_s": round(time.perf_counter() - self.t0, 1),
                                 **{f"{k}_rss_mb": rss_mb(p) for k, p in self.pids.items()}})
            self.stop.wait(self.period)


def summarize(records: list, bucket_s: float) -> dict:
    def pct(lat: list[float]) -> dict:
        ms = np.asarray(lat) * 1e3
        if not len(ms):
            return {}
        return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)} | {
            "max_ms": round(float(ms.max()), 1)}

    outcomes = [o for _, _, o in records]
    ok = [lat for _, lat, o in records if o == "200"]
    windows = []
    end = max((t for t, _, _ in records), default=0.0)
    for lo in np.arange(0.0, end + 1e-9, bucket_s):
        inside = [(lat, o) for t, lat, o in records if lo <= t < lo + bucket_s]
        windows.append({"from_s": round(float(lo), 1), "requests": len(inside),
                        "errors": sum(o != "200" for _, o in inside),
                        **pct([lat for lat, o in inside if o == "200"])})
    return {"requests": len(records), "ok": len(ok),
            "http_5xx": sum(o.isdigit() and o.startswith("5") for o in outcomes),
            "http_other_non_200": sum(o.isdigit() and o != "200" and not o.startswith("5")
                                      for o in outcomes),
            "timeouts": outcomes.count("timeout"),
            "client_errors": sum(not o.isdigit() and o != "timeout" for o in outcomes),
            "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
            "qps": round(len(ok) / max(end, 1e-9), 1), "latency": pct(ok),
            "per_window": windows}


def memory_growth(samples: list[dict], warmup_s: float) -> dict:
    out = {}
    for key in ("replica_rss_mb", "proxy_rss_mb"):
        vals = [s[key] for s in samples if s["t_s"] >= warmup_s and s.get(key) is not None]
        if vals:
            out[key] = {"after_warmup": vals[0], "last": vals[-1], "max": max(vals),
                        "growth_mb": round(vals[-1] - vals[0], 1)}
    return out


# --- server side --------------------------------------------------------------------------------
def _scores(url: str, body: dict) -> list[float]:
    import requests

    r = requests.post(f"{url}/v1/ctr", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["scores"]


def soak(url: str, bodies: Path, work: Path, args: argparse.Namespace) -> dict:
    pids = serve_pids()
    sampler = MemorySampler(pids, args.sample_s)
    sampler.start()
    client = start_client(f"{url}/v1/ctr", bodies, work / "soak.json", args, args.seconds)
    try:
        client.wait(timeout=args.seconds + 120)
    finally:
        sampler.stop.set()
        sampler.join()
    records = json.loads((work / "soak.json").read_text())["records"]
    return {"seconds": args.seconds, "pids": pids, **summarize(records, args.bucket_s),
            "memory": memory_growth(sampler.samples, args.warmup_s),
            "memory_samples": sampler.samples}


def kill_replica(url: str, bodies: Path, work: Path, fixed: dict,
                 args: argparse.Namespace) -> dict:
    before_scores = _scores(url, fixed)
    victim = serve_pids()["replica"]
    client = start_client(f"{url}/v1/ctr", bodies, work / "kill.json", args, args.kill_seconds)
    time.sleep(args.kill_at)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    replacement, t_replaced = None, None
    while time.time() < t_kill + args.kill_seconds + 60:
        pid = serve_pids().get("replica")
        if pid and pid != victim:
            replacement, t_replaced = pid, time.time()
            break
        time.sleep(0.5)
    client.wait(timeout=args.kill_seconds + 120)
    written = json.loads((work / "kill.json").read_text())
    records = written["records"]
    kill_offset = t_kill - written["t0_wall"]  # the kill on the client's time axis
    after = [(t, lat, o) for t, lat, o in records if t + lat >= kill_offset]
    failed = [(t, lat, o) for t, lat, o in after if o != "200"]
    first_ok = min((t + lat for t, lat, o in after if o == "200" and t >= kill_offset),
                   default=None)
    after_scores = _scores(url, fixed) if replacement else None
    return {
        "seconds": args.kill_seconds, "kill_at_s": args.kill_at, "killed_pid": victim,
        "replacement_pid": replacement,
        "replacement_alive_after_s": round(t_replaced - t_kill, 1) if t_replaced else None,
        "failed_requests": len(failed),
        "failed_outcomes": {o: sum(x == o for _, _, x in failed)
                            for o in sorted({x for _, _, x in failed})},
        "longest_failed_request_s": round(max((lat for _, lat, _ in failed), default=0.0), 2),
        "first_success_after_kill_s": (round(first_ok - kill_offset, 1)
                                       if first_ok is not None else None),
        "last_failure_after_kill_s": (round(max(t + lat for t, lat, _ in failed) - kill_offset,
                                                1) if failed else None),
        "same_scores_after_replacement": after_scores == before_scores,
        **{k: v for k, v in summarize(records, args.bucket_s).items() if k != "per_window"},
    }


def server_main(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from din_ray.checkpoint import resolve_checkpoint
    from din_ray.serve.deploy import app_config, deploy
    from din_ray.serve.settings import REQUEST_TIMEOUT_S

    checkpoint = resolve_checkpoint(args.checkpoint).resolve()
    work = Path(tempfile.mkdtemp(prefix="serve-soak-"))
    bodies = make_bodies(checkpoint, 64, args.candidates, args.seed)
    (work / "bodies.json").write_text(json.dumps(bodies))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    build_args = {"checkpoint": str(checkpoint), "threads": args.threads,
                  "max_ongoing_requests": 1024}
    load_before = os.getloadavg()
    temp = ""
    report: dict = {}
    try:
        temp = start_ray(args.num_cpus)
        deploy(app_config(build_args, port=port))  # access log off
        _scores(url, bodies[0])
        if args.seconds > 0:
            report["soak"] = soak(url, work / "bodies.json", work, args)
            s = report["soak"]
            print(f"soak {args.seconds:.0f}s: {s['requests']} requests, {s['http_5xx']} 5xx, "
                  f"{s['timeouts']} time-outs, {s['client_errors']} client errors, "
                  f"{s['qps']} req/s, p50 {s['latency'].get('p50_ms')} ms, "
                  f"p99 {s['latency'].get('p99_ms')} ms; memory {s['memory']}", flush=True)
        if args.kill_replica:
            report["kill_replica"] = k = kill_replica(url, work / "bodies.json", work,
                                                      bodies[0], args)
            print(f"kill: {k['failed_requests']} of {k['requests']} requests failed "
                  f"{k['failed_outcomes']}; replacement alive after "
                  f"{k['replacement_alive_after_s']} s, first success "
                  f"{k['first_success_after_kill_s']} s after the kill; same scores: "
                  f"{k['same_scores_after_replacement']}", flush=True)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if temp:
            import shutil

            shutil.rmtree(temp, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": str(checkpoint), "concurrency": args.concurrency,
        "candidates": args.candidates, "client_timeout_s": args.timeout_s,
        "proxy_request_timeout_s": REQUEST_TIMEOUT_S,  # app_config's http_options default
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": [round(x, 1) for x in load_before],
                    "loadavg_after": [round(x, 1) for x in os.getloadavg()]},
        "replica": {"num_cpus": 1, "torch_threads": args.threads},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **report,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint, train or tune output")
    p.add_argument("--seconds", type=float, default=300.0, help="soak duration (0: skip)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--timeout-s", type=float, default=10.0, help="client time-out per request")
    p.add_argument("--bucket-s", type=float, default=60.0, help="latency percentile window")
    p.add_argument("--sample-s", type=float, default=5.0, help="memory sampling period")
    p.add_argument("--warmup-s", type=float, default=10.0,
                   help="memory growth is counted from the first sample after this")
    p.add_argument("--kill-replica", action="store_true",
                   help="then kill the replica process under the same load")
    p.add_argument("--kill-seconds", type=float, default=45.0)
    p.add_argument("--kill-at", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_soak.json"))
    # client process
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--bodies", help=argparse.SUPPRESS)
    p.add_argument("--records", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_main(args)
    if not args.checkpoint:
        p.error("--checkpoint is required")
    return server_main(args)


if __name__ == "__main__":
    sys.exit(main())
