"""Ray Serve app: DIN click-through rates over HTTP, with candidate-counting dynamic batching.

    din-ray serve --checkpoint runs/din                      # embedded, binds 127.0.0.1:8000
    serve run serve/config.yaml                              # set its checkpoint path first
    serve run din_ray.serve.app:build_app checkpoint=runs/din max_batch_size=512

    curl -s 127.0.0.1:8000/v1/ctr -d '{"history": {"item_id": [1, 50], "cate_id": ["Comedy",
        "Drama"]}, "candidates": [{"item_id": 296, "cate_id": "Comedy"}], "explain": true}'

Endpoints: POST /v1/ctr (request format in `din_ray.serve.scoring`), GET /v1/model, GET /v1/stats
(this replica's batching counters), GET /healthz.

Access. Given `token_sha256` (the hex SHA-256 of an API token; `din-ray serve` derives it from
`--token-file` or DIN_RAY_SERVE_TOKEN and requires one to bind beyond loopback), every endpoint
but /healthz answers 401 unless the request carries `Authorization: Bearer <token>`. Only the
digest travels in the Serve config, which `serve status` and the dashboard show. A config
deployed with `serve deploy` or KubeRay (serve/config.yaml, k8s/rayservice.yaml) cannot hold a
secret: there `build_app` takes the token from $DIN_RAY_SERVE_TOKEN of the process that builds
the app (k8s/rayservice.yaml sets it from a Kubernetes Secret), and `require_token: true` makes a
build without any token fail instead of serving openly.

Batching. `@serve.batch` merges concurrent requests into one forward pass. `max_batch_size`
counts CANDIDATES, not requests (`batch_cost`): the forward pass costs what its candidates cost,
so a batch takes requests while their candidates fit. A request is never split: its user side is
computed once for all of its candidates, and a request with more candidates than
`max_batch_size` runs as a batch of its own (`max_batch_size=1` thus turns merging off). Batch
size and wait time live in `user_config` and change at run time through `reconfigure`.

Swapping the model with no downtime. `user_config.checkpoint` names the checkpoint to serve
("" = the one the app was built with). Deploying the same config with only that key changed is a
lightweight update (Serve's in-place `user_config` update): each replica loads the new checkpoint
in a thread while it keeps answering with the old one, then switches with one assignment. A
request is parsed and scored by the model that was current when it arrived, so requests in
flight during the swap complete with either version and none fails; /v1/model and every
response's `model.version` say which one answered. A checkpoint that fails to load fails the
update and the old model stays served. `with_checkpoint(config, path)` builds that config.

Nothing starts at import: `build_app` / `CTRServer.bind(...)` return an application that
`serve.run` or `serve deploy` starts. (No `from __future__ import annotations` here: FastAPI
reads the endpoint annotations at run time to recognise the `Request` parameter.)
"""

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from din_ray.serve.access import TOKEN_ENV, access_token
from din_ray.serve.scoring import (
    ParsedRequest,
    RequestError,
    RequestLimits,
    Scores,
    ServedModel,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)

api = FastAPI(title="din-ray", description="DIN click-through-rate scoring")


