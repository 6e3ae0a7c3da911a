"""Output paths: checked before any work, written atomically with the usual file mode.

Every command that writes a file checks its path with `check_output` first (it must not be an
input, a folder, a device or a FIFO, and its folder must be writable), then writes through
`staged`, which leaves nothing behind on any failure or signal.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qdq.errors import OutputError

PathLike = str | os.PathLike[str]


def check_output(output: PathLike, inputs: list[PathLike | None], flag: str = "-o") -> Path:
    """`output` as a Path, after refusing what would lose a file or fail after the work.

    `inputs` are every file or folder the command reads (model, data); `None`s are skipped.
    """
    text = os.fspath(output)
    if not text:
        raise OutputError(f"{flag} is empty; give the path of the file to write")
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise OutputError(f"{flag} {text} ends in a separator; give a file name, not a folder")
    path = Path(text)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name inside it")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise OutputError(
            f"{flag} {path} is not a regular file (a device, FIFO or socket), which qdq "
            "would replace; give the path of a regular file"
        )
    for source in inputs:  # an empty path (the working folder to Path) is refused by its reader
        if source is not None and os.fspath(source):
            _check_not_input(path, Path(source), flag)
    _check_folder(path.parent, flag)
    return path


def _check_not_input(path: Path, source: Path, flag: str) -> None:
    if not source.exists():
        return
    if source.is_dir():
        if path.resolve().is_relative_to(source.resolve()):
            raise OutputError(
                f"{flag} {path} lies inside the input folder {source}, whose files are read "
                "as samples; write it elsewhere"
            )
    elif path.exists():
        if os.path.samefile(source, path):
            raise OutputError(
                f"{flag} {path} is the input {source} (the same file); choose another output path"
            )
        if source.suffix.lower() not in (".npz", ".npy"):  # a model, whatever its name
            from qdq.onnx.model import external_data_files  # onnx is heavy; only for models

            weights = [f for f in external_data_files(source) if f.exists()]
            if any(os.path.samefile(f, path) for f in weights):
                raise OutputError(
                    f"{flag} {path} holds the weights of the input model {source} (its external "
                    "data); choose another output path"
                )


def _check_folder(folder: Path, flag: str) -> None:
    """The folder exists and a file can be created in it (tried, not guessed from modes)."""
    if not folder.is_dir():
        raise OutputError(f"{flag}: output folder {folder} does not exist; create it first")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".qdq-"):
            pass
    except OSError as error:
        raise OutputError(
            f"{flag}: cannot write in {folder} ({error.strerror}); choose a writable folder"
        ) from None


@contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; on success it gets mode 0666 less the umask
    (as a plain `open` would give) and replaces `path`; on any failure it is removed."""
    temporary: Path | None = None
    try:
        handle, name = tempfile.mkstemp(prefix=".qdq-", suffix=path.suffix, dir=path.parent)
        os.close(handle)
        temporary = Path(name)
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


@contextmanager
def replaced_together(paths: list[Path]) -> Iterator[None]:
    """The files at `paths` back as they were if the block fails, and those it made gone: its
    outputs (a model, its table, its report) are one result, all or none, and a failure loses
    no earlier one. The earlier files are kept as hard links (copies where links fail); what
    is there and no regular file (a FIFO, a device) is left alone."""
    kept: dict[Path, Path] = {}
    there = {path for path in paths if path.exists() or path.is_symlink()}  # never removed
    for path in paths:
        if path.is_file():
            backup = path.with_name(f".{path.name}.qdq-previous")
            backup.unlink(missing_ok=True)
            try:
                os.link(path, backup)
            except OSError:
                shutil.copy2(path, backup)
            kept[path] = backup
    try:
        yield
    except BaseException:
        for path in paths:
            if path not in kept:
                if path not in there:  # (a FIFO or device given as -o was refused, not made)
                    path.unlink(missing_ok=True)
            elif not (path.exists() and path.samefile(kept[path])):  # (a rename onto another
                os.replace(kept.pop(path), path)  # link of the same file does nothing)
        raise
    finally:
        for backup in kept.values():
            backup.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask
