"""Search hyperparameters on the Ray cluster this job is submitted to: Optuna TPE proposes, ASHA
stops the laggards, and every trial is a distributed Ray Train run.

    ray job submit --working-dir . -- python jobs/tune.py \\
        --data /mnt/shared/din/ml --output /mnt/shared/din/runs/tune \\
        --space default --trials 24 --workers-per-trial 2 --epochs 3 \\
        --storage-path s3://my-bucket/din-ray

The arguments are `din-ray tune`'s (`din-ray tune --help`). The driver joins the cluster named
by RAY_ADDRESS (set by the job server); the number of trials run at once follows the cluster's
CPUs unless --max-concurrent is given (an autoscaling cluster starts small: set it to what the
cluster may grow to). --data and --output must be the same directory on every node (a shared
filesystem); trial checkpoints go to --storage-path, and resubmitting the same command resumes
the search there. `jobs/serve.py --checkpoint OUTPUT` serves the best trial.
"""

from __future__ import annotations

import sys

from din_ray.cli import main as din_ray_main


def main(argv: list[str] | None = None) -> int:
    return din_ray_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
