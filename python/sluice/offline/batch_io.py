"""Chunked readers of batch input files and the writers of the final output.

Readers stream: a .npy is memory-mapped, a .csv read a chunk of lines at a
time, a Parquet file a record batch at a time (pyarrow, the `parquet` extra),
so a file larger than memory never has to fit. A .npz is read one array at a
time (zip members cannot be mapped). Each chunk is `(feeds, kept)`: the model's
inputs and the passthrough columns of `--keep`, as arrays of the chunk's rows.

A malformed row raises BatchInputError naming the file, the line (CSV) or row,
and what is wrong.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sluice.errors import SluiceError

Array = np.ndarray[Any, Any]
INPUT_SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
PARQUET_MISSING = 'Parquet needs pyarrow: pip install "sluice-serve[parquet]"'
_COUNT_BLOCK_BYTES = 1 << 20


class BatchInputError(SluiceError):
    """An input file that cannot be scored as given (format, shape, a bad row)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input as batch scoring feeds it: dims exclude the batch dim."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]  # -1: dynamic

    @property
    def width(self) -> int | None:
        """Values per row, when every dim is known."""
        return None if any(d < 0 for d in self.dims) else math.prod(self.dims)


Chunk = tuple[dict[str, Array], dict[str, Array]]


def _check_rows(path: Path, spec: InputSpec, arr: Array, first_row: int) -> Array:
    got = tuple(arr.shape[1:])
    if len(got) != len(spec.dims) or any(
        d >= 0 and g != d for g, d in zip(got, spec.dims, strict=True)
    ):
        raise BatchInputError(
            f"{path.name}: input '{spec.name}' rows from row {first_row} have shape "
            f"{list(got)}, the model wants {list(spec.dims)} (-1: any)"
        )
    if spec.dtype.kind in "iub" and arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            row = first_row + int(np.argwhere(bad.reshape(len(arr), -1).any(1))[0][0])
            raise BatchInputError(
                f"{path.name} row {row}: input '{spec.name}' wants integers, found a "
                "fraction or NaN"
            )
    return np.ascontiguousarray(arr, dtype=spec.dtype)


class Reader:
    """Base of the readers: `rows` (when known before reading) and `chunks()`."""

    rows: int | None = None

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        raise NotImplementedError


class NpyReader(Reader):
    def __init__(self, path: Path, specs: Sequence[InputSpec], keep: Sequence[str]) -> None:
        if len(specs) != 1:
            raise BatchInputError(
                f".npy feeds a model with one input; this one has {len(specs)} (use .npz, "
                "or .parquet with one column per input)"
            )
        if keep:
            raise BatchInputError("--keep needs named columns: use .csv, .npz or .parquet")
        self.path, self.spec = path, specs[0]
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BatchInputError(f"{path.name}: not a readable .npy file ({exc})") from None
        if self.array.ndim < 1:
            raise BatchInputError(f"{path.name}: a scalar, not rows")
        self.rows = int(self.array.shape[0])

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for start in range(0, self.array.shape[0], chunk_rows):
            part = np.asarray(self.array[start : start + chunk_rows])
            yield {self.spec.name: _check_rows(self.path, self.spec, part, start)}, {}


