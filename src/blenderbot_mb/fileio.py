"""Reading and writing model files safely.

Reading: `checked_file` admits a file only if its name is a plain file name, it is a regular file (a FIFO
or device would hang or never end), and it lies inside the model's folder once symlinks are resolved (for
a Hugging Face hub snapshot, inside that repository's cache, whose snapshot symlinks point to its blobs).

Writing: `atomic_path` writes one file under a temporary name and renames it when complete.
`folder_transaction` writes a whole model folder: into a fresh temporary folder beside the destination,
swapped in whole when complete (an atomic exchange where the system has one), so a reader sees the old
model or the new one, never a mix; a lock file beside the destination (`filelock`) keeps two writers off
one folder (the lock files live in the package's cache folder, see `lock_path`). Temporary files and folders carry `.bbmb-tmp-<pid>-` in their names: they are removed on
failure, and those of a killed process are found and removed by the next write. Files and folders get
the permissions the user's umask gives, as `open` would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable

from .errors import CheckpointError

TEMP_TAG = ".bbmb-tmp-"
OLD_TAG = ".bbmb-old-"
LOCK_SUFFIX = ".bbmb-lock"


# ---------------------------------------------------------------------- reading
def plain_name(name: str) -> bool:
    """A bare file name: no folder part, not '.', '..', absolute or empty."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and os.path.basename(name) == name)


def confinement_root(folder: str) -> str:
    """The folder a model's files must resolve into: the folder itself, or for a hub snapshot
    (`models--org--name/snapshots/<revision>`) the repository's cache folder, where its blobs live."""
    real = os.path.realpath(folder)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        return os.path.dirname(parent)
    return real


def inside(path: str, root: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, root]) == root


def checked_file(folder: str, name: str, what: str = "file", root: str | None = None) -> str:
    """The resolved path of `folder/name`, after checking that `name` is a plain file name, that the path
    resolves inside `root` (default: `confinement_root(folder)`) and that it is a regular file."""
    if not plain_name(name):
        raise CheckpointError(f"{what} name {name!r} in {folder} is not a plain file name (no folders, no '..')")
    path = os.path.join(folder, name)
    root = root or confinement_root(folder)
    if not inside(path, root):
        raise CheckpointError(f"{path} resolves to {os.path.realpath(path)}, outside the model folder {root}; "
                              "model files must lie inside their folder")
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file (a folder, FIFO or device); refusing to read it")
    return real


def check_folder_files(folder: str, names) -> None:
    """`checked_file` for each of `names` that exists in `folder` (a dangling symlink counts as existing)."""
    root = confinement_root(folder)
    for name in names:
        if os.path.lexists(os.path.join(folder, name)):
            checked_file(folder, name, root=root)


