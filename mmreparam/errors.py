"""mmreparam's exception types (the ground floor: every layer may raise them)."""


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read: truncated, not a checkpoint, or unexpected content."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for code outside the allow-list; it was not loaded."""


__all__ = ['CheckpointError', 'UnsafeCheckpointError']
