"""Reading raw rows from data files (json, jsonl, csv, parquet), keeping each row's position for error reports.

File-level problems (unreadable, empty, a JSON array with a syntax error) raise `DatasetError` naming the file and
line. Row-level problems (a JSON Lines line that is not JSON) become a `RawRow` carrying a `Reason`, so that one
bad line is a rejected row rather than a lost file.

Bytes that are not UTF-8 are decoded with `surrogateescape`: the row survives reading and validation rejects it
with a precise reason instead of the whole file failing to decode.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npu_sft.datasets.builtin import BUILTIN_DATASETS
from npu_sft.datasets.errors import DatasetError
from npu_sft.datasets.settings import DatasetSpec

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

# Files a ModelScope (or Hugging Face) dataset repository carries besides its data.
_METADATA_FILE_NAMES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
_SPLIT_NAME_PATTERN = re.compile(r"(^|[^a-z])(train|training)([^a-z]|$)")
_OTHER_SPLIT_PATTERN = re.compile(r"(^|[^a-z])(test|testing|valid|validation|dev|eval)([^a-z]|$)")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Reason:
    """Why a row was rejected: a stable `code` for counting and a `message` for people."""

    code: str
    message: str


@dataclass(frozen=True)
class RawRow:
    row: int  # 1-based position among the file's records
    line: int | None  # 1-based line where the record starts, when the format has lines
    value: Any
    problem: Reason | None = None  # set when the record could not even be parsed


@dataclass(frozen=True)
class DataFile:
    """A data file's bytes, read once: they are hashed for the cache key and parsed from the same buffer."""

    path: Path
    display: str
    content: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class FileSelection:
    files: list[Path]
    skipped: list[Path]  # data files left out on purpose (other splits), reported in the statistics


def select_data_files(path: Path, patterns: list[str]) -> FileSelection:
    """The data files of a file or directory source.

    In a directory without `patterns`, files of other splits (test, validation...) are left out when training files
    are recognisable by name, so that a downloaded repository's test split does not leak into training.
    """
    if path.is_file():
        return FileSelection(files=[path], skipped=[])
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or directory")
    candidates = sorted(
        file
        for file in path.rglob("*")
        if file.is_file() and _is_data_file(file.relative_to(path)) and file.name not in _METADATA_FILE_NAMES
    )
    if patterns:
        chosen = [file for file in candidates if _matches_any(file.relative_to(path).as_posix(), patterns)]
        return _nonempty_selection(path, chosen, [], f"no file matches {patterns}",
                                   _holding(path, candidates))
    training = [file for file in candidates if _SPLIT_NAME_PATTERN.search(file.relative_to(path).as_posix().lower())]
    if training:
        others = [file for file in candidates if file not in training]
        return _nonempty_selection(path, training, others, "")
    unsplit = [
        file for file in candidates if not _OTHER_SPLIT_PATTERN.search(file.relative_to(path).as_posix().lower())
    ]
    others = [file for file in candidates if file not in unsplit]
    return _nonempty_selection(path, unsplit, others, f"no data file ({', '.join(DATA_FILE_SUFFIXES)})")


def _holding(path: Path, files: list[Path], shown: int = 8) -> str:
    """What the directory does hold, for the message that none of it was selected."""
    if not files:
        return f"; it holds no data file ({', '.join(DATA_FILE_SUFFIXES)})"
    names = [file.relative_to(path).as_posix() for file in files]
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return f"; its data files: {', '.join(names[:shown])}{more}"


def _is_data_file(relative: Path) -> bool:
    hidden = any(part.startswith(".") for part in relative.parts)
    return not hidden and relative.suffix.lower() in DATA_FILE_SUFFIXES