class NpzReader(Reader):
    def __init__(self, path: Path, specs: Sequence[InputSpec], keep: Sequence[str]) -> None:
        self.path, self.specs, self.keep = path, list(specs), list(keep)
        try:
            with np.load(path, allow_pickle=False) as z:
                files = list(z.files)
                self.arrays = {k: z[k] for k in files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise BatchInputError(f"{path.name}: not a readable .npz file ({exc})") from None
        names = [s.name for s in self.specs]
        if len(self.specs) == 1 and names[0] not in self.arrays:
            others = [k for k in files if k not in self.keep]
            if len(others) == 1:
                self.arrays[names[0]] = self.arrays.pop(others[0])
        missing = [n for n in [*names, *self.keep] if n not in self.arrays]
        if missing:
            raise BatchInputError(
                f"{path.name} has no array {', '.join(repr(m) for m in missing)} "
                f"(it has {', '.join(files) or 'none'})"
            )
        rows = {len(self.arrays[n]) for n in [*names, *self.keep]}
        if len(rows) != 1:
            raise BatchInputError(f"{path.name}: the arrays disagree on the number of rows")
        self.rows = rows.pop()

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        for start in range(0, self.rows or 0, chunk_rows):
            feeds = {
                s.name: _check_rows(
                    self.path, s, self.arrays[s.name][start : start + chunk_rows], start
                )
                for s in self.specs
            }
            kept = {k: self.arrays[k][start : start + chunk_rows] for k in self.keep}
            yield feeds, kept


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with path.open("rb") as f:
        while block := f.read(_COUNT_BLOCK_BYTES):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class CsvReader(Reader):
    """Numbers, one row per line, for a model with one input: the columns not
    named by --keep are its values in order. A first line that is not numeric
    is a header (required for --keep); empty lines are skipped."""

    def __init__(self, path: Path, specs: Sequence[InputSpec], keep: Sequence[str]) -> None:
        if len(specs) != 1:
            raise BatchInputError(
                f".csv feeds a model with one input; this one has {len(specs)} "
                "(use .npz or .parquet)"
            )
        self.path, self.spec, self.keep = path, specs[0], list(keep)
        if self.spec.width is None:
            raise BatchInputError(
                f"input '{self.spec.name}' has dynamic dims {list(self.spec.dims)}: a CSV row "
                "cannot say its shape (use .npy, .npz or .parquet)"
            )
        with path.open(newline="", encoding="utf-8") as f:
            first = next((r for r in csv.reader(f) if r), None)
        if first is None:
            raise BatchInputError(f"{path.name} is empty")
        try:
            [float(v) for v in first]
            self.header: list[str] | None = None
        except ValueError:
            self.header = [h.strip() for h in first]
        if self.keep and self.header is None:
            raise BatchInputError(f"--keep needs a header line naming the columns of {path.name}")
        columns = self.header or [str(i) for i in range(len(first))]
        missing = [k for k in self.keep if k not in columns]
        if missing:
            raise BatchInputError(
                f"{path.name} has no column {', '.join(repr(m) for m in missing)}"
            )
        self.columns = len(columns)
        self.keep_idx = [columns.index(k) for k in self.keep]
        self.value_idx = [i for i in range(len(columns)) if i not in self.keep_idx]
        if len(self.value_idx) != self.spec.width:
            raise BatchInputError(
                f"{path.name} has {len(self.value_idx)} value column(s); input "
                f"'{self.spec.name}' wants {self.spec.width} per row"
            )
        self.rows = _count_lines(path) - (1 if self.header is not None else 0)

    def _convert(self, rows: list[list[str]], lines: list[int], row0: int) -> Chunk:
        values = [[r[i] for i in self.value_idx] for r in rows]
        try:
            arr = np.array(values, dtype=np.float64)
        except ValueError:
            for j, row in enumerate(values):
                for col, v in zip(self.value_idx, row, strict=True):
                    try:
                        float(v)
                    except ValueError:
                        name = self.header[col] if self.header else f"column {col}"
                        raise BatchInputError(
                            f"{self.path.name} line {lines[j]} (data row {row0 + j}): "
                            f"{name} is {v[:40]!r}, not a number"
                        ) from None
            raise
        arr = arr.reshape((len(rows), *self.spec.dims))
        kept = {
            k: np.array([r[i] for r in rows], dtype=str)
            for k, i in zip(self.keep, self.keep_idx, strict=True)
        }
        return {self.spec.name: _check_rows(self.path, self.spec, arr, row0)}, kept

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows: list[list[str]] = []
            lines: list[int] = []
            row0 = 0
            header_pending = self.header is not None
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if header_pending:
                    header_pending = False
                    continue
                if len(record) != self.columns:
                    raise BatchInputError(
                        f"{self.path.name} line {reader.line_num} (data row "
                        f"{row0 + len(rows)}): {len(record)} values, the file has "
                        f"{self.columns} columns"
                    )
                rows.append(record)
                lines.append(reader.line_num)
                if len(rows) == chunk_rows:
                    yield self._convert(rows, lines, row0)
                    row0 += len(rows)
                    rows, lines = [], []
            if rows:
                yield self._convert(rows, lines, row0)


class ParquetReader(Reader):
    """A column per model input (fixed-size or variable lists, flattened row by
    row), or, for a one-input model, the numeric columns not named by --keep
    as its values in order."""

    def __init__(self, path: Path, specs: Sequence[InputSpec], keep: Sequence[str]) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BatchInputError(PARQUET_MISSING) from None
        self.path, self.specs, self.keep = path, list(specs), list(keep)
        try:
            self.file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own error types
            raise BatchInputError(f"{path.name}: not a readable Parquet file ({exc})") from None
        names = self.file.schema_arrow.names
        missing = [k for k in self.keep if k not in names]
        if missing:
            raise BatchInputError(f"{path.name} has no column {', '.join(map(repr, missing))}")
        self.by_column = all(s.name in names for s in self.specs)
        if not self.by_column:
            if len(self.specs) != 1:
                absent = [s.name for s in self.specs if s.name not in names]
                raise BatchInputError(f"{path.name} has no column for input(s) {absent}")
            self.value_columns = [n for n in names if n not in self.keep]
            width = self.specs[0].width
            if width is not None and len(self.value_columns) != width:
                raise BatchInputError(
                    f"{path.name} has {len(self.value_columns)} value column(s); input "
                    f"'{self.specs[0].name}' wants {width} per row"
                )
        self.rows = int(self.file.metadata.num_rows)

    def _column(self, batch: Any, name: str, spec: InputSpec, row0: int) -> Array:
        import pyarrow as pa

        col = batch.column(name)
        if col.null_count:
            row = row0 + int(np.argwhere(np.asarray(col.is_null()))[0][0])
            raise BatchInputError(f"{self.path.name} row {row}: column '{name}' is null")
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False))
            width = spec.width
            if width is not None and flat.size != width * len(col):
                lengths = np.asarray(col.value_lengths()) if pa.types.is_list(col.type) else None
                row = row0 + (
                    int(np.argwhere(lengths != width)[0][0]) if lengths is not None else 0
                )
                raise BatchInputError(
                    f"{self.path.name} row {row}: column '{name}' does not hold {width} values"
                )
            arr = flat.reshape((len(col), *(spec.dims if width is not None else (-1,))))
        else:
            arr = np.asarray(col.to_numpy(zero_copy_only=False)).reshape((len(col), *spec.dims))
        return _check_rows(self.path, spec, arr, row0)

    def chunks(self, chunk_rows: int) -> Iterator[Chunk]:
        row0 = 0
        for batch in self.file.iter_batches(batch_size=chunk_rows):
            if self.by_column:
                feeds = {s.name: self._column(batch, s.name, s, row0) for s in self.specs}
            else:
                spec = self.specs[0]
                cols = []
                for name in self.value_columns:
                    col = batch.column(name)
                    if col.null_count:
                        row = row0 + int(np.argwhere(np.asarray(col.is_null()))[0][0])
                        raise BatchInputError(
                            f"{self.path.name} row {row}: column '{name}' is null"
                        )
                    cols.append(np.asarray(col.to_numpy(zero_copy_only=False)))
                try:
                    arr = np.stack(cols, axis=1).astype(np.float64)
                except ValueError as exc:
                    raise BatchInputError(
                        f"{self.path.name} rows {row0}..: a value column is not numeric ({exc})"
                    ) from None
                feeds = {
                    spec.name: _check_rows(
                        self.path, spec, arr.reshape((len(arr), *spec.dims)), row0
                    )
                }
            kept = {k: _kept_array(batch.column(k)) for k in self.keep}
            row0 += batch.num_rows
            yield feeds, kept


