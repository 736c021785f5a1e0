"""Throughput and peak memory of `din_ray.data.logs.pipeline.prepare_logs` on synthetic logs.

    python benchmarks/prepare_logs.py --impressions 20000000 --rows-per-bucket 1000000
    python benchmarks/prepare_logs.py --impressions 1000000 --work /tmp/pl-1m

Generates (once, reused when present) a synthetic impression log with `--behaviors-per-impression`
times as many behaviours plus its ad and user-profile tables (`din_ray.data.logs.synthetic`),
then prepares it with the Ray Data pipeline on a local Ray started here, so that every Ray
process (GCS, raylet, workers) is a descendant of this one. A sampler thread reads /proc every
`--sample-every` seconds and records the peak over time of the summed resident memory of this
process and all its descendants: total RSS, and RSS without shared pages (RssAnon: the private
heap, what grows with data held in a process), plus the largest single process. Peak memory is
printed beside the input and output sizes (Parquet on disk, and in memory as Arrow tables).

Rows/s counts input rows (impressions + behaviours) over the prepare wall time. Results are
appended (one entry per --impressions, --rows-per-bucket and --executor) to
benchmarks/results/prepare_logs.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from din_ray.data.logs.pipeline import prepare_logs
from din_ray.data.logs.synthetic import write_synthetic_logs

RESULTS = Path(__file__).parent / "results" / "prepare_logs.json"


def _status(pid: int) -> dict[str, int]:
    """VmRSS/RssAnon/RssShmem (bytes) and the parent pid of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
            elif key == "PPid":
                out["ppid"] = int(rest.split()[0])
    return out


