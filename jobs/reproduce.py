"""Rerun the paper's model and regularizer comparison (Tables 3 and 4, Figs. 4-6) from a job.

    ray job submit --working-dir . --entrypoint-num-cpus 16 -- python jobs/reproduce.py \\
        --data /mnt/shared/din/ml --output /mnt/shared/din/runs/reproduce --seeds 3 --jobs 16

The arguments are `din-ray reproduce`'s (`din-ray reproduce --help`). Every run is a
single-process `din-ray train --local` run, `--jobs` of them at once in processes of the driver,
so the driver needs that many CPUs of one node: `--entrypoint-num-cpus` reserves them and makes
Ray start the driver on a node that has them (the head of cluster.yaml has none). The outputs
(--output) are written by that node: use a shared filesystem path to read them elsewhere.
Resubmitting the same command reuses the finished runs and resumes the interrupted ones.
"""

from __future__ import annotations

import sys

from din_ray.cli import main as din_ray_main


def main(argv: list[str] | None = None) -> int:
    return din_ray_main(["reproduce", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
