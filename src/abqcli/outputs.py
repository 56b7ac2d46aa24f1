"""Where abq may write an output directory, and how it replaces one without ever losing a user's files.

* An output never is, contains or lies inside an input (the model, a pack source), and never is the
  working directory or one of its ancestors (`resolve_output`).
* An existing directory is replaced only when it is recognisably abq's (`is_abq_dir`: the marker
  `abq-output.json` that `abq quantize` writes first, or an export's `abq.json`); `refuse_foreign` names
  what is there otherwise.
* The new tree is built complete in the temporary sibling `.<name>.tmp<pid>` and swapped in at once
  (`replacing`): Linux `renameat2(RENAME_EXCHANGE)`, elsewhere two renames through `.<name>.old<pid>`.
  Whenever a run stops, `<name>` holds the previous complete output or the new complete one.
* One run per output (`output_lock`): an exclusive `flock` on the sibling `.<name>.lock`, which holds the
  holder's pid. The kernel drops the lock when its process dies, so a dead run's lock is simply taken over.
* `remove_stale` deletes the temporary siblings that a killed run left behind (only those of dead pids).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from abqcli.errors import InputError

MARKER = "abq-output.json"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SHOWN_ENTRIES = 4
T = TypeVar("T")


def _overlap(target: Path, item: Path) -> str | None:
    """How `target` overlaps the input `item` (both resolved), or None."""
    if target == item:
        return "is"
    if target in item.parents:
        return "contains"
    if item in target.parents:
        return "lies inside"
    return None


def resolve_output(path: Path, inputs: Iterable[tuple[str, Path]]) -> Path:
    """The output directory `path`, resolved; InputError where replacing it could destroy what is not abq's:
    the working directory or an ancestor of it, or an overlap with any of `inputs` ((description, path))."""
    target = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise InputError(f"output {str(path)!r} is the current directory or one of its ancestors: "
                         "give abq a directory of its own")
    for what, item in inputs:
        relation = _overlap(target, Path(item).resolve())
        if relation:
            raise InputError(f"output {path} {relation} {what} ({item}): abq never writes over its inputs")
    if target.exists() and not target.is_dir():
        raise InputError(f"output path exists and is not a directory: {path}")
    return target


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def is_abq_dir(directory: Path) -> bool:
    """Written by abq: the marker of `abq quantize` or the manifest of an export."""
    from abqcli.formats import ABQ_JSON

    return (directory / MARKER).is_file() or (directory / ABQ_JSON).is_file()


def refuse_foreign(directory: Path, shown: Path) -> None:
    """InputError naming a few of the entries of a directory that abq did not write."""
    names = entries(directory)
    listed = ", ".join(names[:_SHOWN_ENTRIES]) + (f", ... ({len(names)} entries)" if len(names) > _SHOWN_ENTRIES
                                                  else "")
    raise InputError(f"{shown} is not an abq output (it holds {listed}); abq replaces only directories it "
                     "wrote: choose another output directory, or empty this one yourself")


def write_marker(directory: Path, kind: str) -> None:
    (directory / MARKER).write_text(json.dumps({"tool": "abq", "kind": kind}, sort_keys=True) + "\n")


def _writable(action: Callable[[], T], target: Path) -> T:
    """`action()`, with an OSError (read-only filesystem, no permission, disk full) as InputError."""
    try:
        return action()
    except OSError as exc:
        raise InputError(f"cannot write the output {target}: {exc.strerror or exc}") from exc


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def _acquire(path: Path, target: Path) -> int:
    """An fd holding the exclusive flock of `path`, the file still at `path` (not unlinked by a finishing
    holder between our open and our flock), with our pid written in it."""
    while True:
        fd = _writable(lambda: os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"another abq run (pid {holder}) is writing {target}; wait for it to finish "
                             f"(lock file {path})") from None
        except OSError as exc:
            os.close(fd)
            raise InputError(f"cannot lock the output {target}: {exc.strerror or exc}") from exc
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold `target`'s lock for the block (creating its parent: an unwritable place is an InputError here,
    before any heavy work). A second holder gets an InputError naming the first one's pid."""
    _writable(lambda: target.parent.mkdir(parents=True, exist_ok=True), target)
    path = _lock_path(target)
    fd = _acquire(path, target)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiter then sees another inode and retries
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _sibling(target: Path, kind: str, pid: int | None = None) -> Path:
    return target.with_name(f".{target.name}.{kind}{os.getpid() if pid is None else pid}")


def remove_stale(target: Path) -> None:
    """Delete the `.<name>.tmp<pid>` / `.<name>.old<pid>` siblings of dead processes. An `.old` one with no
    `<name>` beside it is a fallback swap cut between its two renames: it is the previous output, put back."""
    prefix = f".{target.name}."
    for entry in sorted(target.parent.iterdir()) if target.parent.is_dir() else []:
        rest = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        kind, pid = rest[:3], rest[3:]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not target.exists():
            entry.rename(target)
        else:
            _remove(entry)


@functools.cache
def _renameat2():
    """libc's renameat2, or None where there is none (not Linux, old glibc)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the OS or the filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_into_place(new: Path, target: Path) -> None:
    """Make the complete tree `new` the `target`; a previous `target` ends up at `new` (for the caller to
    remove). Without an atomic exchange the previous tree passes through `.<name>.old<pid>`."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        return
    old = _sibling(target, "old")
    target.rename(old)
    new.rename(target)
    old.rename(new)


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target` to fill; when the block completes it becomes `target`
    and the previous `target` is removed. On an exception the sibling is removed and `target` untouched."""
    tmp = _sibling(target, "tmp")
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        swap_into_place(tmp, target)
    finally:
        _remove(tmp)
