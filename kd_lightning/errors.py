"""User and operator errors: the one exception type for bad input, and the one-line message the
CLI prints for it and for file-system errors (read-only, permission, no space)."""

from __future__ import annotations

import errno


class KDError(ValueError):
    """Bad input from the user: a config value, a checkpoint, a data path.

    The message names the problem and the fix; ``python -m kd_lightning`` prints it
    without a traceback and exits with status 1.
    """


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
