"""The input files of a log spec: finding them, cutting them into work units and streaming a unit.

Paths may be local files, directories (searched recursively for the format's suffixes), local
globs or any pyarrow filesystem URI (s3://...). A Parquet file is cut into units of whole row
groups of about `spec.unit_rows` rows; a CSV file is one unit, streamed. `read_unit` yields a
unit as Arrow batches together with each row's 1-based row number (Parquet) or line number (CSV,
header = line 1), which every error about a row names; CSV rows with the wrong field count are
skipped there and counted in the file's `FileStats`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from din_ray.data.format import DataError
from din_ray.data.logs.spec import LogSpec, Source

# Rows read per batch from an input file.
READ_BATCH_ROWS = 131_072
CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
IMPRESSIONS, BEHAVIORS = "impressions", "behaviors"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def list_files(source: Source, where: str) -> list[str]:
    """Input files of a source: files as given, directories searched recursively for files with
    the format's suffixes (hidden and _-prefixed names skipped), local globs expanded."""
    suffixes = CSV_SUFFIXES if source.format == "csv" else PARQUET_SUFFIXES
    out: list[str] = []
    for p in source.paths:
        if "://" not in p and any(c in p for c in "*?["):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{where}: no file matches {p!r}")
            out.extend(m for m in matches if os.path.isfile(m))
            continue
        fs, inner = filesystem(p)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{where}: {p} not found")
        if info.type == pafs.FileType.File:
            out.append(p)
            continue
        found = []
        for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            name = f.base_name
            if (f.type == pafs.FileType.File and not name.startswith((".", "_"))
                    and name.lower().endswith(suffixes)):
                found.append(f.path)
        if not found:
            raise FileNotFoundError(f"{where}: no {source.format} files ({', '.join(suffixes)}) "
                                    f"under {p}")
        prefix = p.split("://", 1)[0] + "://" if "://" in p else ""
        out.extend(prefix + f for f in sorted(found))
    return out


def _csv_header(path: str, delimiter: str) -> list[str]:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner, compression="detect") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="replace")
    line = head.splitlines()[0] if head.strip() else ""
    if not line.strip():
        raise DataError(f"{path}: empty file (no header line)")
    return [c.strip().strip('"').strip() for c in line.split(delimiter)]


def _estimate_csv_rows(path: str) -> int:
    fs, inner = filesystem(path)
    size = fs.get_file_info(inner).size or 0
    with fs.open_input_stream(inner) as f:
        sample = f.read(1 << 20)
    lines = max(sample.count(b"\n"), 1)
    compressed = path.lower().endswith(".gz")
    return int(size / max(len(sample), 1) * lines * (5 if compressed else 1))


@dataclass(frozen=True)
class Unit:
    """A part of one input file parsed by one task.

    Parquet units are runs of row groups [rg_start, rg_end) whose first row is `first_row`
    (0-based) in the file; a CSV file is one unit (it is streamed, not split)."""

    index: int
    log: str
    path: str
    format: str
    rg_start: int = 0
    rg_end: int = 0
    first_row: int = 0
    est_rows: int = 0


def plan_units(spec: LogSpec) -> list[Unit]:
    units: list[Unit] = []
    for name, part in ((IMPRESSIONS, spec.impressions), (BEHAVIORS, spec.behaviors)):
        for path in list_files(part.source, name):
            if part.source.format == "csv":
                units.append(Unit(len(units), name, path, "csv",
                                  est_rows=_estimate_csv_rows(path)))
                continue
            fs, inner = filesystem(path)
            with fs.open_input_file(inner) as f:
                meta = pq.ParquetFile(f).metadata
            start, first, rows = 0, 0, 0
            for g in range(meta.num_row_groups):
                rows += meta.row_group(g).num_rows
                if rows >= spec.unit_rows or g == meta.num_row_groups - 1:
                    units.append(Unit(len(units), name, path, "parquet", start, g + 1, first,
                                      rows))
                    start, first, rows = g + 1, first + rows, 0
    return units


