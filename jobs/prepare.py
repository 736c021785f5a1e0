"""Prepare a dataset (raw files -> Parquet splits, schema, vocabularies) from a job.

    ray job submit --working-dir . --entrypoint-num-cpus 1 -- python jobs/prepare.py \\
        movielens --output /mnt/shared/din/ml
    ray job submit --working-dir . -- python jobs/prepare.py \\
        log --spec examples/log_spec.yaml --output /mnt/shared/din/logs

The arguments are `din-ray prepare`'s (`din-ray prepare --help`). `movielens` and `synthetic`
run in the driver process itself: `--entrypoint-num-cpus 1` makes Ray start it on a
node with a free CPU (the head of cluster.yaml has none) instead of on the head. `log` and
`taobao` are Ray Data pipelines: their driver joins the cluster named by RAY_ADDRESS (set by the
job server) and reads and writes from the CPU workers. --output must be a shared filesystem path
that the training nodes see under the same name.
"""

from __future__ import annotations

import sys

from din_ray.cli import main as din_ray_main


def main(argv: list[str] | None = None) -> int:
    return din_ray_main(["prepare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
