"""Ray Serve app: DIN click-through rates over HTTP, with candidate-counting dynamic batching.

    din-ray serve --checkpoint runs/din                      # embedded, binds 127.0.0.1:8000
    serve run serve/config.yaml                              # set its checkpoint path first
    serve run din_ray.serve.app:build_app checkpoint=runs/din max_batch_size=512

`build_app` is a typed application builder: its one parameter is annotated with the Pydantic
model `din_ray.serve.settings.ServeArgs`, so Serve validates the `args` of a config or of
`serve run` against it (every setting and default is stated there, once).

    curl -s 127.0.0.1:8000/v1/ctr -d '{"history": {"item_id": [1, 50], "cate_id": ["Comedy",
        "Drama"]}, "candidates": [{"item_id": 296, "cate_id": "Comedy"}], "explain": true}'

Endpoints: POST /v1/ctr (request format in `din_ray.serve.request`), GET /v1/model, GET /v1/stats
(this replica's batching counters), GET /healthz; and, where Serve's gRPC proxy runs
(`din-ray serve --grpc-port`), the gRPC method `din_ray.CTR/Score`: the same JSON body and
response as POST /v1/ctr, the same token (as `authorization` metadata) and batches
(`din_ray.serve.grpc_api`).

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
update and the old model stays served. `din_ray.serve.deploy.with_checkpoint(config, path)`
builds that config, and `din_ray.serve.deploy.deploy` deploys it.

Nothing starts at import: `build_app` / `CTRServer.bind(...)` return an application that
`serve run`, `serve deploy` or `din_ray.serve.deploy` starts. (No `from __future__ import
annotations` here: FastAPI reads the endpoint annotations at run time to recognise the `Request`
parameter, and Serve reads `build_app`'s to find its Pydantic model.)
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass

import grpc
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext
from starlette.exceptions import HTTPException

from din_ray.serve.access import TOKEN_ENV, access_token
from din_ray.serve.grpc_api import STATUS_CODES, JSONMessage
from din_ray.serve.request import ParsedRequest, RequestError, RequestLimits
from din_ray.serve.scoring import Scores, ServedModel, resolve_checkpoint
from din_ray.serve.settings import BatchingConfig, ServeArgs

log = logging.getLogger(__name__)


def unauthorized() -> RequestError:
    """The refusal of a request without the API token (HTTP 401, gRPC UNAUTHENTICATED)."""
    return RequestError(401, "authorization",
                        "missing or wrong API token; send 'Authorization: Bearer <token>'")


api = FastAPI(title="din-ray", description="DIN click-through-rate scoring")


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths and wrong methods answer in the same error format as bad bodies."""
    field = "method" if exc.status_code == 405 else "path"
    return JSONResponse({"error": {"field": field, "message": f"{exc.detail}: "
                                   f"{request.method} {request.url.path}"}},
                        status_code=exc.status_code, headers=exc.headers)


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


