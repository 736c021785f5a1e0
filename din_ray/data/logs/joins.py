"""Side tables (the spec's `joins`): dimension tables read whole, once, by the driver.

`load_join` reads every file of one side table, validates its rows as the logs' are validated
(malformed rows counted per file, with examples) and indexes the clean rows by key into a
`JoinTable`, which the parse stage joins onto each impression batch. Duplicate keys are an
error: the join would be ambiguous.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from din_ray.data.format import DataError
from din_ray.data.logs.files import FileStats, Unit, filesystem, list_files, read_unit
from din_ray.data.logs.parse import (
    JoinTable,
    RowChecks,
    as_array,
    feature_values,
    parse_int,
    parse_str,
    raw_column,
)
from din_ray.data.logs.spec import LogSpec


def load_join(spec: LogSpec, name: str) -> tuple[JoinTable, list[FileStats]]:
    """Read a side table whole (the driver does this once), validate it like the logs and index
    it by key. Duplicate keys are an error: the join would be ambiguous."""
    j = next(x for x in spec.joins if x.name == name)
    feats = [f for f in spec.features if f.source == name]
    columns = list(dict.fromkeys([j.key] + [f.column for f in feats]))
    parts, all_stats = [], []
    show = spec.malformed.show
    for path in list_files(j.source, f"joins.{name}"):
        stats = FileStats(path, f"joins.{name}")
        rg_end = 0
        if j.source.format == "parquet":
            fs, inner = filesystem(path)
            with fs.open_input_file(inner) as f:
                rg_end = pq.ParquetFile(f).metadata.num_row_groups
        unit = Unit(0, name, path, j.source.format, 0, rg_end)
        for table, rownum in read_unit(unit, columns, j.source, stats, show):
            stats.rows += table.num_rows
            checks = RowChecks(table.num_rows, rownum, show)
            raw = raw_column(table, j.key)
            if j.key_type == "int":
                keys, missing, bad = parse_int(raw, spec.null_values)
                checks.flag(bad, j.key, raw, "key is not an integer")
                key_arr = pa.array(keys)
            else:
                key_arr, missing = parse_str(raw, spec.null_values)
            checks.flag(missing, j.key, raw, "missing key")
            cols = {"__key": key_arr}
            for f in feats:
                cols[f.name] = feature_values(spec, f, raw_column(table, f.column), checks, stats)
            stats.malformed += int(checks.bad.sum())
            stats.examples = sorted(stats.examples + checks.examples)[:show]
            parts.append(pa.table(cols).filter(pa.array(~checks.bad)))
        all_stats.append(stats)
    t = pa.concat_tables(parts) if parts else None
    if t is None or t.num_rows == 0:
        raise DataError(f"joins.{name}: no valid rows in {list(j.source.paths)}")
    keys = t.column("__key").to_numpy()
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = uniq[np.argmax(counts > 1)]
        raise DataError(f"joins.{name}: key {j.key!r} value {dup!r} appears "
                        f"{int(counts.max())} times in {list(j.source.paths)}; a joined table "
                        f"needs unique keys")
    table = JoinTable(name, j.on, j.key_type, pd.Index(keys),
                      {f.name: as_array(t.column(f.name)) for f in feats})
    return table, all_stats
