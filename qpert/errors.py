"""Errors that mean "what was given is wrong" (a file, an option, a model, a call).

The command line shows a :class:`QPertError` as one ``error:`` line and exits with 2; any other
exception is a bug and shows its traceback. Each class also derives from the built-in exception
it refines, so ``except ValueError`` and the like keep working.
"""


class QPertError(Exception):
    """Base of every user-facing error."""


class ConfigError(QPertError, ValueError):
    """A setting, argument or option outside what it accepts."""


class DataError(QPertError, ValueError):
    """A dataset, box or annotation file that does not have the expected form."""


class MissingFileError(QPertError, FileNotFoundError):
    """A file or folder that was named does not exist (or is not what it should be)."""


class UnsupportedModelError(QPertError, TypeError):
    """The model has no cross-attention family that Q-Pert knows."""


class UnloadableCheckpointError(QPertError, ValueError):
    """A model or detector file qpert will not load (a pickle holding more than tensors)."""


class UsageError(QPertError, RuntimeError):
    """An API call in the wrong state: a detached handle, nested ``objects`` blocks, a second attach."""


class MissingDependencyError(QPertError, ImportError):
    """An optional package a feature needs is not installed (the message says which extra to install)."""


class CacheError(QPertError, KeyError):
    """A cache file was damaged outside qpert's control; it has been removed, and a new run recomputes it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DiskFullError(QPertError, OSError):
    """The disk filled while qpert wrote a file; what was complete before is kept, and the command can be re-run."""


class IndexBusyError(QPertError, OSError):
    """Another process is updating the same photo index, or holds its catalog locked for too long."""


class IndexReadOnlyError(QPertError, PermissionError):
    """An index on read-only storage (a snapshot, another user's folder): it can be searched, not updated."""


class IndexDamagedError(QPertError, ValueError):
    """An index folder whose files cannot be read back (a damaged ``index.json`` or catalog)."""
