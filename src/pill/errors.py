"""Exceptions that reach the user: each message names the file, field or sample at fault."""


class PillError(Exception):
    """Base class for every error pill raises on purpose."""


class ConfigError(PillError, ValueError):
    """A config field is unknown or has a bad value; the message names the field."""


class DataError(PillError, ValueError):
    """An input file or sample is malformed; the message names the file and the sample."""


class UnsupportedModelError(PillError, TypeError):
    """The model's architecture is not one pill knows how to plug into."""


class CheckpointError(PillError, ValueError):
    """A checkpoint is missing, corrupt or belongs to another base model."""
