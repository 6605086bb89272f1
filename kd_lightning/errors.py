"""The one exception type the CLI reports as a short message instead of a traceback."""


class KDError(ValueError):
    """Bad input from the user: a config value, a checkpoint, a data path.

    The message names the problem and the fix; ``python -m kd_lightning`` prints it
    without a traceback and exits with status 1.
    """
