"""Raw data -> prepared Parquet + schema + id counts (the format: `din_ray.data.format`).

One module per source (`movielens`, `amazon`, `synthetic`, and `logs/`, the Ray Data pipeline for
impression + behaviour logs); `common` holds what the in-memory sources share, `ids` the raw-id
hashing and binning that serving repeats, `vocab_extend` the vocabularies continued from an
earlier dataset and `in_memory` the small splits held whole for training.
"""
