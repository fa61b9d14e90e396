"""Exceptions that carry a message meant for the user: what was expected, what came instead."""


class CqdError(Exception):
    """Base class; the CLI prints these without a traceback and exits with status 2."""


class ConfigError(CqdError):
    """A config key is unknown, of the wrong type, or points at something missing."""


class WeightsError(CqdError):
    """A checkpoint directory is unreadable or does not match the base model."""


class StateError(CqdError):
    """The run directory or state.h5 cannot be used as asked."""


class TaskError(CqdError):
    """A task's data or settings are unusable."""


class BackendUnavailable(CqdError):
    """An evaluation back-end (sandbox, database server, container engine) cannot be reached."""


class StorageError(CqdError):
    """A file the command must write (or read) cannot be: a read-only or full disk, a path under a
    file, no permission. Made from the OSError by `storage_error`, which names the path."""


class MissingDependency(CqdError):
    """An optional package is needed for this feature; the message names the pip extra."""


def require(module: str, *, extra: str, feature: str):
    """Import an optional module, or raise MissingDependency naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{feature} needs the Python package '{module.split('.')[0]}', which is not installed "
            f"({exc}). Install it with: pip install 'cqd_mpi[{extra}]'"
        ) from exc


_STORAGE_HINTS = {
    "ENOSPC": "the disk is full: free space (or point the output elsewhere) and rerun; a run resumes "
              "from its last checkpoint",
    "EDQUOT": "the disk quota is exceeded: free space and rerun; a run resumes from its last checkpoint",
    "EROFS": "the file system is read-only: point the output at a writable place",
    "EACCES": "no permission: point the output at a place you may write",
    "EPERM": "not permitted: point the output at a place you may write",
    "ENOTDIR": "a part of the path is a file, not a directory",
    "EISDIR": "a directory is where a file was expected",
    "EEXIST": "a file is where a directory was to be made",
    "ENOENT": "a part of the path does not exist or cannot hold new files",
    "EFBIG": "the file is larger than the file system allows",
    "ENAMETOOLONG": "the path is too long",
    "ELOOP": "the path loops through symbolic links",
}


def storage_error(exc: BaseException, *, stdout: bool = False) -> StorageError | None:
    """The one-line error for an OSError of the file system (read-only, full, not a directory, no
    permission), or None for any other exception, which keeps its traceback.

    h5py reports the errno inside its message rather than in `errno`; both are read. `stdout`:
    the failed file was the standard output (an OSError from writing it names no file)."""
    import errno as errnos
    import os
    import re

    if not isinstance(exc, OSError) or isinstance(exc, (ConnectionError, TimeoutError)):
        return None
    code = exc.errno
    if code is None:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    name = errnos.errorcode.get(code, "") if code is not None else ""
    if name not in _STORAGE_HINTS:
        return None
    path = exc.filename
    if path is None:
        found = re.search(r"name = '([^']*)'", str(exc))
        path = found.group(1) if found else "the standard output" if stdout else "a file"
    target = f"{os.fspath(path)}" + (f" -> {os.fspath(exc.filename2)}" if exc.filename2 else "")
    hint = "redirect it elsewhere" if stdout and exc.filename is None else _STORAGE_HINTS[name]
    return StorageError(f"cannot use {target}: {os.strerror(code)} ({name}); {hint}")


def yaml_problem(exc: Exception) -> str:
    """A PyYAML error in one line: where (line and column, from 1) and what, for messages that
    must stay one line (PyYAML's own str() spans several, with a caret drawing)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")
