"""Atomic writes: a file on disk is either the complete old one or the complete new one, never a half-written mix.

Every artifact the library writes (predictors, quantized weights, JSON reports, checkpoints, converted models)
goes through `atomic_path`: the content is written to a temporary file in the same directory, flushed to disk,
given the permissions a plain `open(path, "w")` would give (an existing file keeps its mode, a new one gets the
umask's), and renamed over the target. An error or an interrupt (KeyboardInterrupt included) on the way removes the
temporary file and leaves the target as it was. Only a crash of the process itself (SIGKILL, power loss) can
leave a `.NAME.*.partial` file next to the target; the target is still whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere reading it means setting it, which briefly exposes
    other threads' new files to a wrong mask, so that is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """What open(path, "w") would leave: an existing file keeps its permission bits, a new one gets 0o666 & ~umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode) & 0o777  # (a write clears set-id bits too)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """with atomic_path(p) as tmp: write the whole file to `tmp` by any means; on leaving, tmp replaces p.

    The directory of p must exist; p must not be a directory. A symbolic link p is followed (its target is
    replaced, the link stays), as open(p, "w") would; so are an existing file's permission bits.
    """
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist (for {path})")
    mode = _mode_for(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        tmp = Path(name)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:  # errors and interrupts alike: never leave the temporary behind
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    _fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """safetensors.torch.save_file through `atomic_path`, whatever the safetensors version (older ones write in
    place, which is harmless here: they write the temporary file)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=metadata)
    return Path(path)


def save_png_atomic(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure laid out tight and written as a PNG through `atomic_path` (the caller closes it)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
