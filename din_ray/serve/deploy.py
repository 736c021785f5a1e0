"""Deploy the CTR application to the connected Ray cluster through Serve's documented
interfaces: a Serve config (the schema of serve/config.yaml, `ray.serve.schema.ServeDeploySchema`)
sent to the Serve REST API (`PUT /api/serve/applications/` on the cluster's dashboard, what
`serve deploy` does), then `serve.status()` until the application runs.

Why a config deploy and not `serve.run`: Serve versions the deployments of a config, so a second
deploy that changes only `user_config` (batch size, wait, `checkpoint`) updates the live replicas
in place through `reconfigure`; an application started by `serve.run` gets new replicas on every
call.

    config = app_config(ServeArgs(checkpoint="runs/din"), port=8000)
    deploy(config)                                        # starts Serve if needed, waits
    deploy(app_config(args, user_config={"max_batch_size": 64}))   # reconfigures live replicas
    deploy(with_checkpoint(config, "runs/din-day2"))                  # swaps the model
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

from din_ray.ray_session import dashboard_url
from din_ray.serve.grpc_api import SERVICER_FUNCTION
from din_ray.serve.scoring import resolve_checkpoint
from din_ray.serve.settings import REQUEST_TIMEOUT_S, BatchingConfig, ServeArgs

APP_NAME = "din"
DEPLOYMENT = "CTRServer"
IMPORT_PATH = "din_ray.serve.app:build_app"
APPLICATIONS_PATH = "/api/serve/applications/"  # the Serve REST API (Ray's dashboard)
# Batching lives in the deployment's user_config, not in the app's args: changing args makes
# Serve restart the replicas, changing user_config reconfigures them.
LIVE_ARGS = {"max_batch_size", "batch_wait_ms"}


def app_config(args: ServeArgs | dict, *, host: str = "127.0.0.1", port: int = 8000,
               user_config: dict | None = None, deployment: dict | None = None,
               access_log: bool = False,
               request_timeout_s: float = REQUEST_TIMEOUT_S,
               grpc_port: int | None = None) -> dict:
    """A Serve config (the schema of serve/config.yaml) running the CTR app with `args`.

    Args:
        args: the application's arguments (`ServeArgs`, or a dict of them).
        user_config: batching settings (`BatchingConfig` fields) instead of the ones `args`
            asks for; changing only these and deploying again reconfigures the running
            replicas instead of restarting them.
        deployment: further deployment options (num_replicas, autoscaling_config, ...).
        request_timeout_s: the HTTP proxy answers a request not done after this many seconds
            with 408 instead of holding it (see `REQUEST_TIMEOUT_S`).
        grpc_port: also start Serve's gRPC proxy on this port with the `din_ray.CTR` service
            (`din_ray.serve.grpc_api`). It listens on every interface, and like the HTTP port
            it is fixed when Serve starts: a later deploy cannot change it.
    """
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    batching = (args.batching() if user_config is None
                else BatchingConfig.from_dict(user_config))
    live = {k: v for k, v in asdict(batching).items() if k != "checkpoint" or v}
    # max_ongoing_requests at least the batch size that user_config asks for.
    args = args.model_copy(update={"max_ongoing_requests": max(args.ongoing_requests(),
                                                               batching.max_batch_size)})
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port, "request_timeout_s": request_timeout_s},
        "applications": [{
            # An installed module, so the controller can import it whatever its sys.path.
            "name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
            "args": args.model_dump(exclude_none=True, exclude=LIVE_ARGS),
            "logging_config": {"enable_access_log": access_log},
            "deployments": [{"name": DEPLOYMENT, **(deployment or {}), "user_config": live}],
        }],
    }
    if grpc_port is not None:
        config["grpc_options"] = {"port": grpc_port, "request_timeout_s": request_timeout_s,
                                  "grpc_servicer_functions": [SERVICER_FUNCTION]}
    return config


def with_checkpoint(config: dict, checkpoint: str | Path) -> dict:
    """`config` (an `app_config`) serving `checkpoint` instead: deploying it swaps the model in
    the running replicas without a restart (see "Swapping" in `din_ray.serve.app`)."""
    path = str(resolve_checkpoint(checkpoint).resolve())  # a wrong path fails here, not there
    apps = []
    for a in config["applications"]:
        deployments = [{**d, "user_config": {**d.get("user_config", asdict(BatchingConfig())),
                                             "checkpoint": path}} for d in a["deployments"]]
        apps.append({**a, "deployments": deployments})
    return {**config, "applications": apps}


def deploy(config: dict, timeout_s: float = 300, dashboard: str | None = None) -> None:
    """Deploy `config` to the connected Ray cluster the way `serve deploy` does and wait until
    its applications run (their deployments healthy).

    Args:
        config: a Serve config (`app_config`, serve/config.yaml's schema).
        dashboard: the cluster's dashboard URL (default: the connected cluster's).

    Raises:
        ValueError: `config` is not a valid Serve config.
        RuntimeError: the REST API refused it, or an application failed to deploy.
        TimeoutError: the applications are not running after `timeout_s`.
    """
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)  # refuse a bad config here, not there
    _put_json((dashboard or dashboard_url()) + APPLICATIONS_PATH, config)
    names = [a.name for a in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "MISSING" for n in names}
        if all(s == "RUNNING" for s in states.values()):
            busy = [d for n in names for d in apps[n].deployments.values()
                    if d.status != "HEALTHY"]
            if not busy:
                return
        failed = {n: apps[n].message for n in names
                  if n in apps and apps[n].status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"Serve application failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications not running after {timeout_s}s: {states}")
        time.sleep(0.2)


def _put_json(url: str, body: dict) -> None:
    headers = {"Content-Type": "application/json", **_ray_auth_header()}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"PUT {url}: HTTP {e.code}: "
                           f"{e.read().decode(errors='replace')[:2000]}") from None


def _ray_auth_header() -> dict[str, str]:
    """The bearer token of Ray's token authentication, found where Ray's documentation says Ray
    looks: $RAY_AUTH_TOKEN, the file named by $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. Sent
    whenever there is one (unless RAY_AUTH_MODE=disabled): Ray turns authentication on for a
    cluster started where a token file exists, even with RAY_AUTH_MODE unset."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}
