"""Exceptions whose messages name the problem and the fix; the CLI prints them without a traceback."""


class FsbenchError(Exception):
    """Base class for user-facing errors (bad protocol, missing data, corrupt manifest, ...)."""


class DataNotFoundError(FsbenchError):
    """A dataset's files are not where the loader looked."""


class ProtocolError(FsbenchError):
    """A protocol file or its values are invalid or impossible for the dataset."""


class ManifestError(FsbenchError):
    """A frozen manifest is corrupt or does not match its protocol or dataset."""


class InputDataError(FsbenchError):
    """Features or images are unusable (NaN, wrong shape, ...)."""