def tree_memory(root: int) -> dict[str, int]:
    """Summed memory of `root` and its descendants (bytes), and their count."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                procs[int(name)] = _status(int(name))
            except (OSError, ValueError):
                continue  # exited while we looked
    children: dict[int, list[int]] = {}
    for pid, st in procs.items():
        children.setdefault(st.get("ppid", 0), []).append(pid)
    stack, seen = [root], []
    while stack:
        pid = stack.pop()
        if pid in procs:
            seen.append(pid)
            stack.extend(children.get(pid, []))
    total = {k: sum(procs[p].get(k, 0) for p in seen) for k in ("VmRSS", "RssAnon", "RssShmem")}
    total["max_process_rss"] = max((procs[p].get("VmRSS", 0) for p in seen), default=0)
    total["processes"] = len(seen)
    return total


def descendants(root: int) -> list[int]:
    """Pids of the processes below `root`, from /proc."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parent[int(name)] = _status(int(name)).get("ppid", 0)
            except (OSError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out.extend(kids)
        frontier = kids
    return out


def kill_descendants() -> None:
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class PeakSampler(threading.Thread):
    """Samples `tree_memory(os.getpid())` until stopped; keeps the peaks."""

    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            m = tree_memory(me)
            for k, v in m.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self.samples += 1
            self._stop_event.wait(self.every)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        return self.peak


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def arrow_bytes(path: Path, max_files: int | None = None) -> int:
    """In-memory (Arrow) size of the Parquet data under `path`: every file, or `max_files` of
    them scaled up by row count. One file at a time."""
    files = sorted(path.rglob("*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    sample = files if max_files is None else files[:: max(1, len(files) // max_files)]
    got_bytes = got_rows = 0
    for p in sample:
        t = pq.read_table(p)
        got_bytes += t.nbytes
        got_rows += t.num_rows
        del t
    return int(got_bytes * rows / max(got_rows, 1))


def start_ray(args: argparse.Namespace) -> None:
    """A local Ray whose workers run at niceness `args.nice`; retried, because on a shared,
    overloaded machine the raylet can time out waiting for its agents."""
    import ray

    def lower_priority() -> None:  # runs in every Ray worker as it starts
        os.nice(args.nice)

    for attempt in range(40):
        try:
            # No dashboard: fewer processes to start on a loaded machine (Ray Data needs none).
            ray.init(num_cpus=args.num_cpus, object_store_memory=args.object_store_mb << 20,
                     include_dashboard=False, _temp_dir=f"/tmp/ray-pl{os.getpid()}",
                     runtime_env={"worker_process_setup_hook": lower_priority})
            return
        except Exception as e:  # Ray raises a bare Exception for a startup timeout
            print(f"ray.init attempt {attempt + 1} failed: {e}")
            ray.shutdown()
            kill_descendants()  # a failed start leaves its GCS and agents running
            time.sleep(45)
    raise RuntimeError("could not start a local Ray")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impressions", type=int, default=20_000_000)
    ap.add_argument("--behaviors-per-impression", type=float, default=2.0)
    ap.add_argument("--max-history", type=int, default=50)
    ap.add_argument("--work", default="/tmp/din-prepare-logs", help="raw logs + output")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--rows-per-bucket", type=int, default=0, help="0: the spec's default")
    ap.add_argument("--sample-every", type=float, default=0.5)
    ap.add_argument("--nice", type=int, default=10,
                    help="niceness of the driver and the Ray workers (the CPU-heavy part) on a "
                         "shared machine; GCS and raylet keep normal priority so they start")
    ap.add_argument("--executor", choices=("ray", "local"), default="ray",
                    help="local: the pipeline's tasks in this process, without Ray")
    ap.add_argument("--keep-output", action="store_true")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    work = Path(args.work)
    raw = work / f"raw-{args.impressions}-{args.behaviors_per_impression}"
    spec_path = raw / "log_spec.yaml"
    gen_seconds = None
    if not spec_path.exists():
        shutil.rmtree(raw, ignore_errors=True)
        t0 = time.perf_counter()
        write_synthetic_logs(raw, args.impressions, max_history=args.max_history,
                             behaviors_per_impression=args.behaviors_per_impression)
        gen_seconds = time.perf_counter() - t0
        print(f"generated {raw} in {gen_seconds:.0f}s")
    input_disk = dir_bytes(raw)

    from din_ray.data.logs.spec import load_spec
    spec = load_spec(spec_path)
    if args.rows_per_bucket:
        from dataclasses import replace
        spec = replace(spec, rows_per_bucket=args.rows_per_bucket)
    if spec.max_history != args.max_history:
        from dataclasses import replace
        spec = replace(spec, max_history=args.max_history)

    import ray

    out = work / f"prepared-{args.impressions}"
    sampler = PeakSampler(args.sample_every)
    sampler.start()
    if args.executor == "ray":
        start_ray(args)
    os.nice(args.nice)  # the driver too; only Ray's control plane keeps normal priority
    try:
        t0 = time.perf_counter()
        report = prepare_logs(spec, out, overwrite=True, executor=args.executor)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
        peak = sampler.stop()
    rows_in = report.input_rows["impressions"] + report.input_rows["behaviors"]
    output_disk = dir_bytes(out)
    input_mem = arrow_bytes(raw, max_files=12)  # after the run: must not inflate the peaks
    output_mem = arrow_bytes(out, max_files=8)
    result = {
        "impressions": report.input_rows["impressions"],
        "behaviors": report.input_rows["behaviors"],
        "max_history": spec.max_history,
        "prepare_seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in report.seconds.items()},
        "rows_per_s": round(rows_in / seconds),
        "impressions_per_s": round(report.input_rows["impressions"] / seconds),
        "peak_rss_total_mb": peak.get("VmRSS", 0) >> 20,
        "peak_rss_private_mb": peak.get("RssAnon", 0) >> 20,
        "peak_rss_shared_mb": peak.get("RssShmem", 0) >> 20,
        "peak_single_process_mb": peak.get("max_process_rss", 0) >> 20,
        "peak_processes": peak.get("processes", 0),
        "memory_samples": sampler.samples,
        "input_parquet_mb": input_disk >> 20,
        "input_in_memory_mb": input_mem >> 20,
        "output_parquet_mb": output_disk >> 20,
        "output_in_memory_mb": output_mem >> 20,
        "rows_out": report.rows,
        "buckets": report.buckets,
        "units": report.units,
        "vocab_sizes": report.vocab_sizes,
        "generate_seconds": None if gen_seconds is None else round(gen_seconds, 1),
        "num_cpus": args.num_cpus,
        "rows_per_bucket": args.rows_per_bucket,
        "executor": args.executor,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result, indent=2))
    print(f"\n{rows_in:,} input rows in {seconds:.0f}s = {result['rows_per_s']:,} rows/s; "
          f"peak memory {result['peak_rss_total_mb']:,} MB total RSS "
          f"({result['peak_rss_private_mb']:,} MB private) over {result['peak_processes']} "
          f"processes; input {result['input_parquet_mb']:,} MB Parquet / "
          f"{result['input_in_memory_mb']:,} MB in memory; output "
          f"{result['output_parquet_mb']:,} MB Parquet / {result['output_in_memory_mb']:,} MB "
          f"in memory")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {"runs": []}
    key = ("impressions", "rows_per_bucket", "executor")
    existing["runs"] = [r for r in existing["runs"]
                        if tuple(r.get(k) for k in key) != tuple(result[k] for k in key)] + [result]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(existing, indent=2) + "\n")
    tmp.replace(path)
    if not args.keep_output:
        shutil.rmtree(out, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
