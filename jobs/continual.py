"""One day of continual training on a Ray cluster (see din_ray.continual).

    ray job submit --working-dir . -- python jobs/continual.py \\
        --spec raw/day-02/log_spec.yaml --output runs/continual --day day-02 --margin 0.002
"""

from __future__ import annotations

import sys

from din_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["continual", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
