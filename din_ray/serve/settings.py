"""Every serving setting and its default, stated once: `ServeArgs` (the application's
arguments) and `BatchingConfig` (the live part, the deployment's `user_config`).

`ServeArgs` is the Pydantic model of Ray Serve's typed application builder
(`din_ray.serve.app.build_app`): Serve validates a config's or `serve run`'s `args` against it
(strings from the command line are converted, unknown keys refused), and `din-ray serve`,
`jobs/serve.py`, `serve/config.yaml` and `k8s/rayservice.yaml` all go through it, so a default
changed here changes everywhere. This module imports neither Ray nor FastAPI, so the CLI can
build its flags from it at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pydantic import BaseModel, ConfigDict, Field, field_validator

from din_ray.serve.request import RequestLimits

# GPU replicas: 8192 candidates (about forty 200-ad requests) per pass, waiting up to 5 ms.
GPU_MAX_BATCH_SIZE = 8192
GPU_BATCH_WAIT_S = 0.005
HEX = frozenset("0123456789abcdef")
# The HTTP proxy's end-to-end limit per request (Serve's `http_options.request_timeout_s`; past
# it the proxy answers 408 and cancels the request). Without one, a request that has no live
# replica to go to (one was killed and its replacement takes ~10 s to start) is held until the
# client gives up. 5 s: far beyond a ranking call's budget (~10 ms in the paper) and above the
# slowest request the soak measured at the batching defaults (p99 2.2 s, max 4.4 s with 64
# 200-ad requests queued on one shared CPU, docs/benchmarks.md), so only a request that cannot
# be served in time gets it.
REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BatchingConfig:
    """The deployment's `user_config`, applied by `reconfigure` without a restart.

    Args:
        max_batch_size: candidates merged into one forward pass (from any number of requests).
            Default: about five 200-ad requests, enough to amortise the per-call overhead while
            keeping one pass around a few ms on a CPU core.
        batch_wait_timeout_s: how long the first request of a batch waits for company. Small,
            since the paper's online budget for a ranking call is ~10 ms.
        checkpoint: the checkpoint to serve instead of the built one ("" = the built one); see
            "Swapping" in `din_ray.serve.app`.
    """

    max_batch_size: int = 1024
    batch_wait_timeout_s: float = 0.002
    checkpoint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got "
                             f"{self.max_batch_size!r}")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 1] seconds, got "
                             f"{self.batch_wait_timeout_s!r}")

    @classmethod
    def from_dict(cls, raw: dict | None) -> BatchingConfig:
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown user_config keys {unknown}; known: "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**raw)

    @classmethod
    def default(cls, gpus: float = 0) -> BatchingConfig:
        """The defaults for a replica with `gpus` GPUs: on a GPU a forward pass costs about the
        same for 1k or 8k candidates (the launch overhead dominates), so batches are larger
        and may wait a little longer to fill; the paper reports request batching doubling QPS
        on its GPU servers (§6). GPU_* are starting points, not figures measured here."""
        if gpus > 0:
            return cls(max_batch_size=GPU_MAX_BATCH_SIZE, batch_wait_timeout_s=GPU_BATCH_WAIT_S)
        return cls()


class ServeArgs(BaseModel):
    """The CTR application's arguments (`build_app`'s, a Serve config's `args`).

    Values given as strings (`serve run din_ray.serve.app:build_app max_batch_size=512`) are
    converted; unknown names are an error.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="checkpoint, train output (checkpoint/) or tune output "
                                        "(best.json)")
    max_batch_size: int | None = Field(
        None, ge=1, description="candidates (not requests) merged into one forward pass "
        f"(default {BatchingConfig.max_batch_size}; {GPU_MAX_BATCH_SIZE} with GPU replicas)")
    batch_wait_ms: float | None = Field(
        None, ge=0, le=1000, description="how long a batch waits to fill (default "
        f"{BatchingConfig.batch_wait_timeout_s * 1e3:g}; {GPU_BATCH_WAIT_S * 1e3:g} with GPU "
        "replicas)")
    max_candidates: int = Field(RequestLimits.max_candidates, ge=1, description="per request")
    max_body_bytes: int = Field(RequestLimits.max_body_bytes, ge=1, description="per request")
    threads: int = Field(1, ge=1, description="torch threads per replica (match its CPUs)")
    # At least max_batch_size: batches count candidates, and with 1-candidate requests a full
    # batch needs that many requests in flight (Serve's default of 5 would cap batches).
    max_ongoing_requests: int = Field(
        1024, ge=1, description="requests in flight per replica (raised to the batch size if "
        "lower)")
    num_replicas: int | None = Field(
        None, ge=1, description="replicas (default 1, or what the config's autoscaling_config "
        "says)")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica; the replica holds "
                                                         "the model on its GPU")
    token_sha256: str | None = Field(
        None, description="hex SHA-256 of the API token every endpoint but /healthz requires "
        "(none: that of $DIN_RAY_SERVE_TOKEN where the app is built, if set; else open)")
    require_token: bool = Field(False, description="refuse to build an open server (no token)")

    @field_validator("token_sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if not value:
            return None
        value = value.lower()
        if len(value) != 64 or not set(value) <= HEX:
            raise ValueError("token_sha256 must be the 64 hex digits of the token's SHA-256")
        return value

    def batching(self) -> BatchingConfig:
        """The batching these arguments ask for: unset values take the defaults of the
        replica's kind (GPU or CPU)."""
        default = BatchingConfig.default(self.gpus_per_replica)
        return BatchingConfig(
            max_batch_size=self.max_batch_size or default.max_batch_size,
            batch_wait_timeout_s=(default.batch_wait_timeout_s if self.batch_wait_ms is None
                                  else self.batch_wait_ms / 1e3))

    def ongoing_requests(self) -> int:
        """max_ongoing_requests, raised to the batch size (see the field's comment)."""
        return max(self.max_ongoing_requests, self.batching().max_batch_size)