# GPU replicas: 8192 candidates (about forty 200-ad requests) per pass, waiting up to 5 ms.
GPU_MAX_BATCH_SIZE = 8192
GPU_BATCH_WAIT_S = 0.005


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths and wrong methods answer in the same error format as bad bodies."""
    field = "method" if exc.status_code == 405 else "path"
    return JSONResponse({"error": {"field": field, "message": f"{exc.detail}: "
                                   f"{request.method} {request.url.path}"}},
                        status_code=exc.status_code, headers=exc.headers)


@dataclass(frozen=True)
class BatchingConfig:
    """The deployment's `user_config`, applied by `reconfigure` without a restart.

    Args:
        max_batch_size: candidates merged into one forward pass (from any number of requests).
            Default: about five 200-ad requests, enough to amortise the per-call overhead while
            keeping one pass around a few ms on a CPU core.
        batch_wait_timeout_s: how long the first request of a batch waits for company. Small,
            since the paper's online budget for a ranking call is ~10 ms.
    """

    max_batch_size: int = 1024
    batch_wait_timeout_s: float = 0.002
    # The checkpoint to serve instead of the built one ("" = the built one): see "Swapping".
    checkpoint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got "
                             f"{self.max_batch_size!r}")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 1] seconds, got "
                             f"{self.batch_wait_timeout_s!r}")

    @classmethod
    def from_dict(cls, raw: dict | None) -> "BatchingConfig":
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown user_config keys {unknown}; known: "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**raw)

    @classmethod
    def default(cls, gpus: float = 0) -> "BatchingConfig":
        """The defaults for a replica with `gpus` GPUs: on a GPU a forward pass costs about the
        same for 1k or 8k candidates (the launch overhead dominates), so batches are larger
        and may wait a little longer to fill; the paper reports request batching doubling QPS
        on its GPU servers (§6). GPU_* are starting points, not figures measured here."""
        if gpus > 0:
            return cls(max_batch_size=GPU_MAX_BATCH_SIZE, batch_wait_timeout_s=GPU_BATCH_WAIT_S)
        return cls()


@dataclass(frozen=True)
class Job:
    """One parsed request and the loaded model that parsed it (and must score it)."""

    served: ServedModel
    request: ParsedRequest

    @property
    def num_candidates(self) -> int:
        return self.request.num_candidates


def score_jobs(jobs: list[Job]) -> list[Scores]:
    """Score a batch; a swap can land between two requests of one batch, so each group of
    requests is scored by the model that parsed it."""
    out: list[Scores | None] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job.served), []).append(i)
    for rows in groups.values():
        served = jobs[rows[0]].served
        for i, scores in zip(rows, served.scorer.score([jobs[i].request for i in rows]),
                             strict=True):
            out[i] = scores
    return out


def batch_cost(requests: list[Job]) -> int:
    """Size of a would-be batch for `@serve.batch`: its candidates.

    A lone request counts as 1 whatever its size: serve.batch rejects a first item larger than
    `max_batch_size`, but such a request must still be served, alone, unsplit. From the second
    request on the real candidate total decides whether the batch may grow.
    """
    if len(requests) == 1:
        return 1
    return sum(r.num_candidates for r in requests)


class BatchStats:
    """What this replica's batches looked like (reported by GET /v1/stats)."""

    def __init__(self, recent: int = 256) -> None:
        self.batches = 0
        self.requests = 0
        self.candidates = 0
        self.max_requests = 0
        self.max_candidates = 0
        self.requests_per_batch: Counter[int] = Counter()
        self.recent: deque[tuple[int, int]] = deque(maxlen=recent)

    def record(self, requests: int, candidates: int) -> None:
        self.batches += 1
        self.requests += requests
        self.candidates += candidates
        self.max_requests = max(self.max_requests, requests)
        self.max_candidates = max(self.max_candidates, candidates)
        self.requests_per_batch[requests] += 1
        self.recent.append((requests, candidates))

    def to_dict(self) -> dict:
        return {"batches": self.batches, "requests": self.requests,
                "candidates": self.candidates, "max_requests_per_batch": self.max_requests,
                "max_candidates_per_batch": self.max_candidates,
                "requests_per_batch": {str(k): v for k, v in
                                       sorted(self.requests_per_batch.items())},
                "recent_batches": [{"requests": r, "candidates": c} for r, c in self.recent]}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing early (413) once it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body", f"{declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body", f"more than {limit} bytes; the limit is {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(
    # At least max_batch_size: batches count candidates, and with 1-candidate requests a full
    # batch needs that many requests in flight (the default of 5 would silently cap batches).
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 1},
    user_config=asdict(BatchingConfig()),
    health_check_period_s=10,
)
@serve.ingress(api)
class CTRServer:
    """One replica: a checkpoint loaded once, requests scored in candidate-counted batches.

    Args:
        checkpoint: checkpoint, train output or tune output directory (`resolve_checkpoint`).
        max_candidates, max_body_bytes: request limits (`RequestLimits`).
        threads: torch intra-op threads for this replica (match its num_cpus).
        token_sha256: hex SHA-256 of the API token every endpoint but /healthz requires; None
            leaves them open.

    The model lives on the replica's GPU when Ray gave it one (`ray_actor_options.num_gpus`,
    `gpus_per_replica` in `build_app`), else on the CPU.
    """

    def __init__(self, checkpoint: str, max_candidates: int = 1000,
                 max_body_bytes: int = 1 << 20, threads: int = 1,
                 token_sha256: str | None = None) -> None:
        torch.set_num_threads(threads)
        self.token_sha256 = token_sha256
        self.limits = RequestLimits(max_candidates=max_candidates, max_body_bytes=max_body_bytes)
        # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPUs, so its first one is cuda:0.
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.built_checkpoint = checkpoint
        self.served = ServedModel.load(checkpoint, self.limits, self.device)
        self.stats = BatchStats()
        self.config = BatchingConfig()
        self.replica = f"{os.uname().nodename}:{os.getpid()}"
        self.started = time.time()

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new `user_config`: batch size and wait to the live batch queue, and a new
        checkpoint, loaded off the event loop (requests keep being served meanwhile)."""
        config = BatchingConfig.from_dict(user_config)
        target = resolve_checkpoint(config.checkpoint or self.built_checkpoint).resolve()
        if target != self.served.path:
            served = await asyncio.to_thread(ServedModel.load, target, self.limits,
                                           self.device)
            self.served = served  # one assignment: the swap
            log.info("now serving %s version %s", served.path, served.version)
        self.config = config
        self.score_batch.set_max_batch_size(self.config.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        log.info("batching: %s", self.config)

    @serve.batch(max_batch_size=BatchingConfig.max_batch_size,
                 batch_wait_timeout_s=BatchingConfig.batch_wait_timeout_s,
                 batch_size_fn=batch_cost)
    async def score_batch(self, jobs: list[Job]) -> list[Scores]:
        self.stats.record(len(jobs), sum(j.num_candidates for j in jobs))
        # The forward pass runs off the event loop so that requests keep being read and
        # validated (and queued for the next batch) meanwhile.
        return await asyncio.to_thread(score_jobs, jobs)

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the API token (when one is configured). Digests of
        equal length are compared in constant time, so timing reveals nothing of the token."""
        if self.token_sha256 is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
        if scheme.lower() == "bearer" and hmac.compare_digest(given, self.token_sha256):
            return None
        return JSONResponse({"error": {"field": "authorization", "message":
                                       "missing or wrong API token; send 'Authorization: "
                                       "Bearer <token>'"}},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @api.post("/v1/ctr")
    async def ctr(self, request: Request) -> JSONResponse:
        if refused := self._refused(request):
            return refused
        try:
            body = await _read_body(request, self.limits.max_body_bytes)
            served = self.served  # this request's model, whatever a swap does meanwhile
            parsed = served.parser.parse_body(body)
        except RequestError as e:
            return JSONResponse(e.to_dict(), status_code=e.status)
        scores = await self.score_batch(Job(served, parsed))
        return JSONResponse(served.response(parsed, scores))

    @api.get("/v1/model", response_model=None)
    def model(self, request: Request) -> dict | JSONResponse:
        return self._refused(request) or {**self.served.info(), "serving": self._serving()}

    @api.get("/v1/stats", response_model=None)
    def batch_stats(self, request: Request) -> dict | JSONResponse:
        return self._refused(request) or {**self._serving(), **self.stats.to_dict()}

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.served.model_ref()}

    def _serving(self) -> dict:
        return {"replica": self.replica, "uptime_s": round(time.time() - self.started, 3),
                "device": str(self.device), **asdict(self.config),
                "max_batch_size_counts": "candidates"}


def _actor_options(gpus: float = 0) -> dict:
    """One CPU (and `gpus` GPUs) per replica. Replicas unpickle `CTRServer` by reference to
    `din_ray.serve.app`; a PYTHONPATH set for this process (a source checkout not installed) is
    passed on so they import the same code."""
    options = {"num_cpus": 1}
    if os.environ.get("PYTHONPATH"):
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    if gpus > 0:
        options["num_gpus"] = gpus
    return options


BUILD_ARGS = ("checkpoint", "max_batch_size", "batch_wait_ms", "max_candidates",
              "max_body_bytes", "threads", "max_ongoing_requests", "num_replicas",
              "gpus_per_replica", "token_sha256", "require_token")


def _token_digest(args: dict) -> str | None:
    """The hex SHA-256 of the API token: `token_sha256` if given, else that of
    $DIN_RAY_SERVE_TOKEN in this (the app-building) process; None for an open server, which
    `require_token` refuses."""
    digest = str(args.get("token_sha256") or "").lower()
    if digest and (len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest)):
        raise ValueError("token_sha256 must be the 64 hex digits of the token's SHA-256")
    if not digest:
        # Loopback host: access_token only reads and length-checks the variable here; whether
        # a token is needed is `require_token`'s call (the bound host is not known to the app).
        token = access_token("127.0.0.1", None, insecure=False)
        digest = hashlib.sha256(token.encode()).hexdigest() if token else ""
    require = str(args.get("require_token", False)).lower()  # a YAML bool or a CLI string
    if require not in ("true", "false"):
        raise ValueError(f"require_token must be true or false, got {args['require_token']!r}")
    if not digest and require == "true":
        raise ValueError(f"require_token is set but there is no API token: set ${TOKEN_ENV} "
                         "where the app is built (k8s/rayservice.yaml: the din-ray-serve-token "
                         "Secret) or give token_sha256")
    return digest or None