def _kept_array(col: Any) -> Array:
    arr = np.asarray(col.to_numpy(zero_copy_only=False))
    if arr.dtype == object:
        return np.array(["" if v is None else str(v) for v in arr.tolist()], dtype=str)
    return arr


def open_reader(path: Path, specs: Sequence[InputSpec], keep: Sequence[str]) -> Reader:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise BatchInputError(f"input file {path} not found")
    readers: dict[str, type[Reader]] = {
        ".npy": NpyReader,
        ".npz": NpzReader,
        ".csv": CsvReader,
        ".parquet": ParquetReader,
    }
    if suffix not in readers:
        raise BatchInputError(f"input {path.name}: want one of {', '.join(INPUT_SUFFIXES)}")
    return readers[suffix](path, specs, keep)  # type: ignore[call-arg]


# ---- the final output ------------------------------------------------------------


def check_output_suffix(path: Path, outputs: Sequence[str], keep: Sequence[str]) -> None:
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise BatchInputError(f"output {path.name}: want one of {', '.join(INPUT_SUFFIXES)}")
    if suffix == ".npy" and (len(outputs) != 1 or keep):
        raise BatchInputError(
            f"a .npy output holds one array; the model has {len(outputs)} output(s)"
            + (" and --keep adds columns" if keep else "")
            + ": use .npz, .csv or .parquet"
        )
    if suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise BatchInputError(PARQUET_MISSING) from None


