"""Writing Parquet files whose bytes depend only on their rows: the replay's outputs and the input archive.

What makes two writes of the same rows byte-identical:

* the rows come in a fixed order and the Arrow schema is explicit (no type inference, no pandas index metadata);
* every writer option is fixed here (format version, compression codec and level, dictionary, statistics, page
  size) and each file is written in one call, so row groups are cut the same way;
* nothing in a row or in the file metadata comes from the wall clock, the host or the process: the key-value
  metadata is what the caller passes (schema versions, model version, config hash);
* the footer's ``created_by`` names the pyarrow version, so identity holds for one pyarrow version.

Files appear atomically: written to a hidden temporary name in the same directory, then renamed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

WRITE_OPTIONS = {
    "version": "2.6",
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "data_page_size": 1 << 20,
    "row_group_size": 1 << 20,
}


def with_metadata(schema: pa.Schema, metadata: Mapping[str, str]) -> pa.Schema:
    return schema.with_metadata({str(k): str(v) for k, v in sorted(metadata.items())})


def write_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` with the fixed options; the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, **WRITE_OPTIONS)
    os.replace(tmp, path)
    return path


class StreamingFile:
    """One Parquet file written row group by row group (for inputs too large to hold), then renamed into place."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, schema, **{k: v for k, v in WRITE_OPTIONS.items()
                                                              if k != "row_group_size"})
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table, row_group_size=WRITE_OPTIONS["row_group_size"])
            self.rows += table.num_rows

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)