def build_app(args: dict) -> Application:
    """`serve run din_ray.serve.app:build_app checkpoint=DIR [max_batch_size=N] [batch_wait_ms=MS]
    [max_candidates=N] [max_body_bytes=N] [threads=N] [max_ongoing_requests=N]
    [num_replicas=N] [gpus_per_replica=N] [token_sha256=HEX] [require_token=true]` (values
    arrive as strings from the command line or as YAML scalars from `serve/config.yaml`'s
    `args`). Without token_sha256 the token is $DIN_RAY_SERVE_TOKEN, if set (`_token_digest`)."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"unknown build_app arguments {unknown}; known: {list(BUILD_ARGS)}")
    if "checkpoint" not in args:
        raise ValueError("build_app needs checkpoint=DIR (a checkpoint, train or tune output)")
    digest = _token_digest(args)
    # Resolved here, where the command was given, so that replicas get an absolute path and a
    # wrong one fails the deploy at once instead of crash-looping replicas.
    checkpoint = str(resolve_checkpoint(args["checkpoint"]).resolve())
    gpus = float(args.get("gpus_per_replica", 0))
    if gpus < 0:
        raise ValueError(f"gpus_per_replica must be >= 0, got {gpus}")
    default = BatchingConfig.default(gpus)
    batching = BatchingConfig(
        max_batch_size=int(args.get("max_batch_size", default.max_batch_size)),
        batch_wait_timeout_s=float(args.get("batch_wait_ms",
                                            default.batch_wait_timeout_s * 1e3)) / 1e3)
    options: dict = {"user_config": asdict(batching), "ray_actor_options": _actor_options(gpus)}
    options.update({k: int(args[k]) for k in ("max_ongoing_requests", "num_replicas")
                    if k in args})
    server_args: dict = {k: int(args[k]) for k in ("max_candidates", "max_body_bytes", "threads")
                         if k in args}
    if digest:
        server_args["token_sha256"] = digest
    return CTRServer.options(**options).bind(checkpoint, **server_args)


def app_config(args: dict, *, host: str = "127.0.0.1", port: int = 8000,
               user_config: dict | None = None, deployment: dict | None = None,
               access_log: bool = False) -> dict:
    """A `serve deploy`-style config (the schema of serve/config.yaml) for this app.

    Args:
        args: `build_app` arguments (checkpoint=... at least).
        user_config: batching settings (`BatchingConfig` fields); changing only these and
            deploying again reconfigures the running replicas instead of restarting them.
        deployment: further deployment options (num_replicas, autoscaling_config, ...).
    """
    overrides = {"name": "CTRServer", **(deployment or {})}
    if user_config is not None:
        full = asdict(BatchingConfig.from_dict(user_config))
        overrides["user_config"] = {k: v for k, v in full.items() if k != "checkpoint" or v}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{
            # An installed module, so the controller can import it whatever its sys.path.
            "name": "din", "route_prefix": "/", "import_path": "din_ray.cli.serve:build_app",
            "args": {k: v for k, v in args.items() if v is not None},
            "logging_config": {"enable_access_log": access_log},
            "deployments": [overrides],
        }],
    }


def with_checkpoint(config: dict, checkpoint: str | Path) -> dict:
    """`config` (an `app_config`) serving `checkpoint` instead: deploying it swaps the model in
    the running replicas without a restart (see "Swapping" above)."""
    path = str(resolve_checkpoint(checkpoint).resolve())  # a wrong path fails here, not there
    apps = []
    for a in config["applications"]:
        deployments = [{**d, "user_config": {**d.get("user_config", asdict(BatchingConfig())),
                                             "checkpoint": path}} for d in a["deployments"]]
        apps.append({**a, "deployments": deployments})
    return {**config, "applications": apps}


def deploy(config: dict, timeout_s: float = 300) -> None:
    """Deploy `config` to the connected Ray cluster the way `serve run config.yaml` does, and
    wait until the application runs. A second call that changes only `user_config` updates
    the live replicas through `reconfigure` (Serve's versioning of config deployments); a
    Python `serve.run` would replace them."""
    from ray.serve._private.api import serve_start  # what the `serve` CLI itself calls
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(),
                         proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
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
