"""Exceptions with messages that say what was expected."""


class StepflowError(ValueError):
    """Base class: bad input to stepflow_tl. Subclasses ValueError so callers that
    catch ValueError keep working."""


class ModelLoadError(StepflowError):
    """A model could not be loaded (missing path, offline, unsupported backend)."""


class UnsupportedModelError(StepflowError):
    """The model lacks something the method needs (tokenizer, editable attention)."""


class TraceError(StepflowError):
    """A trace cannot be segmented or does not fit the model."""