def _matches_any(relative: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def _nonempty_selection(
    path: Path, files: list[Path], skipped: list[Path], why_empty: str, holding: str = ""
) -> FileSelection:
    if not files:
        raise DatasetError(f"{path}: {why_empty or 'no data file'} in this directory{holding}")
    suffixes = {file.suffix.lower().replace(".jsonl", ".json") for file in files}
    if len(suffixes) > 1:
        raise DatasetError(f"{path}: mixes file types {sorted(suffixes)}; select one type with `files`")
    return FileSelection(files=files, skipped=skipped)


def load_data_file(path: Path, display: str) -> DataFile:
    try:
        content = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{display}: cannot read ({err.strerror})") from err
    return DataFile(path=path, display=display, content=content)


def parse_rows(data_file: DataFile) -> list[RawRow]:
    """All records of a data file; raises DatasetError for an empty file or one that cannot be parsed at all."""
    suffix = data_file.path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(data_file)
    else:
        text = _decode(data_file.content)
        if not text.strip():
            raise DatasetError(f"{data_file.display}: the file is empty")
        if suffix == ".csv":
            rows = _csv_rows(text, data_file.display)
        elif suffix == ".jsonl" or not text.lstrip().startswith("["):
            rows = _json_lines_rows(text, data_file.display)
        else:
            rows = list(_json_array_rows(text, data_file.display))
    if not rows:
        raise DatasetError(f"{data_file.display}: the file contains no rows")
    return rows


def _decode(content: bytes) -> str:
    text = content.decode("utf-8", errors="surrogateescape")
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write; not part of the data


def _json_lines_rows(text: str, display: str) -> list[RawRow]:
    if text.lstrip().startswith("{"):
        _refuse_single_json_object(text, display)
    rows = []
    decode = json.loads
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = decode(line)
        except json.JSONDecodeError as err:
            reason = Reason("invalid_json", f"line {line_number} is not valid JSON: {err.msg} (column {err.colno})")
            rows.append(RawRow(row=len(rows) + 1, line=line_number, value=line, problem=reason))
            continue
        rows.append(RawRow(row=len(rows) + 1, line=line_number, value=value))
    return rows


def _refuse_single_json_object(text: str, display: str) -> None:
    """A pretty-printed single object would otherwise read as many broken JSON Lines."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return  # not one object: JSON Lines, parsed line by line
    if "\n" in text.strip():
        raise DatasetError(f"{display}: holds one JSON object; expected a list of rows or JSON Lines")


def _json_array_rows(text: str, display: str) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, each with the line it starts on.

    Decoding element by element (in C, via raw_decode) gives those lines for free and names the exact line of a
    syntax error; a syntax error in an array cannot be resynchronised, so it fails the file.
    """
    decoder = json.JSONDecoder()
    position = _JSON_WHITESPACE.match(text, 0).end() + 1  # past "["
    position = _JSON_WHITESPACE.match(text, position).end()
    line, counted_up_to = 1, 0
    row = 0
    try:
        if _char_at(text, position) == "]":
            _expect_end(text, position + 1)
            return
        while True:
            line += text.count("\n", counted_up_to, position)
            counted_up_to = position
            value, position = decoder.raw_decode(text, position)
            row += 1
            yield RawRow(row=row, line=line, value=value)
            position = _JSON_WHITESPACE.match(text, position).end()
            separator = _char_at(text, position)
            if separator == "]":
                _expect_end(text, position + 1)
                return
            if separator != ",":
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            position = _JSON_WHITESPACE.match(text, position + 1).end()
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{display}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}{_after_row_hint(row)}"
        ) from err


def _after_row_hint(rows_read: int) -> str:
    return f" (after row {rows_read})" if rows_read else ""


def _char_at(text: str, position: int) -> str:
    if position >= len(text):
        raise json.JSONDecodeError("Unexpected end of file, the array is not closed", text, len(text))
    return text[position]


def _expect_end(text: str, position: int) -> None:
    end = _JSON_WHITESPACE.match(text, position).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data after the closing ']'", text, end)


def _csv_rows(text: str, display: str) -> list[RawRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        if reader.fieldnames is None:
            raise DatasetError(f"{display}: the file is empty")
        first_line = reader.line_num + 1  # a record may span lines (quoted newlines): report where it starts
        for record in reader:
            # Cells beyond the header land under the key None; they have no column name to map, so drop them.
            record.pop(None, None)  # type: ignore[call-overload]
            rows.append(RawRow(row=len(rows) + 1, line=first_line, value=record))
            first_line = reader.line_num + 1
    except csv.Error as err:
        raise DatasetError(f"{display}: invalid CSV at line {reader.line_num}: {err}") from err
    return rows


def _parquet_rows(data_file: DataFile) -> list[RawRow]:
    # pyarrow comes with mlflow; imported here so that the other formats do not pay for it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data_file.content:
        raise DatasetError(f"{data_file.display}: the file is empty")
    try:
        table = pq.read_table(pa.BufferReader(data_file.content))
    except pa.ArrowException as err:
        raise DatasetError(f"{data_file.display}: not a readable parquet file ({err})") from err
    return [RawRow(row=index + 1, line=None, value=record) for index, record in enumerate(table.to_pylist())]


@dataclass
class LoadedSource:
    """A source's inputs read into memory: data files (hashed before parsing) or a builtin's generated rows."""

    spec: DatasetSpec
    files: list[DataFile]
    builtin_rows: list[dict[str, Any]] | None
    skipped_files: list[str]

    def digests(self) -> list[tuple[str, str]]:
        if self.builtin_rows is not None:
            encoded = json.dumps(self.builtin_rows, ensure_ascii=False, sort_keys=True).encode("utf-8")
            return [(f"builtin:{self.spec.name}", hashlib.sha256(encoded).hexdigest())]
        return [(data_file.display, data_file.sha256) for data_file in self.files]

    def parsed_files(self) -> list[tuple[str, list[RawRow]]]:
        if self.builtin_rows is not None:
            rows = [RawRow(row=index, line=None, value=row) for index, row in enumerate(self.builtin_rows, start=1)]
            return [(f"builtin:{self.spec.name}", rows)]
        return [(data_file.display, parse_rows(data_file)) for data_file in self.files]


def load_source(spec: DatasetSpec) -> LoadedSource:
    if spec.source == "builtin":
        return LoadedSource(spec=spec, files=[], builtin_rows=BUILTIN_DATASETS[spec.name](), skipped_files=[])
    if spec.path is None:
        # Only a modelscope spec gets here: its path is set by the download step.
        raise DatasetError(f"dataset '{spec.name}': {spec.repo_id} is not downloaded yet (no local path)")
    selection = select_data_files(spec.path, spec.files)
    files = [load_data_file(path, str(path)) for path in selection.files]
    return LoadedSource(spec=spec, files=files, builtin_rows=None, skipped_files=[str(p) for p in selection.skipped])
