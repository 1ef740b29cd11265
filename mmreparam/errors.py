"""mmreparam's exception types (the ground floor: every layer may raise them)."""
import pickle


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read: truncated, not a checkpoint, or unexpected content."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint's pickle asks for code outside the allow-list; it was not loaded.

    Also a ``pickle.UnpicklingError``, what ``torch.load(weights_only=True)`` raises for it,
    so that code catching torch's error catches this one."""


class ExpansionError(ValueError):
    """A kernel and affine map cannot be expanded into a block's train-time state (the block
    is too narrow for it, or its norm layer cannot represent the affine map)."""


class ForeignFoldError(RuntimeError):
    """Another library's fold method (``switch_to_deploy()``, ``fuse()``, ...) raised, or a
    module was left unfolded; the message names the module paths and the foreign errors."""


class ScalesError(CheckpointError, ValueError):
    """RepOpt scales are unreadable, malformed, or do not fit the model (a
    :class:`CheckpointError`, and a ValueError as before)."""


class FoldFailed(RuntimeError):
    """The model's own fold raised (e.g. a foreign module's ``switch_to_deploy``)."""


class FoldMismatch(RuntimeError):
    """The fold error is above the accepted maximum (``tools/fold.py --max-rel-error``; the
    files are written all the same)."""


class NoUpstreamForm(ValueError):
    """A folded model has no upstream deploy form: some part has no upstream class that
    computes its function (the message names the part and the reason)."""


__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'ExpansionError', 'ForeignFoldError',
           'ScalesError', 'FoldFailed', 'FoldMismatch', 'NoUpstreamForm']
