"""Score a prepared split on the Ray cluster this job is submitted to: Ray Data reads the split,
an actor pool scores it, the predictions land as Parquet.

    ray job submit --working-dir . -- python jobs/predict.py \\
        --checkpoint /mnt/shared/din/runs/din --data /mnt/shared/din/ml --split test \\
        --output /mnt/shared/din/pred/din-test --engine ray --actors 4 --gpus-per-actor 1

The arguments are `din-ray predict`'s (`din-ray predict --help`). --checkpoint, --data and
--output must name the same directories on every node (a shared filesystem): the actors read the
checkpoint and the Parquet splits and write the prediction files.
"""

from __future__ import annotations

import sys

from din_ray.cli import main as din_ray_main


def main(argv: list[str] | None = None) -> int:
    return din_ray_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
