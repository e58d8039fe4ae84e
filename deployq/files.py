"""Writing outputs so that a failure never leaves a half-written file behind.

Each output is written to a temporary file beside its destination and renamed into place only
when every output of the job has been written (``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml


class AtomicOutputs:
    """Collect outputs, then publish them all at once::

        with AtomicOutputs() as out:
            out.write(dir / "model.onnx", lambda tmp: onnx.save(model, tmp))
            out.write_text(dir / "qparams.json", text)
        # all renamed into place here; on an exception none of them is
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask  # what a plain open() would have given the file

    def write(self, path: Path | str, writer: Callable[[str], None]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the temporary keeps the destination's extension: some writers choose the format by it
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
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
        if exc_type is None:
            for tmp, final in self._pending:
                os.chmod(tmp, self._mode)
                os.replace(tmp, final)
        else:
            for tmp, _ in self._pending:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        self._pending.clear()


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
