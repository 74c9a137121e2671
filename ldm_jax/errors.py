"""The library's errors of faults during a run, in one module that imports nothing of the library:
the command line maps them to one line and an exit code (:mod:`ldm_jax.cli`) without importing
the training modules that raise them."""

__all__ = ["CheckpointSaveError", "CheckpointRestoreError", "TrainingDiverged", "WorkdirLocked"]


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the complete checkpoints before it are kept."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a directory could be restored."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite training steps: the run stopped without saving its diverged state."""


class WorkdirLocked(RuntimeError):
    """Another trainer holds the workdir."""
