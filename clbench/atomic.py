"""Atomic file I/O and the per-run lock: what makes results safe to write from many processes.

- ``write_bytes_atomic`` / ``write_text_atomic`` / ``write_json_atomic`` / ``torch_save_atomic``:
  readers see the old file or the new one, never a half-written file (temp file in the same
  folder, fsync, ``os.replace``, fsync of the folder).
- ``write_group_atomic``: several files that belong together (a leaderboard's md/csv/html and
  plots). Every file is first written in full to a temp file; a journal then names the
  renames, and only then are they done. A kill before the journal leaves the previous set;
  a kill during the renames is rolled forward by the next writer (``recover_groups``).
- ``remove_orphans``: temp files left by a process killed with SIGKILL (whose ``finally``
  never ran) are removed by the next run in that folder. Temp names carry the writer's host
  and pid, so a live writer's temp file is never taken for an orphan.
- ``run_lock``: one lock per run id, from the ``filelock`` library. Its ``FileLock`` is
  ``fcntl.flock`` on POSIX, which the kernel releases when the holder dies (even by kill -9),
  so no stale lock survives a crash; Linux NFS clients emulate ``flock`` with POSIX byte-range
  locks, so it holds across cluster nodes sharing one results folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import filelock

from clbench.errors import ClbenchError

TMP_PREFIX = ".clbench-tmp."
# A temp file from another host cannot be checked for a live writer; one untouched this long
# is an orphan (an atomic write takes seconds, not an hour).
ORPHAN_AGE_S = 3600.0
GROUP_JOURNAL = ".clbench-group.json"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.")


def _tmp_prefix(path: Path) -> str:
    return f"{TMP_PREFIX}{_HOST}.{os.getpid()}.{path.name}."


def _write_tmp(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a fully fsynced temp file beside ``path``; removed again on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    except BaseException:
        _unlink(Path(tmp))
        raise
    return Path(tmp)


def _atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    tmp = _write_tmp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    On any error the temp file is removed and the old file is left untouched. Temp names
    start with '.' and end in '.tmp', so ``*.json`` globs never see a half-written record.
    """
    _atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Serialise ``obj`` as standard JSON and write it atomically to ``path``.

    Serialisation happens before any file is touched, so an object that cannot be encoded
    (TypeError) or holds NaN/inf (ValueError: standard JSON has no NaN; store ``None``)
    leaves the old file as it was. numpy/torch scalars and arrays are converted through
    their ``tolist()``.
    """
    text = json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    write_text_atomic(path, text + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically and durably (fsync before the rename).

    Streams into the temp file rather than through an in-memory buffer, so a large
    checkpoint is not held twice in RAM.
    """
    import torch  # only the writers of checkpoints pay for importing torch

    _atomic(path, lambda f: torch.save(obj, f))


def _json_default(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)  # numpy.ndarray, numpy scalars, torch.Tensor
    if callable(tolist):
        return tolist()
    raise TypeError(f"object of type {type(o).__name__} is not JSON serialisable")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible on every OS/file system.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


# --------------------------------------------------------------------------- file groups


def write_group_atomic(root: str | os.PathLike, files: Mapping[str | os.PathLike, bytes]) -> None:
    """Replace several files under ``root`` as one group.

    All contents are written and fsynced to temp files first (the slow part). A journal
    ``root/.clbench-group.json`` listing the renames is then written atomically: that is the
    commit point. A kill before it leaves the previous files; a kill after it is completed by
    the next :func:`recover_groups` on ``root`` (the run and leaderboard commands call it).
    Callers serialise writers of one group with a lock (the leaderboard does).
    """
    root = Path(root)
    recover_groups(root)
    tmps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            path = Path(path)
            tmps[path] = _write_tmp(path, lambda f, data=data: f.write(data))
        fault_point("group-staged")
        renames = [[os.path.relpath(t, root), os.path.relpath(p, root)] for p, t in tmps.items()]
        write_json_atomic(root / GROUP_JOURNAL, {"renames": renames})
    except BaseException:
        for tmp in tmps.values():
            _unlink(tmp)
        raise
    _finish_group(root, renames)


def _finish_group(root: Path, renames: list[list[str]]) -> None:
    for k, (tmp, final) in enumerate(renames):
        fault_point(f"group-rename:{k}")
        # A missing temp file was renamed already, by an interrupted attempt or a concurrent
        # recovery of the same journal; either way its content is in place.
        with contextlib.suppress(FileNotFoundError):
            os.replace(root / tmp, root / final)
    for d in {(root / final).parent for _, final in renames}:
        _fsync_dir(d)
    _unlink(root / GROUP_JOURNAL)


