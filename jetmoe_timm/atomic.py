""" Files and folders written so that a crash never leaves half of one: each is built under a temporary name
beside its destination and renamed into place (``write_atomic``, ``writing_folder`` + ``replace_folder``); an
existing folder is replaced only when it is the caller's own earlier output (``check_replaceable``), and what a
killed writer left is removed by the next one (``remove_dead_writers``).
"""
import errno
import glob
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional

__all__ = ['check_replaceable', 'remove_dead_writers', 'replace_folder', 'replace_problem', 'write_atomic',
           'writing_folder']

_ASIDE = '.old'  # the suffix of the folder an overwritten output is moved to until its replacement is in place


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting and restoring it, the portable way, leaves a
    moment in which files another thread creates get no mask)."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a file of ``path``'s name in a writer's folder beside it (``writing_folder``), then an
    atomic rename to ``path``: readers see the old file or the complete new one, never a partial one, and a failure
    leaves nothing behind. What a killed writer left there (safetensors writes a temporary file of its own next to
    the one it is given: up to a model's size) is removed by the next write of ``path``."""
    path = Path(path)
    folder = writing_folder(path)
    try:
        tmp = folder / path.name
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # as a file made by open(); the folder's mode does not carry over
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def replace_problem(dst: os.PathLike, owned: Callable[[Path], bool], what: str) -> Optional[str]:
    """Why replacing the existing folder ``dst`` could lose something the caller did not write, or None.

    Only an empty folder or one that ``owned`` recognises (an earlier output of the same kind, ``what``) may be
    replaced; never the current folder or one that holds it (``--out .``), nor a mount point."""
    dst = Path(dst)
    if not dst.is_dir():
        return None
    here = Path.cwd().resolve()
    if dst.resolve() == here or dst.resolve() in here.parents:
        return 'is the current folder or holds it'
    if os.path.ismount(dst):
        return 'is a mount point and cannot be replaced; give a folder inside it'
    if any(dst.iterdir()) and not owned(dst):
        names = sorted(p.name for p in dst.iterdir())
        listed = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
        return f'holds files that are not {what} ({listed}); only an earlier output folder is replaced'
    return None


def check_replaceable(dst: Path, overwrite: bool, owned: Callable[[Path], bool], what: str, flag: str,
                      overwrite_hint: str = 'overwrite=True (--overwrite)') -> None:
    """Raise FileExistsError, naming ``flag``, when writing the folder ``dst`` would fail or lose files: it exists
    with files and ``overwrite`` is off (an empty folder is filled), or replacing it could delete what is not ``what``
    (``replace_problem``)."""
    # made beforehand (mkdir -p): filled as a new one would be; not through a link, which the rename would replace
    empty = dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir())
    if dst.exists() and not overwrite and not empty:
        raise FileExistsError(f'{dst} already exists: choose another {flag} or pass {overwrite_hint}.')
    problem = replace_problem(dst, owned, what)
    if problem:
        raise FileExistsError(f'{dst} {problem}: choose another {flag}.')


def replace_folder(new: Path, dst: Path, owned: Callable[[Path], bool], overwrite: bool) -> None:
    """Rename the finished folder ``new`` to ``dst``. Without ``overwrite``, a ``dst`` that another process wrote
    since the early check is kept and this output refused. With it, an existing ``dst`` is moved aside first,
    checked again with ``owned`` (a file added since the early check puts it back), and deleted only once ``new``
    is in place; if anything fails, it is moved back."""
    if not overwrite:
        try:
            os.rename(new, dst)  # fails on a folder with files: no other writer's output is replaced
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f'{dst} was written by another process while this one ran: it is kept, and this '
                                  f'output discarded; write to another folder.') from None
        return
    if not dst.exists():
        os.replace(new, dst)
        return
    # named as this writer's temporary folders: a later writer deletes it if this process dies before it does
    aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f'{_writers_prefix(dst)}{os.getpid()}.', suffix=_ASIDE))
    try:
        os.replace(dst, aside / dst.name)
    except BaseException:
        if (aside / dst.name).exists() and not dst.exists():  # interrupted (Ctrl-C) just after the move itself
            os.replace(aside / dst.name, dst)
        aside.rmdir()
        raise
    try:
        old = aside / dst.name
        if any(old.iterdir()) and not owned(old):
            raise FileExistsError(f'{dst} changed while it was being replaced and now holds other files: left as '
                                  f'it was.')
        os.replace(new, dst)
    except BaseException:
        os.replace(aside / dst.name, dst)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _writers_prefix(dst: Path) -> str:
    """The name prefix, before the process id, of the temporary folders that processes on this host build ``dst``
    in, next to it: host and process name the writer, so that a later one can tell a killed writer's leftover
    from a live one's."""
    return f'.{dst.name}.{socket.gethostname()}-'


def remove_dead_writers(dst: Path, suffix: str = '') -> List[Path]:
    """Delete the folders that writers of ``dst`` on this host left when they were killed (SIGKILL, out of memory:
    a converted model's is gigabytes), the outputs they were replacing included; a live writer's are kept.
    Returns those deleted."""
    prefix = _writers_prefix(dst)  # then the pid and mkdtemp's 8 characters
    name = re.compile(rf'{re.escape(prefix)}(\d+)\.[a-z0-9_]{{8}}(?:{re.escape(suffix)}|{re.escape(_ASIDE)})')
    removed = []
    for old in dst.parent.glob(glob.escape(prefix) + '*'):
        found = name.fullmatch(old.name)
        if found and old.is_dir() and not old.is_symlink() and not _alive(int(found[1])):
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def writing_folder(dst: Path, suffix: str = '') -> Path:
    """A new temporary folder, beside ``dst``, to build ``dst`` in (``replace_folder`` renames it into place), with
    the permissions of a folder made by ``mkdir`` (mkdtemp's are 0700); killed writers' folders are deleted first
    (``remove_dead_writers``)."""
    remove_dead_writers(dst, suffix)
    folder = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f'{_writers_prefix(dst)}{os.getpid()}.', suffix=suffix))
    # a setgid bit inherited from the parent stays, as mkdir keeps it: subfolders go on taking the shared group
    os.chmod(folder, 0o777 & ~_umask() | folder.stat().st_mode & stat.S_ISGID)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