@dataclass
class FileStats:
    """What happened to one input file's rows. `examples` are (line/row, field, value, reason)
    of the first malformed rows."""

    path: str
    log: str
    rows: int = 0
    malformed: int = 0
    filtered: int = 0
    examples: list[tuple[int, str, str, str]] = field(default_factory=list)
    missing: dict[str, int] = field(default_factory=dict)
    join_misses: dict[str, int] = field(default_factory=dict)
    line_numbers: bool = False  # True: CSV line numbers (header = line 1); False: 1-based rows

    def add(self, other: FileStats, show: int) -> None:
        self.rows += other.rows
        self.malformed += other.malformed
        self.filtered += other.filtered
        self.examples = sorted(self.examples + other.examples)[:show]
        for mine, theirs in ((self.missing, other.missing),
                             (self.join_misses, other.join_misses)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def describe_examples(self) -> list[str]:
        where = "line" if self.line_numbers else "row"
        return [f"{self.path} {where} {n}: field {f!r}: {v!r} ({why})"
                for n, f, v, why in self.examples]


def needed_columns(spec: LogSpec, log_name: str) -> list[str]:
    if log_name == IMPRESSIONS:
        imp = spec.impressions
        cols = [imp.user, imp.timestamp, imp.label.column]
        cols += [f.column for f in spec.features
                 if f.group != "behavior" and f.source == IMPRESSIONS]
        cols += [j.on for j in spec.joins]
    else:
        beh = spec.behaviors
        cols = [beh.user, beh.timestamp] + ([beh.type_column] if beh.type_column else [])
        cols += [f.column for f in spec.group("behavior")]
    return list(dict.fromkeys(cols))


def _good_lines(first_good: int, n: int, invalid: np.ndarray, first_line: int) -> np.ndarray:
    """CSV line numbers of the well-formed rows first_good .. first_good + n - 1 (0-based among
    well-formed rows), given the sorted line numbers of the rows skipped as invalid."""
    base = first_line + first_good + np.arange(n)
    lines = base
    for _ in range(64):  # a fixed point; each round accounts for more skipped lines
        nxt = base + np.searchsorted(invalid, lines, side="right")
        if np.array_equal(nxt, lines):
            break
        lines = nxt
    return lines


def read_unit(unit: Unit, columns: list[str], source: Source, stats: FileStats,
              show: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Stream a unit as (batch with `columns`, 1-based row or line number of each row)."""
    if unit.format == "parquet":
        fs, inner = filesystem(unit.path)
        with fs.open_input_file(inner) as f:
            pf = pq.ParquetFile(f)
            names = {n.strip(): n for n in pf.schema_arrow.names}
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(f"{unit.path}: column(s) {missing} not found; the file has "
                                f"{sorted(names)}")
            offset = unit.first_row
            for batch in pf.iter_batches(READ_BATCH_ROWS, range(unit.rg_start, unit.rg_end),
                                         columns=[names[c] for c in columns]):
                t = pa.Table.from_batches([batch]).rename_columns(columns)
                yield t, offset + 1 + np.arange(t.num_rows)
                offset += t.num_rows
        return
    stats.line_numbers = True
    header = _csv_header(unit.path, source.delimiter)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{unit.path} line 1: column(s) {missing} not found; header is {header}")
    invalid: list[int] = []

    def on_invalid(row) -> str:
        # Skipped before any batch: counted here, both as a row and as malformed.
        stats.rows += 1
        stats.malformed += 1
        if row.number is not None:
            invalid.append(row.number)
        if len(stats.examples) < show:
            stats.examples.append((row.number or -1, "<row>", row.text[:200],
                                   f"expected {row.expected_columns} fields, got "
                                   f"{row.actual_columns}"))
        return "skip"

    # Unique internal names: a header may repeat a name or carry stray spaces.
    internal = [f"c{i}" for i in range(len(header))]
    wanted = {c: internal[header.index(c)] for c in columns}
    fs, inner = filesystem(unit.path)
    with fs.open_input_stream(inner, compression="detect") as f:
        reader = pcsv.open_csv(
            f,
            read_options=pcsv.ReadOptions(column_names=internal, skip_rows=1,
                                          block_size=8 << 20, use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=source.delimiter,
                                            invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(wanted.values()),
                column_types={v: pa.string() for v in wanted.values()},
                strings_can_be_null=False),
        )
        good = 0
        for batch in reader:
            t = pa.Table.from_batches([batch]).select(list(wanted.values()))
            t = t.rename_columns(list(wanted))
            lines = _good_lines(good, t.num_rows, np.sort(np.array(invalid, np.int64)), 2)
            good += t.num_rows
            yield t, lines