# Replica resources, batching and max_ongoing_requests come from `build_app` (`ServeArgs`).
@serve.deployment(health_check_period_s=10)
@serve.ingress(api)
class CTRServer:
    """One replica: a checkpoint loaded once, requests scored in candidate-counted batches.

    Args:
        args: the application's arguments; of them the replica uses `checkpoint` (resolved to
            a checkpoint directory), the request limits (`max_candidates`, `max_body_bytes`),
            `threads` (torch intra-op threads: match its num_cpus) and `token_sha256` (the API
            token's digest; None leaves the endpoints open).

    The model lives on the replica's GPU when Ray gave it one (`ray_actor_options.num_gpus`,
    `gpus_per_replica` in `build_app`), else on the CPU.
    """

    def __init__(self, args: ServeArgs) -> None:
        torch.set_num_threads(args.threads)
        self.token_sha256 = args.token_sha256
        self.limits = RequestLimits(max_candidates=args.max_candidates,
                                    max_body_bytes=args.max_body_bytes)
        # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPUs, so its first one is cuda:0.
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.built_checkpoint = args.checkpoint
        self.served = ServedModel.load(args.checkpoint, self.limits, self.device)
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

    def _authorized(self, authorization: str) -> bool:
        """Whether an `Authorization` header (or gRPC metadata) value carries the API token, or
        no token is configured. Digests of equal length are compared in constant time, so
        timing reveals nothing of the token."""
        if self.token_sha256 is None:
            return True
        scheme, _, token = authorization.partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token_sha256)

    def _refused(self, request: Request) -> JSONResponse | None:
        """401 unless the request carries the API token (when one is configured)."""
        if self._authorized(request.headers.get("authorization", "")):
            return None
        return JSONResponse(unauthorized().to_dict(), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

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

    async def Score(self, body: bytes, grpc_context: RayServegRPCContext) -> JSONMessage:  # noqa: N802
        """`POST /v1/ctr` over gRPC (`din_ray.serve.grpc_api`): the same JSON body in, the same
        JSON out, the same batches. A refusal sets the gRPC code matching the HTTP status
        (`STATUS_CODES`) with the error JSON as its details."""
        metadata = dict(grpc_context.invocation_metadata())
        try:
            if not self._authorized(metadata.get("authorization", "")):
                raise unauthorized()
            if len(body) > self.limits.max_body_bytes:
                raise RequestError(413, "body", f"{len(body)} bytes; the limit is "
                                                f"{self.limits.max_body_bytes}")
            served = self.served
            parsed = served.parser.parse_body(body)
        except RequestError as e:
            error = json.dumps(e.to_dict())
            grpc_context.set_code(STATUS_CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT))
            grpc_context.set_details(error)
            return JSONMessage(error.encode())
        scores = await self.score_batch(Job(served, parsed))
        return JSONMessage(json.dumps(served.response(parsed, scores)).encode())

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


def _token_digest(args: ServeArgs) -> str | None:
    """The hex SHA-256 of the API token: `token_sha256` if given, else that of
    $DIN_RAY_SERVE_TOKEN in this (the app-building) process; None for an open server, which
    `require_token` refuses."""
    digest = args.token_sha256
    if not digest:
        # Loopback host: access_token only reads and length-checks the variable here; whether
        # a token is needed is `require_token`'s call (the bound host is not known to the app).
        token = access_token("127.0.0.1", None, insecure=False)
        digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    if not digest and args.require_token:
        raise ValueError(f"require_token is set but there is no API token: set ${TOKEN_ENV} "
                         "where the app is built (k8s/rayservice.yaml: the din-ray-serve-token "
                         "Secret) or give token_sha256")
    return digest


def build_app(args: ServeArgs) -> Application:
    """The CTR application for `args` (Serve's typed application builder: `serve run` and
    config deploys pass a dict, which Serve validates into `ServeArgs` first).

    `serve run din_ray.serve.app:build_app checkpoint=DIR [max_batch_size=N] [batch_wait_ms=MS]
    [max_candidates=N] [max_body_bytes=N] [threads=N] [max_ongoing_requests=N]
    [num_replicas=N] [gpus_per_replica=N] [token_sha256=HEX] [require_token=true]`: see
    `ServeArgs`. Without token_sha256 the token is $DIN_RAY_SERVE_TOKEN of this (the
    app-building) process, if set (`_token_digest`).

    Raises:
        CheckpointError: `args.checkpoint` is no checkpoint, train output or tune output.
        ValueError: `require_token` without any token.
    """
    if not isinstance(args, ServeArgs):  # called from Python with a plain dict
        args = ServeArgs.model_validate(args)
    args = args.model_copy(update={"token_sha256": _token_digest(args)})
    # Resolved here, where the command was given, so that replicas get an absolute path and a
    # wrong one fails the deploy at once instead of crash-looping replicas.
    args = args.model_copy(update={"checkpoint":
                                   str(resolve_checkpoint(args.checkpoint).resolve())})
    options: dict = {"user_config": asdict(args.batching()),
                     "ray_actor_options": _actor_options(args.gpus_per_replica),
                     "max_ongoing_requests": args.ongoing_requests()}
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    return CTRServer.options(**options).bind(args)
