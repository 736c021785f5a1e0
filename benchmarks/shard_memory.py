"""Embedding memory per worker under row-wise sharding, measured on the real tables.

    python benchmarks/shard_memory.py --data out/ml-small --model din --workers 1 2 4 8

For each worker count, builds every rank's `ShardedEmbeddingTables` exactly as a Ray Train worker
does (no process group is needed to build them) and prints the bytes each rank holds
(`memory_bytes`), next to the whole-table size.
"""

from __future__ import annotations

import argparse

from din_ray.data.format import PreparedDataset
from din_ray.embeddings.sharding import DEFAULT_REPLICATE_BELOW, ShardedEmbeddingTables
from din_ray.embeddings.tables import EmbeddingTables
from din_ray.model import ModelConfig, build_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="din")
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--replicate-below", type=int, default=DEFAULT_REPLICATE_BELOW)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args(argv)
    schema = PreparedDataset.open(args.data).schema.with_embedding_dim(args.embedding_dim)
    specs = build_model(schema, ModelConfig(model=args.model)).table_specs()
    whole = EmbeddingTables(specs).memory_bytes()
    print(f"{'workers':>7} {'max bytes/worker':>16} {'share of whole':>14}   whole = {whole} B")
    for n in args.workers:
        held = [ShardedEmbeddingTables(specs, r, n, replicate_below=args.replicate_below)
                .memory_bytes() for r in range(n)]
        print(f"{n:>7} {max(held):>16} {max(held) / whole:>14.3f}   per rank {held}")


if __name__ == "__main__":
    main()
