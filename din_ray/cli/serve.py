"""`din-ray serve`: host a checkpoint behind Ray Serve on this machine.

    din-ray serve --checkpoint runs/din              # train output (has checkpoint/)
    din-ray serve --checkpoint runs/tune             # tune output (best.json names the best)
    curl -s 127.0.0.1:8000/v1/model

Starts (or joins, with --address) a Ray cluster, deploys `din_ray/serve/app.py`'s application and keeps
it up until Ctrl-C or SIGTERM, then shuts Serve down. Binds 127.0.0.1 unless told otherwise;
any other address needs an API token (`--token-file`, or the DIN_RAY_SERVE_TOKEN environment
variable) that clients send as `Authorization: Bearer <token>`, or an explicit `--insecure`:

    din-ray serve --checkpoint runs/din --host 0.0.0.0 --token-file ~/.din-ray-token
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import signal
import time
from pathlib import Path

from din_ray.serve.access import TOKEN_ENV, access_token, is_loopback  # noqa: F401 (API)
from din_ray.serve.scoring import resolve_checkpoint


def load_app_module():
    """`din_ray.serve.app`, imported when first needed (it imports Ray Serve and FastAPI)."""
    return importlib.import_module("din_ray.serve.app")


def build_app(args: dict):
    """Serve import target that works wherever din-ray is installed
    (`import_path: din_ray.cli.serve:build_app`): din_ray/serve/app.py's `build_app`."""
    return load_app_module().build_app(args)


def app_config(args: argparse.Namespace, checkpoint: Path) -> dict:
    """The Serve config (serve/config.yaml's schema) for the command line's settings."""
    app = load_app_module()
    # Unset batching options take the defaults of the replica's kind (GPU or CPU).
    default = app.BatchingConfig.default(args.gpus_per_replica)
    max_batch_size = args.max_batch_size or default.max_batch_size
    wait_s = (default.batch_wait_timeout_s if args.batch_wait_ms is None
              else args.batch_wait_ms / 1e3)
    build_args = {"checkpoint": str(checkpoint), "max_candidates": args.max_candidates,
                  "max_body_bytes": args.max_body_bytes, "threads": args.threads,
                  "num_replicas": args.replicas, "gpus_per_replica": args.gpus_per_replica,
                  "max_ongoing_requests": max(args.max_ongoing_requests, max_batch_size)}
    token = access_token(args.host, args.token_file, args.insecure)
    if token is not None:
        build_args["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    user_config = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}
    return app.app_config(build_args, host=args.host, port=args.port,
                                        user_config=user_config, access_log=args.access_log)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.checkpoint).resolve()
    config = app_config(args, checkpoint)

    import ray
    from ray import serve

    from din_ray.ray_session import connect

    temp_dir = str(Path(args.temp_dir).resolve()) if args.temp_dir else None
    connect(args.address, num_cpus=args.num_cpus, temp_dir=temp_dir, log_to_driver=args.verbose)
    signal.signal(signal.SIGTERM, _stop)
    try:
        load_app_module().deploy(config)
        print(f"serving {checkpoint} at http://{args.host}:{args.port}/v1/ctr "
              "(GET /v1/model, /v1/stats, /healthz); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP with Ray Serve")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint, train output (checkpoint/) or tune output (best.json)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="candidates (not requests) merged into one forward pass "
                        "(default 1024; 8192 with --gpus-per-replica)")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="how long a batch waits to fill (default 2; 5 with --gpus-per-replica)")
    p.add_argument("--gpus-per-replica", type=float, default=0,
                   help="GPUs per replica; the replica holds the model on its GPU")
    p.add_argument("--max-ongoing-requests", type=int, default=1024,
                   help="requests in flight per replica (raised to the batch size if lower)")
    p.add_argument("--max-candidates", type=int, default=1000, help="per request")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="per request")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    p.add_argument("--address", default=None, help="join this Ray cluster instead")
    p.add_argument("--temp-dir", default=None, help="Ray temp dir of the local cluster")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the API token (else ${TOKEN_ENV}); required with a --host "
                        "beyond loopback")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --host beyond loopback without an API token")
    p.set_defaults(func=_serve)