def _npy_member(
    zf: zipfile.ZipFile,
    name: str,
    parts: Iterator[Array],
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
) -> None:
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": shape,
        }
        np.lib.format.write_array_header_2_0(f, header)
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


def write_output(
    target: Path,
    columns: Sequence[str],
    chunk_files: Sequence[Path],
    shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]],
) -> None:
    """Assembles the chunk files (npz, arrays by column name) into `target` in
    order, through a temporary file fsynced and renamed: a reader of `target`
    sees no file or the whole one. `shapes`: column -> (per-row dims, dtype)."""
    rows = 0
    for path in chunk_files:
        with np.load(path, allow_pickle=False) as z:
            rows += len(z[columns[0]])

    def parts(column: str) -> Iterator[Array]:
        for path in chunk_files:
            with np.load(path, allow_pickle=False) as z:
                yield z[column]

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    suffix = target.suffix.lower()
    try:
        if suffix == ".npy":
            (column,) = columns
            dims, dtype = shapes[column]
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *dims))
            start = 0
            for part in parts(column):
                out[start : start + len(part)] = part
                start += len(part)
            out.flush()
            del out
        elif suffix == ".npz":
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for column in columns:
                    dims, dtype = shapes[column]
                    _npy_member(zf, column, parts(column), (rows, *dims), dtype)
        elif suffix == ".csv":
            _write_csv(tmp, columns, chunk_files, shapes)
        else:
            _write_parquet(tmp, columns, chunk_files)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _csv_names(column: str, dims: tuple[int, ...]) -> list[str]:
    width = math.prod(dims)
    if width == 1:
        return [column]
    return [f"{column}[{i}]" for i in range(width)]


def _write_csv(
    tmp: Path,
    columns: Sequence[str],
    chunk_files: Sequence[Path],
    shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]],
) -> None:
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([n for c in columns for n in _csv_names(c, shapes[c][0])])
        for path in chunk_files:
            with np.load(path, allow_pickle=False) as z:
                blocks = []
                for c in columns:
                    arr = z[c]
                    flat = arr.reshape(len(arr), -1)
                    if arr.dtype.kind == "f":
                        fmt = "%.9g" if arr.dtype.itemsize <= 4 else "%.17g"
                        buf = io.StringIO()
                        np.savetxt(buf, flat, fmt=fmt, delimiter="\x1f")
                        text = buf.getvalue().splitlines()
                        blocks.append([line.split("\x1f") for line in text])
                    else:
                        blocks.append([[str(v) for v in row] for row in flat.tolist()])
                for i in range(len(blocks[0])):
                    writer.writerow([v for b in blocks for v in b[i]])


def _write_parquet(tmp: Path, columns: Sequence[str], chunk_files: Sequence[Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    try:
        for path in chunk_files:
            with np.load(path, allow_pickle=False) as z:
                arrays = []
                for c in columns:
                    arr = z[c]
                    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
                        arrays.append(pa.array(arr.reshape(len(arr))))
                    else:
                        flat = arr.reshape(len(arr), -1)
                        arrays.append(
                            pa.FixedSizeListArray.from_arrays(
                                pa.array(flat.reshape(-1)), flat.shape[1]
                            )
                        )
                table = pa.table(arrays, names=list(columns))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
