"""Reading and writing the project's files: JSONL with precise errors, atomic writes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Tuple

from clha.errors import InputError


def open_text(path: str | os.PathLike):
    """Open a text file for reading, transparently handling `.gz`."""
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path=path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[Tuple[int, Any]]:
    """Yield `(line_number, object)` for each non-empty line; 1-based line numbers.

    Malformed JSON or an unreadable gzip raises InputError naming the file and line.
    """
    line_num = 0
    try:
        with open_text(path) as handle:
            for line_num, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield line_num, json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"malformed JSON: {err.msg} (column {err.colno})",
                                     path=path, line=line_num) from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        # gzip.BadGzipFile is an OSError; a truncated gzip raises EOFError.
        raise InputError(f"cannot read file: {err}", path=path,
                         line=line_num + 1 if line_num else None) from None


def read_jsonl(path: str | os.PathLike) -> list:
    return [obj for _, obj in iter_jsonl(path)]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside `path` and rename it into place only on success.

    An interrupted or failing writer leaves any previous file at `path` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dumps_line(obj: Any) -> str:
    """One JSON object per line, stable bytes for the same input."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n"


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Atomically write rows as JSONL; returns the number of rows written."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(dumps_line(row))
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
