"""User and operator errors: the one exception type for bad input, and the one-line message the
CLI prints for it and for file-system errors (read-only, permission, no space)."""

from __future__ import annotations

import errno


class KDError(ValueError):
    """Bad input from the user: a config value, a checkpoint, a data path.

    The message names the problem and the fix; ``python -m kd_lightning`` prints it
    without a traceback and exits with status 1.
    """


def is_integer(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_integer(key: str, value: object, least: int = 1, fix: str = "") -> None:
    """Refuse ``value`` unless it is an integer ``>= least``: ``<key> must be an integer >= <least>, got ...``."""
    if not is_integer(value) or value < least:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise KDError(f"{key} must be {what}, got {value!r}{fix}.")


FILE_SYSTEM_FIXES = {
    errno.ENOSPC: "free space there, or point the run (hydra.run.dir=...) or the caches (paths.cache_dir=..., "
    "$KD_LIGHTNING_CACHE) at another file system; rerun with ckpt_path=last to continue",
    errno.EROFS: "that file system is read-only: point the run (hydra.run.dir=...) or the caches (paths.cache_dir=..., "
    "$KD_LIGHTNING_CACHE) at a writable directory",
    errno.EACCES: "you may not write there: fix its permissions, or point the run (hydra.run.dir=...) or the caches "
    "(paths.cache_dir=..., $KD_LIGHTNING_CACHE) at a directory of yours",
}
FILE_SYSTEM_FIXES[errno.EPERM] = FILE_SYSTEM_FIXES[errno.EACCES]


def one_line(error: BaseException) -> str:
    """The message of a user or operator error on one line: ``<what>, <where>; <the fix>`` for file-system errors."""
    if isinstance(error, OSError) and not isinstance(error, KDError):
        where = error.filename or "a file the run writes"
        fix = FILE_SYSTEM_FIXES.get(error.errno, "check that path, then rerun")
        return f"{error.strerror or type(error).__name__}, {where}; {fix}."
    return " ".join(str(error).split())
