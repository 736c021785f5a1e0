"""Train on the Ray cluster this job is submitted to: Ray Train workers, row-sharded embeddings,
checkpoints in Ray's storage.

    ray job submit --working-dir . -- python jobs/train.py \\
        --data /mnt/shared/din/ml --output /mnt/shared/din/runs/din --workers 4 --epochs 5 \\
        --storage-path s3://my-bucket/din-ray

The arguments are `din-ray train`'s (`din-ray train --help`). A submitted job's driver finds
its cluster in RAY_ADDRESS (set by the job server) and joins it; run by hand without --address it
starts a local Ray, and with --local it trains in this process without Ray.

On a cluster, --data and --output must name the same directory on every node (a shared
filesystem such as EFS or NFS): the workers read the Parquet splits and the driver writes
OUTPUT/{metrics.json,checkpoint}. --storage-path (a shared directory or an s3:// / gs:// URI)
holds every epoch's sharded checkpoint; resubmitting the same command with the same
--storage-path and --run-name resumes from the latest one.
"""

from __future__ import annotations

import sys

from din_ray.cli import main as din_ray_main


def main(argv: list[str] | None = None) -> int:
    return din_ray_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
