"""Test-only fault injection for the worker-failure tests: a worker that exits abruptly at a
planned point, so the tests can check that Ray Train restarts the group from the latest
checkpoint and that no epoch is counted twice.

Nothing in a production config can turn it on. The plans come from the environment variable
`DIN_RAY_TEST_FAULTS` of the driver (JSON: one plan or a list), which `build_trainer` reads
and hands to the workers beside (not inside) the training config:

    {"epoch": 2, "step": 1, "marker": "/tmp/killed",   # 1-based epoch, 0-based step
     "rank": 1,                                        # omitted: any rank
     "phase": "train"}                                 # "eval": at an evaluation batch;
                                                       # "checkpoint": after writing the
                                                       # epoch's files, before reporting them

Each plan fires once: its `marker` file records that it happened, so the restarted worker
carries on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FAULTS_ENV = "DIN_RAY_TEST_FAULTS"
PHASES = ("train", "eval", "checkpoint")


@dataclass(frozen=True)
class FaultPlan:
    """Exit the worker of `rank` (None: any) at `step` of `epoch` in `phase`, once."""

    epoch: int
    step: int
    marker: str
    rank: int | None = None
    phase: str = "train"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"{FAULTS_ENV}: phase must be one of {PHASES}, got {self.phase!r}")


def plans_from_env() -> list[dict]:
    """The driver's planned faults (`DIN_RAY_TEST_FAULTS`), validated, as dicts for the Ray
    boundary; [] when the variable is unset (always, outside the tests)."""
    raw = os.environ.get(FAULTS_ENV, "")
    if not raw:
        return []
    plans = json.loads(raw)
    return [asdict(FaultPlan(**p)) for p in ([plans] if isinstance(plans, dict) else plans)]


class FaultInjector:
    """A worker's planned faults (the dicts of `plans_from_env`)."""

    def __init__(self, plans: list[dict], rank: int) -> None:
        self.plans, self.rank = [FaultPlan(**p) for p in plans], rank

    def check(self, phase: str, epoch: int, step: int) -> None:
        """Exit this process now if a plan names this point and has not fired yet."""
        for plan in self.plans:
            if (plan.phase == phase and plan.rank in (None, self.rank) and plan.epoch == epoch
                    and plan.step == step and not Path(plan.marker).exists()):
                where = f"rank {self.rank} epoch {epoch} step {step}"
                if phase != "train":
                    where += f" {phase}"
                Path(plan.marker).write_text(where)
                log.warning("fault injection: %s exits", where)
                os._exit(1)

    def around(self, batches: Iterator, epoch: int, phase: str = "train") -> Iterator:
        """`batches` (of 0-based `epoch`), checking before each one."""
        for step, batch in enumerate(batches):
            if self.plans:
                self.check(phase, epoch + 1, step)
            yield batch
