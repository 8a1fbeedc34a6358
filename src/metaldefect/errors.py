"""The package's own exception types.

Every user error (bad file, unknown class, missing weights, bad config) raises one of
these with a message that names the file and the problem. The CLI prints the message
on one line and exits with status 2; any other exception reaching the user is a bug.
"""


class MetalDefectError(Exception):
    """Base class of every error a user can cause and fix."""


class DataError(MetalDefectError):
    """A dataset file is missing, unreadable or malformed."""


class ConfigError(MetalDefectError):
    """A config file or override is invalid."""


class WeightsError(MetalDefectError):
    """Pretrained weights cannot be found, converted or verified."""