# ---------------------------------------------------------------------- permissions
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` would give under the current umask (tempfile's are 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


# ---------------------------------------------------------------------- temporary names
def _temp_prefix(name: str) -> str:
    return f".{name}{TEMP_TAG}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _temp_owner(entry: str) -> int | None:
    """The process id in a temporary name `.<name>.bbmb-tmp-<pid>-...`, None for other names."""
    for tag in (TEMP_TAG, OLD_TAG):
        if entry.startswith(".") and tag in entry:
            pid = entry.split(tag, 1)[1].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale_temps(directory: str, name: str | None = None) -> list[str]:
    """Remove temporary files and folders in `directory` left by processes that no longer run (all of
    those for destination `name`, whose lock the caller holds). Returns the removed names."""
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        pid = _temp_owner(entry)
        if pid is None:
            continue
        ours = name is not None and entry.startswith(f".{name}{TEMP_TAG}")
        if (ours or not _pid_alive(pid)) and pid != os.getpid() and OLD_TAG not in entry:
            _remove(os.path.join(directory, entry))
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale_temps(directory)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(os.path.basename(path)), suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def copy_confined(src_folder: str, name: str, dst_folder: str) -> bool:
    """Copy `src_folder/name` into `dst_folder` if it exists; a symlink is followed only inside the source
    folder (a link out of it is refused). Returns whether a file was copied."""
    if not os.path.lexists(os.path.join(src_folder, name)):
        return False
    path = checked_file(src_folder, name)
    with atomic_path(os.path.join(dst_folder, name)) as tmp:
        shutil.copyfile(path, tmp)
    return True


# ---------------------------------------------------------------------- folders
def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the system has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _swap_in(new: str, dst: str) -> None:
    """Make folder `new` the folder `dst`; the old `dst`, if any, is removed."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
    elif _exchange(new, dst):  # `new` now holds the old folder
        _remove(new)
    else:  # two renames: a reader may briefly find no folder, never a mixed one
        parent, name = os.path.split(dst)
        old = tempfile.mkdtemp(prefix=f".{name}{OLD_TAG}{os.getpid()}-", dir=parent)
        os.rmdir(old)
        os.rename(dst, old)
        os.rename(new, dst)
        shutil.rmtree(old, ignore_errors=True)


def _restore_interrupted_swap(parent: str, name: str) -> None:
    """A writer killed between the two renames of `_swap_in` left `dst` missing and the old folder aside."""
    dst = os.path.join(parent, name)
    olds = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}{OLD_TAG}"))
    for entry in olds:
        path = os.path.join(parent, entry)
        if not os.path.lexists(dst):
            os.rename(path, dst)
        else:
            _remove(path)


def _carry_over(old: str, new: str, keep: Callable[[str], bool]) -> None:
    """Hard-link (or copy) the entries of `old` that `keep` accepts and `new` lacks into `new`."""
    for entry in os.listdir(old):
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if not keep(entry) or os.path.lexists(dst) or _temp_owner(entry) is not None:
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif os.path.isfile(src):
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_error(path: str, e: OSError) -> CheckpointError:
    return CheckpointError(f"cannot write {path}: {e.strerror or e}")


def cache_home() -> str:
    """The package's cache folder: $BLENDERBOT_MB_HOME, else $XDG_CACHE_HOME/blenderbot-mb, else
    ~/.cache/blenderbot-mb (locks, the server's conversation database)."""
    if os.environ.get("BLENDERBOT_MB_HOME"):
        return os.path.expanduser(os.environ["BLENDERBOT_MB_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "blenderbot-mb")


def lock_path(dst: str) -> str:
    """The lock file of destination folder `dst`: in the package's cache (`<home>/locks`, named by a hash of
    the resolved path) so that nothing is left beside the destination; beside it if the cache is not writable."""
    import hashlib

    real = os.path.realpath(dst)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
    locks = os.path.join(cache_home(), "locks")
    with contextlib.suppress(OSError):
        os.makedirs(locks, exist_ok=True)
    if os.access(locks, os.W_OK):
        return os.path.join(locks, f"{digest}.lock")
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}{LOCK_SUFFIX}")


@contextlib.contextmanager
def folder_transaction(dst: str | os.PathLike, keep_old: Callable[[str], bool] | None = None,
                       refuse_non_empty: bool = False):
    """Yield a fresh temporary folder beside `dst`; when the block succeeds it replaces `dst` whole. A `dst`
    that is a symlink names its target: the target folder is replaced, the link kept.

    keep_old: entries of the old `dst` for which it returns True are carried into the new folder (hard
        links), e.g. a tokenizer saved beside the model; None carries nothing over.
    refuse_non_empty: raise CheckpointError if `dst` exists and is not empty (checked under the lock).

    On any failure the temporary folder is removed and `dst` is left as it was.
    """
    dst = os.path.realpath(os.path.abspath(os.fspath(dst)))  # a link to a folder: that folder is written
    parent, name = os.path.split(dst)
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{dst} is a file, not a folder; pass a folder to write the model into")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise _write_error(parent, e) from None
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path(dst), mode=default_mode())
    try:
        lock.acquire()
    except OSError as e:
        raise _write_error(parent, e) from None
    except Timeout as e:  # pragma: no cover - no timeout is set
        raise CheckpointError(f"another process is writing {dst}") from e
    # a mount point (a container's volume, a mounted disk) cannot be renamed or replaced: its new entries are
    # written into a temporary folder inside it, then moved in one by one
    in_place = os.path.isdir(dst) and os.path.ismount(dst)
    work = dst if in_place else parent
    try:
        _restore_interrupted_swap(parent, name)
        remove_stale_temps(work, name)
        if refuse_non_empty and os.path.isdir(dst) and holds_files(dst):
            raise CheckpointError(f"{dst} exists and is not empty; pass --force (force=True) to replace it")
        try:
            tmp = tempfile.mkdtemp(prefix=_temp_prefix(name), dir=work)
        except OSError as e:
            raise _write_error(work, e) from None
        try:
            yield tmp
        except OSError as e:
            _remove(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not e.filename:  # a write that names no file
                raise _write_error(dst, e) from None
            raise
        except BaseException:
            _remove(tmp)
            raise
        try:
            if in_place:
                _move_in(tmp, dst, keep_old)
            else:
                if keep_old is not None and os.path.isdir(dst):
                    _carry_over(dst, tmp, keep_old)
                os.chmod(tmp, default_mode(directory=True))
                _swap_in(tmp, dst)
        except OSError as e:
            _remove(tmp)
            raise _write_error(dst, e) from None
    finally:
        lock.release()


def holds_files(folder: str) -> bool:
    """Whether a folder has entries of its own: a mount point's lost+found (the file system's) is none."""
    return bool(set(os.listdir(folder)) - ({"lost+found"} if os.path.ismount(folder) else set()))


def _move_in(new: str, dst: str, keep: Callable[[str], bool] | None) -> None:
    """Make the folder `dst` hold what its subfolder `new` holds (each entry renamed in, atomically one by one);
    the old entries go, except those `keep` accepts that `new` lacks."""
    name = os.path.basename(dst)
    ours = {os.path.basename(new)}
    incoming = set(os.listdir(new))
    trash = tempfile.mkdtemp(prefix=_temp_prefix(name), dir=dst)
    ours.add(os.path.basename(trash))
    for entry in os.listdir(dst):
        if entry in ours or _temp_owner(entry) is not None or entry == "lost+found":  # the file system's own
            continue
        if entry in incoming or keep is None or not keep(entry):
            os.rename(os.path.join(dst, entry), os.path.join(trash, entry))
    for entry in incoming:
        os.rename(os.path.join(new, entry), os.path.join(dst, entry))
    os.rmdir(new)
    _remove(trash)
