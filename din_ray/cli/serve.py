"""`din-ray serve`: host a checkpoint behind Ray Serve on this machine.

    din-ray serve --checkpoint runs/din              # train output (has checkpoint/)
    din-ray serve --checkpoint runs/tune             # tune output (best.json names the best)
    curl -s 127.0.0.1:8000/v1/model

Starts (or joins, with --address) a Ray cluster, deploys the application of
`din_ray.serve.app` (`din_ray.serve.deploy`, a Serve config deploy) and keeps it up until Ctrl-C
or SIGTERM, then shuts Serve down. The serving flags are `din_ray.serve.settings.ServeArgs`'s
fields, with its defaults and help. Binds 127.0.0.1 unless told otherwise;
any other address needs an API token (`--token-file`, or the DIN_RAY_SERVE_TOKEN environment
variable) that clients send as `Authorization: Bearer <token>`, or an explicit `--insecure`:

    din-ray serve --checkpoint runs/din --host 0.0.0.0 --token-file ~/.din-ray-token
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import time
from pathlib import Path

from din_ray.checkpoint import resolve_checkpoint
from din_ray.serve.access import TOKEN_ENV, access_token
from din_ray.serve.settings import REQUEST_TIMEOUT_S, ServeArgs

# Command-line flag -> (ServeArgs field, type); the flags' defaults and help are the fields'.
FLAGS = {"--max-batch-size": ("max_batch_size", int), "--batch-wait-ms": ("batch_wait_ms", float),
         "--gpus-per-replica": ("gpus_per_replica", float),
         "--max-ongoing-requests": ("max_ongoing_requests", int),
         "--max-candidates": ("max_candidates", int), "--max-body-bytes": ("max_body_bytes", int),
         "--replicas": ("num_replicas", int), "--threads": ("threads", int)}


def serve_args(args: argparse.Namespace, checkpoint: Path) -> ServeArgs:
    """The application's arguments for the command line's settings (and API token)."""
    values = {field: getattr(args, field) for field, _ in FLAGS.values()}
    token = access_token(args.host, args.token_file, args.insecure)
    if args.grpc_port is not None and token is None and not args.insecure:
        # Serve's gRPC proxy listens on every interface ([::]:port), whatever --host says.
        raise ValueError(f"--grpc-port {args.grpc_port}: Serve's gRPC proxy listens on every "
                         "interface and accepts connections from other machines: give an API "
                         f"token with --token-file or ${TOKEN_ENV}, or pass --insecure to "
                         "serve without one")
    if token is not None:
        values["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    return ServeArgs(checkpoint=str(checkpoint), **values)


def app_config(args: argparse.Namespace, checkpoint: Path) -> dict:
    """The Serve config (serve/config.yaml's schema) for the command line's settings."""
    from din_ray.serve.deploy import app_config as config_for

    return config_for(serve_args(args, checkpoint), host=args.host, port=args.port,
                      access_log=args.access_log, request_timeout_s=args.request_timeout_s,
                      grpc_port=args.grpc_port)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.checkpoint).resolve()
    config = app_config(args, checkpoint)

    import ray
    from ray import serve

    from din_ray.ray_session import connect
    from din_ray.serve.deploy import deploy
    from din_ray.serve.grpc_api import METHOD

    temp_dir = str(Path(args.temp_dir).resolve()) if args.temp_dir else None
    connect(args.address, num_cpus=args.num_cpus, temp_dir=temp_dir, log_to_driver=args.verbose)
    signal.signal(signal.SIGTERM, _stop)
    try:
        deploy(config)
        print(f"serving {checkpoint} at http://{args.host}:{args.port}/v1/ctr "
              "(GET /v1/model, /v1/stats, /healthz)"
              + (f" and gRPC [::]:{args.grpc_port} {METHOD}" if args.grpc_port is not None
                 else "") + "; Ctrl-C to stop", flush=True)
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
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve the CTR endpoint over gRPC on this port (every interface; "
                        "method /din_ray.CTR/Score, the same JSON body; din_ray.serve.grpc_api)")
    p.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S,
                   help="the HTTP proxy answers a request not done in this time with 408 "
                        f"instead of holding it (default {REQUEST_TIMEOUT_S:g})")
    for flag, (field, kind) in FLAGS.items():
        info = ServeArgs.model_fields[field]
        p.add_argument(flag, dest=field, type=kind, default=info.default,
                       help=info.description + ("" if info.default is None
                                                else f" (default {info.default})"))
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
