"""User-facing errors. The CLI prints `hprune: error: <message>` for these and exits non-zero;
anything else is a bug and keeps its traceback."""


class HpruneError(Exception):
    """Base class of errors caused by the user's input or environment, not by a bug."""


class ModelNotFoundError(HpruneError):
    """A model name or path that does not resolve to a model."""


class CheckpointError(HpruneError):
    """A missing, truncated or corrupted weights file or artifact."""


class PlanError(HpruneError):
    """A prune plan that does not fit the model (unknown block index or component)."""


class OutputError(HpruneError):
    """An output path that cannot be written (under a file, a read-only or virtual file system, the
    current folder), or that holds something hprune did not write and will not replace."""


class OutputExistsError(OutputError):
    """An output path that already exists (pass --overwrite / overwrite=True to replace it)."""


class BackendUnavailableError(HpruneError):
    """A kernel backend that was forced but cannot run here."""


class ShapeError(HpruneError, ValueError):
    """A tensor argument with the wrong shape, dtype or layout for an op."""


class OptimizerConfigError(HpruneError, ValueError):
    """An optimizer setting out of range (learning rate, betas, eps, weight decay)."""


class ScaleError(OptimizerConfigError):
    """A per-parameter optimizer scale outside [0, 1], or a key that names no parameter of the optimizer."""
