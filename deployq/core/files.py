"""Writing outputs so that a failure never leaves a half-written file behind.

Each output is written to a temporary file beside its destination and renamed into place only
when every output of the job has been written (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml


class OutputPathError(ValueError):
    """An output path that cannot be written; raised before any work is done."""


def check_output(path: Path | str, option: str, folder: bool = False) -> Path:
    """Fail early, naming `option`, when `path` (a file, or a `folder`) could not be written: a
    file where a folder must be (or the other way round), or no writable folder to make it in."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{option} {path}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: the folder {existing} is not writable")
    return path


# temporaries and backups that AtomicOutputs leaves only when its process is killed:
# ".<name>.<pid>.<random>.tmp<suffix>" and ".<name>.<pid>.bak"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:[a-z0-9_]{8}\.tmp.*|bak)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove the temporaries of AtomicOutputs runs whose process is gone (killed mid-write); a
    backup whose file is missing (killed mid-publish) is put back. Returns the paths removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match or not entry.is_file() or _alive(int(match["pid"])):
            continue
        original = entry.with_name(match["name"])
        with contextlib.suppress(OSError):
            if entry.name.endswith(".bak") and not original.exists():
                os.replace(entry, original)
            else:
                entry.unlink()
                removed.append(entry)
    return removed


class AtomicOutputs:
    """Collect outputs, then publish them all at once::

        with AtomicOutputs() as out:
            out.write(dir / "model.onnx", lambda tmp: onnx.save(model, tmp))
            out.write_text(dir / "qparams.json", text)
        # all renamed into place here; on an exception none of them is

    Publishing is all-or-nothing: the files a set replaces are first moved aside, and if any
    rename fails they are put back and the new ones removed. Temporaries of runs that were
    killed (SIGKILL: nothing can clean up then) are removed the next time a set is written to
    the same folder.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._cleaned: set[Path] = set()
        self._made: list[Path] = []  # folders write() created, deepest first
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask  # what a plain open() would have given the file

    def write(self, path: Path | str, writer: Callable[[str], None]) -> Path:
        path = Path(path)
        if path.is_dir():
            raise OutputPathError(f"{path} is a folder; a file of that name cannot be written")
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        self._made.extend(missing)  # removed again (if still empty) when the set is not published
        if path.parent not in self._cleaned:
            clean_leftovers(path.parent)
            self._cleaned.add(path.parent)
        # the temporary keeps the destination's extension: some writers choose the format by it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
        self._pending.append((Path(tmp), path))
        writer(tmp)
        return path

    def write_text(self, path: Path | str, text: str) -> Path:
        return self.write(path, lambda tmp: Path(tmp).write_text(text))

    def write_bytes(self, path: Path | str, data: bytes) -> Path:
        return self.write(path, lambda tmp: Path(tmp).write_bytes(data))

    def __enter__(self) -> "AtomicOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        published = False
        try:
            if exc_type is None:
                self._publish()
                published = True
        finally:
            for tmp, _ in self._pending:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            self._pending.clear()
            if not published:  # leave no empty folder behind either
                for folder in self._made:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            self._made.clear()

    def _publish(self) -> None:
        moved: list[tuple[Path, Path]] = []  # (backup, destination) of files this set replaces
        placed: list[Path] = []
        try:
            for tmp, final in self._pending:
                os.chmod(tmp, self._mode)
                if final.is_dir():
                    raise OutputPathError(f"{final} is a folder; a file of that name cannot be written")
                if final.exists():
                    backup = final.with_name(f".{final.name}.{os.getpid()}.bak")
                    os.replace(final, backup)
                    moved.append((backup, final))
                os.replace(tmp, final)
                placed.append(final)
        except BaseException:
            for final in placed:
                with contextlib.suppress(OSError):
                    final.unlink()
            for backup, final in moved:
                with contextlib.suppress(OSError):
                    os.replace(backup, final)
            raise
        for backup, _ in moved:
            with contextlib.suppress(OSError):
                backup.unlink()


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[str]:
    """A temporary path to write `path` through: ``with atomic_path(p) as tmp: save(tmp)``."""
    with AtomicOutputs() as out:
        holder: list[str] = []
        out.write(path, holder.append)
        yield holder[0]


def json_text(data: Any, indent: int = 1) -> str:
    """`data` as strict JSON (a trailing newline): NaN and infinities, which JSON has no words for,
    become null, so every JSON file deployq writes parses anywhere."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=indent, allow_nan=False) + "\n"


def read_yaml(path: Path | str, what: str, error: type[Exception]) -> Any:
    """The document of a YAML file; a missing file or invalid YAML raises `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from None
