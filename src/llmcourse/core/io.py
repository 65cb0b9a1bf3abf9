"""Output conventions: atomic writes, folders that appear whole or not at all, JSON.

Every file llmcourse writes goes through here, so an interrupted or failed command never
leaves a partial output behind and never overwrites one of its inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcourse.core.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


MARKER = ".llmcourse-output"  # written into every output folder: only such folders are ever replaced
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("llmcourse_overwrite", default=False)


def llmcourse_home() -> Path:
    """Cache folder: ``$LLMCOURSE_HOME`` or ``~/.cache/llmcourse``."""
    return Path(os.environ.get("LLMCOURSE_HOME", Path.home() / ".cache" / "llmcourse"))


@contextlib.contextmanager
def overwriting(allowed: bool) -> Iterator[None]:
    """Inside, :func:`check_not_input` lets an existing output be replaced (the CLI's ``--overwrite``)."""
    token = _OVERWRITE.set(bool(allowed))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_not_input(out: str | Path, inputs: list[str | Path | None]) -> None:
    """Refuse an ``--out`` that would touch an input or the model cache, or an existing output.

    * ``out`` may not be an input, lie inside an input folder (``MODEL_DIR/model.safetensors``),
      nor be a parent of an input (replacing it would delete the input), and the same for the
      model cache (``$LLMCOURSE_HOME/models``);
    * an existing non-empty ``out`` is refused unless ``--overwrite`` (:func:`overwriting`), and even
      then a folder is replaced only if llmcourse wrote it (its ``.llmcourse-output`` marker).
    """
    if not str(out).strip():
        raise UserError("--out is empty", "pass a file or folder path")
    out_p = expand_path(out)
    with _writable(out_p):
        _check_out(out, out_p, inputs)
        _probe_write(out_p)
        _clean_stale(Path(os.path.abspath(out_p)))  # what a killed run left beside --out, whatever this run does


def expand_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; ``~nosuchuser/x`` (where ``expanduser`` raises) refused in one line."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UserError(f"{path}: there is no such user for '~'", "use a full path, or ~/ for your home folder") \
            from None


def _probe_write(out_p: Path) -> None:
    """Create and remove a hidden file where ``out`` will be written (its nearest existing folder), so a
    read-only, pseudo (``/proc``, ``/sys``) or full file system fails before the work, not after it."""
    folder = Path(os.path.abspath(out_p)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OSError(errno.ENOTDIR, "not a folder", str(folder))
    _clean_stale(folder / "llmcourse-probe")
    fd, name = tempfile.mkstemp(prefix=f".llmcourse-probe.{os.getpid()}.", suffix=".part", dir=folder)
    try:
        os.write(fd, b"x")  # a full disk fails here
    finally:
        os.close(fd)
        os.unlink(name)


def _check_out(out: str | Path, out_p: Path, inputs: list[str | Path | None]) -> None:
    if any(len(part) > 255 for part in out_p.parts):
        raise UserError(f"--out {out} has a name over 255 characters", "choose a shorter name")
    out_r = out_p.resolve()
    guarded = [(str(inp), expand_path(inp).resolve()) for inp in inputs
               if inp is not None and str(inp) != "default" and expand_path(inp).exists()]
    cache = (llmcourse_home() / "models").resolve()
    for name, p in guarded:
        if _related(out_r, p):
            raise UserError(f"--out {out} would overwrite the input {name} (or delete it)",
                            "choose an output path outside the inputs (and not a folder that holds them)")
    if _related(out_r, cache):
        raise UserError(f"--out {out} is inside (or holds) the model cache {cache}",
                        "choose an output path outside $LLMCOURSE_HOME/models")
    if not (out_p.exists() or out_p.is_symlink()):
        return
    if out_p.is_dir() and not any(out_p.iterdir()):
        return
    what = "folder" if out_p.is_dir() else "file"
    if not _OVERWRITE.get():
        raise UserError(f"--out {out} exists", f"choose a new path, or pass --overwrite to replace the {what}")
    if out_p.is_dir() and not (out_p / MARKER).exists():
        raise UserError(f"--out {out} is a folder llmcourse did not write (no {MARKER} in it); it is never replaced",
                        "choose a new or empty folder")
    if not out_p.is_dir() and not out_p.is_file():
        raise UserError(f"--out {out} is not a regular file", "choose a regular file path")


_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                 errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.EINVAL,
                 errno.EFBIG}


def _write_error(path: Path, e: OSError) -> UserError:
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or type(e).__name__
    return UserError(f"cannot write --out {path} ({why})",
                     "choose a writable folder with free space (and a name under 255 characters)")


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """OSErrors of creating or renaming an output become the one-line error naming the path."""
    try:
        yield
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise _write_error(path, e) from e
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(path: Path) -> None:
    """Remove what a killed run left beside ``path``: hidden ``.NAME.PID.*.part`` temporaries (and
    ``.NAME.old-PID`` folders) of processes that no longer run."""
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        rest = p.name[len(path.name) + 2:]
        pid_text = rest.split(".", 1)[0] if rest.endswith(".part") else rest[4:] if rest.startswith("old-") else ""
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success."""
    path = Path(os.path.abspath(expand_path(path)))
    if path.is_dir():
        raise UserError(f"--out {path} is a folder, where a file is due", "pass a file path")
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
        with _writable(path):
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            raise _write_error(path, e) from e
        raise


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain write under the umask gives: mkdtemp creates
    0700, and libraries that write through a temporary file (safetensors' ``save_file``, so
    ``model.safetensors`` and ``adapter_model.safetensors``) leave 0600."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                executable = os.stat(p).st_mode & 0o111
                os.chmod(p, (0o666 | executable) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only on success."""
    path = Path(os.path.abspath(expand_path(path)))
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a folder", "pass a folder path")
    if path.exists() and not overwrite and any(path.iterdir()):
        raise UserError(f"--out {path} is not empty", "pass an empty or new folder")
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text("written by llmcourse; `--overwrite` may replace this folder\n")
        _usual_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            raise _write_error(path, e) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: Any) -> str:
    """One JSON object on one line, as every ``--json`` prints it."""
    return json.dumps(obj, default=_json_default)
