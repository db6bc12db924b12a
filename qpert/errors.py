"""Errors that mean "the input is wrong", shown to CLI users as one clear line."""


class QPertError(Exception):
    """Base of the errors a user can fix (bad input, a busy or damaged index): the CLI prints one
    ``error: ...`` line and exits 2 instead of a traceback."""


class UnsupportedModelError(QPertError, TypeError):
    """The model has no cross-attention family that Q-Pert knows."""


class IndexBusyError(QPertError, OSError):
    """Another process is updating the same photo index, or holds it locked for too long."""


class IndexDamagedError(QPertError, ValueError):
    """An index folder whose files cannot be read back (a damaged ``index.json`` or catalog)."""
