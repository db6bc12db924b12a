"""Errors that mean "the input is wrong", shown to CLI users as one clear line."""


class UnsupportedModelError(TypeError):
    """The model has no cross-attention family that Q-Pert knows."""


class IndexBusyError(OSError):
    """Another process is updating the same photo index."""