def recover_groups(root: str | os.PathLike) -> bool:
    """Complete a group write that a killed process left half-renamed under ``root``.

    Returns True if there was one. A journal that cannot be read (it is written atomically,
    so this means it was tampered with) is removed; the temp files then become orphans.
    """
    journal = Path(root) / GROUP_JOURNAL
    if not journal.exists():
        return False
    try:
        renames = json.loads(journal.read_text())["renames"]
    except (OSError, ValueError, KeyError, TypeError):
        _unlink(journal)
        return False
    _finish_group(Path(root), renames)
    return True


# --------------------------------------------------------------------------- orphans


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_orphan(path: Path, *, now: float | None = None) -> bool:
    """Whether a temp file of ours was left by a writer that no longer runs."""
    m = _TMP_RE.match(path.name)
    if not m:
        return False
    if m["host"] == _HOST:
        return not _pid_alive(int(m["pid"]))
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > ORPHAN_AGE_S


def remove_orphans(*folders: str | os.PathLike) -> list[Path]:
    """Remove temp files left by killed writers in ``folders`` (not recursive); returns them.

    Pending group journals in these folders are completed first, so their temp files are
    renamed into place rather than removed.
    """
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        recover_groups(folder)
        for p in folder.glob(TMP_PREFIX + "*"):
            if p.is_file() and is_orphan(p):
                _unlink(p)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------- checks and hooks


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Check, without creating anything, that ``path`` is (or can become) a writable folder.

    Raises:
        ClbenchError: ``path`` or a parent is a file, or the folder that would hold it is not
            writable (read-only file system or permissions).
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path:
            raise ClbenchError(f"{what} {path} is a file, not a folder; pass a folder")
        raise ClbenchError(f"{what} {path}: its parent {probe} is a file, not a folder")
    try:  # a real write, since access() says yes to root even on a read-only mount
        with tempfile.TemporaryFile(dir=probe, prefix=TMP_PREFIX):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ClbenchError(
            f"{what} {path} is not writable ({probe}: {reason}); pass a folder you can write to"
        ) from None
    return path


# Fault injection for the crash-safety tests: CLBENCH_FAULT=kill@POINT sends SIGKILL to this
# process when it reaches POINT; CLBENCH_FAULT=wait@POINT=FILE creates FILE.reached there and
# waits until FILE exists (to hold a process at a known point while another one runs).
FAULT_ENV = "CLBENCH_FAULT"


def fault_point(name: str) -> None:
    """A named point where the fault-injection tests can kill or hold this process."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, rest = spec.partition("@")
    point, _, arg = rest.partition("=")
    if point != name:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "wait" and arg:
        Path(arg + ".reached").touch()
        while not Path(arg).exists():
            time.sleep(0.05)


# --------------------------------------------------------------------------- locks


@contextlib.contextmanager
def run_lock(
    path: str | os.PathLike, timeout: float = 0.0, *, what: str = "", hint: str = ""
) -> Iterator[Path]:
    """Hold the lock file ``path`` for the body of a ``with`` block.

    Args:
        path: the lock file (its folder is created); one per run id, e.g.
            ``<out>/.locks/<run_id>.lock`` (see ``clbench.records.lock_path``).
        timeout: seconds to wait for another holder; 0 fails at once, a negative value waits
            for ever.
        what: how the error names the locked thing (default: the lock file).
        hint: what the error tells the user to do (default: wait, or --lock-timeout).

    Raises:
        ClbenchError: another process holds the lock after ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout:
        waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
        raise ClbenchError(
            f"{what or path} is being written by another process (lock {path} is held{waited}); "
            + (hint or "wait for it to finish, or pass --lock-timeout SECONDS to wait for it")
        ) from None
    try:
        yield path
    finally:
        lock.release()


def training_lock(out: str | os.PathLike, who: str) -> contextlib.AbstractContextManager[Path]:
    """One trainer per run folder: a second ``--resume`` on a folder being trained would
    interleave two runs' checkpoints. Fails at once, before anything is written."""
    return run_lock(
        Path(out) / ".locks" / "train.lock",
        what=f"{who}: run folder {out}",
        hint="wait for that training to finish, or choose another --out",
    )
