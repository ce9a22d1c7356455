"""Safe writes: outputs appear whole under their final name or not at all; files that will be
memory-mapped get their disk space up front; one writer per run folder.

* :func:`atomic_path` writes beside the target under a temporary name that carries the
  writer's process id, and renames; :func:`remove_stale_temps` deletes the temporaries of
  processes that died (``kill -9``) before they could clean up.
* :func:`preallocate` reserves a file's blocks (``posix_fallocate``): a full disk is then one
  clear error when the file is created, never a ``SIGBUS`` when a mapped page is written.
* :func:`run_lock` holds ``RUN/.lock`` (``fcntl.flock``) for a writing command's life.

Nothing outside the run is harmed: a target that is a device, a FIFO or a socket is refused
(:func:`check_target`; the null device itself means "discard"), a symlink is replaced, never
followed, the lock is opened with ``O_NOFOLLOW``, and only temporaries that carry tive's
marker file (or are empty) are ever deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import time
import tokenize
from pathlib import Path
from typing import Any, Iterator

from tive.errors import ConfigError, OutputError

LOCK_FILE = ".lock"
# what numpy raises for a damaged .npy header (it parses the header as a Python literal)
NPY_HEADER_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError)
_TEMP = re.compile(r"^\..+\.pid(\d+)\.[^.]*\.tmp$")  # .NAME.pidPID.RANDOM.tmp
MARKER = ".tive-temporary"  # inside every temporary folder: what makes it tive's own
_KINDS = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


def is_null_device(path: str | os.PathLike) -> bool:
    """True when ``path`` itself (not a symlink to it) is the system's null device."""
    try:
        st = os.lstat(path)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev
    except (OSError, ValueError):
        return False


def special_kind(path: str | os.PathLike) -> str | None:
    """``"FIFO"``, ``"socket"``, ``"character device"`` or ``"block device"`` when ``path``
    (followed if a symlink) is one, else None (a regular file, a folder, or nothing there).
    Readers call it before opening: opening a FIFO would wait for a writer forever."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for test, name in _KINDS if test(mode)), None)


def check_target(target: str | os.PathLike, *, directory: bool = False) -> None:
    """Refuse to write over anything but a regular file, a folder (when ``directory``), a
    symlink (replaced; what it points to is untouched) or nothing.

    Raises:
        OutputError: ``target`` is a device, FIFO or socket, or a folder where a file goes.
    """
    target = Path(target)
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise OutputError(f"{target}: cannot write there ({getattr(e, 'strerror', None) or e}); "
                          f"fix: choose another output path") from None
    if stat.S_ISDIR(mode) and not directory:
        raise OutputError(f"{target}: is a folder; expected a file name; fix: give a file path")
    kind = next((name for test, name in _KINDS if test(mode)), None)
    if kind is not None:
        raise OutputError(f"{target}: is a {kind}, not a regular file; tive never writes over "
                          f"one; nothing was written; fix: choose a file path (-o /dev/null "
                          f"discards the output)")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    Args:
        target: final file or folder name.
        directory: the block writes a folder (e.g. ``save_to_disk``) rather than a file.

    On any exception the temporary file or folder is removed and ``target`` is untouched;
    operating-system errors (no space, no permission, a file where a folder should be) become
    one-line :class:`~tive.errors.OutputError` s.
    """
    target = Path(target)
    if is_null_device(target):
        yield from _discard(target)
        return
    check_target(target, directory=directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name[:64]}.pid{os.getpid()}.",
                                    suffix=".tmp", dir=target.parent))
        (tmp / MARKER).write_bytes(b"")
    except OSError as e:
        raise OutputError(f"{target}: cannot write there ({e.strerror or e}); fix: choose "
                          f"another output path") from None
    work = tmp / target.name
    try:
        yield work
        check_target(target, directory=directory)  # made meanwhile?
        if directory and os.path.lexists(target):
            old = tmp / ".replaced"
            os.replace(target, old)
        os.replace(work, target)
    except OSError as e:
        raise OutputError(f"{target}: writing failed ({e.strerror or e}); nothing was written; "
                          f"fix: check space and permissions there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(target: Path) -> Iterator[Path]:
    """``atomic_path`` onto the null device: the block writes into a private temporary folder,
    deleted afterwards; nothing reaches ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=".tive-discard."))
    try:
        yield tmp / "discarded"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders that :func:`atomic_path` left in ``folder`` when its
    process was killed (the process id in their name is no longer running).

    Only what tive can recognise as its own goes: a real folder (not a symlink) named
    ``.NAME.pidPID.RANDOM.tmp`` that holds the marker file ``.tive-temporary`` beside at most
    the work file and ``.replaced``, or nothing at all. A file or a folder of the same name
    holding anything else is left alone.

    Returns:
        the paths removed (for a one-line message).
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP.match(path.name)
        if match and not _alive(int(match.group(1))) and _own_temporary(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _own_temporary(path: Path) -> bool:
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        names = set(os.listdir(path))
    except OSError:
        return False
    return not names or (MARKER in names and len(names - {MARKER, ".replaced"}) <= 1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` when it has less free.

    Raises:
        OutputError: ``needs N GB in DIR, M GB free``.
    """
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise OutputError(f"{what} needs {_size(needed)} in {probe}, {_size(free)} free; fix: "
                          f"free some space or choose another --run folder")


def preallocate(path: str | os.PathLike, what: str) -> None:
    """Reserve the disk blocks of the existing file ``path`` (its whole length).

    Raises:
        OutputError: no space for it (``needs N GB in DIR, M GB free``).
    """
    path = Path(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                return
            raise
        free = shutil.disk_usage(path.parent).free
        raise OutputError(f"{what} needs {_size(size)} in {path.parent}, {_size(free)} free; "
                          f"nothing was kept; fix: free some space or choose another --run "
                          f"folder") from None
    finally:
        os.close(fd)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@contextlib.contextmanager
def run_lock(run: str | os.PathLike, command: str, *, take: bool = True) -> Iterator[None]:
    """Hold ``run/.lock`` for the block: one writing command per run folder at a time.

    Args:
        run: the run folder (created if absent).
        command: what holds it, for the message another process gets (e.g. ``tive score``).
        take: False for the ranks of a torchrun job other than rank 0, which share rank 0's
            lock (a no-op here).

    Raises:
        ConfigError: another process holds the lock, naming its command and process id.
    """
    if not take:
        yield
        return
    import fcntl

    run = Path(run)
    fd = _open_lock(run)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(f"{run}: in use by {holder}; fix: wait for it to finish, or use "
                              f"another --run folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"`{command}` (pid {os.getpid()}, since "
                      f"{time.strftime('%H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(run: Path) -> int:
    """Open (or create) ``run/.lock`` as a regular file, never through a symlink."""
    lock = run / LOCK_FILE
    with contextlib.suppress(OSError):
        if not stat.S_ISREG(os.lstat(lock).st_mode) and not os.path.islink(lock):
            raise OutputError(f"{lock}: is not a regular file; tive never writes over one; "
                              f"fix: delete it or use another --run folder")
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(lock):
            raise OutputError(f"{lock}: is a symlink; tive never writes through one; fix: "
                              f"delete it (rm {lock}) or use another --run folder") from None
        raise OutputError(f"{run}: cannot write there ({e.strerror or e}); fix: choose another "
                          f"--run folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{lock}: is not a regular file; tive never writes over one; fix: "
                          f"delete it or use another --run folder")
    return fd


def write_json(target: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        # a lone surrogate is written as its \u escape: JSON reads it back as is
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
            f.write("\n")
    return Path(target)
