"""Errors users see. Each names the file, row or key at fault and what is wrong with it."""


class TauflowError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ManifestError(TauflowError):
    """A run manifest (YAML) is missing, malformed or invalid."""


class DatasetError(TauflowError):
    """A dataset directory is incomplete, corrupt or of the wrong kind."""


class StageError(TauflowError):
    """A stage cannot run on its inputs (missing columns, NaN scores, ...)."""
