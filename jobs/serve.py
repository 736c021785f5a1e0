"""Deploy the CTR endpoint (Ray Serve) to the cluster this job is submitted to.

    ray job submit --working-dir . -- python jobs/serve.py \\
        --checkpoint /mnt/shared/din/runs/tune --host 0.0.0.0 --port 8000 --replicas 2 \
        --token-file /mnt/shared/din/serve-token
    curl -s -H "Authorization: Bearer $(cat serve-token)" http://HEAD_IP:8000/v1/model

The arguments are `din-ray serve`'s (`din-ray serve --help`) without the local-Ray ones
(--num-cpus, --temp-dir): the driver joins the cluster named by RAY_ADDRESS (set by the job
server; --address overrides it), deploys the application the way `serve deploy` does (the Serve
REST API, `din_ray.serve.deploy`), waits until its replicas are healthy and exits. The
application outlives the job: Serve's controller belongs to the cluster. Submitting again with
other batching settings (--max-batch-size, --batch-wait-ms) reconfigures the live replicas;
`serve shutdown --address http://HEAD_IP:8265 -y` takes it down.

--checkpoint (a checkpoint, a `din-ray train` output or a `din-ray tune` output) is resolved by
the driver and loaded by every replica: on a multi-node cluster it must be a shared filesystem
path. --host 0.0.0.0 makes the endpoint reachable from outside the head node, and then needs an
API token (--token-file or DIN_RAY_SERVE_TOKEN; every endpoint but /healthz checks it) or an
explicit --insecure.
"""

from __future__ import annotations

import logging
import os
import sys

from din_ray.checkpoint import CheckpointError
from din_ray.cli import build_parser
from din_ray.cli.serve import app_config
from din_ray.serve.scoring import resolve_checkpoint


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        address = _cluster_address(args.address, args.num_cpus, args.temp_dir)
        checkpoint = resolve_checkpoint(args.checkpoint).resolve()
        config = app_config(args, checkpoint)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"jobs/serve.py: error: {e}", file=sys.stderr)
        return 2

    import ray

    from din_ray.ray_session import connect
    from din_ray.serve.deploy import deploy

    connect(address, log_to_driver=args.verbose)
    try:
        deploy(config)
    finally:
        ray.shutdown()  # disconnects this driver; the application keeps running
    print(f"serving {checkpoint} at http://{args.host}:{args.port}/v1/ctr "
          f"(GET /v1/model, /v1/stats, /healthz) on the cluster at {address}", flush=True)
    return 0


def _cluster_address(address: str | None, num_cpus: int | None, temp_dir: str | None) -> str:
    """The running cluster to deploy to. A Ray started by this process would end, and take the
    application with it, when the job exits, so there must be one to join."""
    if num_cpus is not None or temp_dir is not None:
        raise ValueError("--num-cpus and --temp-dir configure a local Ray; this job deploys to "
                         "the running cluster (use `din-ray serve` to serve on this machine)")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ValueError("no Ray cluster to deploy to: submit this with `ray job submit` (which "
                         "sets RAY_ADDRESS) or pass --address HOST:PORT")
    return address


if __name__ == "__main__":
    sys.exit(main())
