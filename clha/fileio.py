"""Reading and writing the project's files: JSONL with precise errors, atomic writes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Tuple

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

    Malformed JSON or a line that is not UTF-8 raises InputError naming the file and line; a damaged or truncated
    gzip names the file and the last line read before the damage (gzip data is decompressed in blocks).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path=path)
    line_num = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            for line_num, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if line_num == 1 else "utf-8")   # a leading BOM is dropped
                except UnicodeDecodeError as err:
                    check_gzip(path)
                    raise InputError(f"not UTF-8 text: byte {raw[err.start:err.start + 1]!r} at column "
                                     f"{err.start + 1}", path=path, line=line_num) from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    check_gzip(path)
                    raise InputError(f"malformed JSON: {err.msg} (column {err.colno})",
                                     path=path, line=line_num) from None
                yield line_num, obj
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        # a truncated gzip raises EOFError, damaged compressed data zlib.error, a bad header or CRC BadGzipFile
        where = f"unreadable after line {line_num}" if line_num else "no line readable"
        raise InputError(f"damaged or truncated gzip file ({where}): {err}", path=path) from None
    except OSError as err:
        raise InputError(f"cannot read file: {err}", path=path) from None


def check_gzip(path: str | os.PathLike) -> None:
    """For a `.gz` file: raise InputError if its compressed stream is damaged or truncated (reads it to the end).

    Damaged deflate data can decompress into plausible text before the CRC check at the end of the stream fails,
    so a reader that meets a bad row in a `.gz` file calls this first: the cause is then named, not the symptom."""
    path = Path(path)
    if path.suffix != ".gz":
        return
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(f"damaged or truncated gzip file: {err}", path=path) from None


def read_jsonl(path: str | os.PathLike) -> list:
    return [obj for _, obj in iter_jsonl(path)]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside `path` and rename it into place only on success.

    An interrupted or failing writer leaves any previous file at `path` untouched and no partial file. A folder
    that cannot be created or written (a file in the way, no permission, a full disk) raises InputError naming
    `path`. A process killed mid-write leaves only a hidden `.<name>.*.tmp` beside it, never a partial `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
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
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise


def _write_error(path: Path, err: OSError) -> InputError:
    """An OSError while writing `path` (no space, no permission, a file where a folder should be) as one line."""
    reason = err.strerror or str(err)
    if err.filename and Path(err.filename) not in (path, path.parent):
        reason += f" ({err.filename})"
    return InputError(f"cannot write: {reason}; nothing was written here", path=path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield the path of a temporary folder beside `path` for the caller to create and fill (as `save_pretrained`
    does); on success it replaces `path` (an older folder of that name is removed), on failure it is removed and any
    previous folder at `path` stays as it was."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def data_files(path: str | os.PathLike, field: str, missing: str = "file not found") -> List[Path]:
    """A data file as given, or every *.json / *.jsonl file of a folder (name order); InputError naming `field`
    when there is none."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".json", ".jsonl") and f.is_file())
        if not files:
            raise InputError("folder holds no .json/.jsonl file", path=p, field=field)
        return files
    if p.exists():
        return [p]
    raise InputError(missing, path=p, field=field)


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
