"""The one exception type users see for bad input; the CLI prints its message and exits 2."""


class SparsetrainError(ValueError):
    """Bad input or an unrecoverable condition, with a message that says what to do about it."""
