"""Errors a user can cause. Each message says what happened and what to do next.

The CLI turns any VitError into one red line on stderr and exit status 1 (2 for an
OptionError, as Click does for the usage errors it finds itself); anything else is a bug and
keeps its traceback.
"""


class VitError(Exception):
    """Base class for user-facing errors."""


class ModelNotFoundError(VitError):
    """A --model reference that names nothing we can find."""


class CheckpointError(VitError):
    """A checkpoint that exists but cannot be read: corrupt, wrong keys, wrong shapes."""


class OfflineError(VitError):
    """A hub model that is not cached while the network is unavailable."""


class InputError(VitError):
    """Bad input paths or options."""


class OptionError(InputError):
    """An option value or combination that cannot work, found before any work starts: exit
    status 2, the status Click gives the usage errors it catches itself (`--top-k 0`)."""


class OutputError(VitError):
    """An output that cannot be written (disk full, read-only, file size limit); partial
    temporary files are removed before it is raised."""


class ImageDecodeError(VitError):
    """One image that cannot be decoded; batch jobs record it and go on."""


class DatasetError(VitError):
    """A training or evaluation folder with an unusable layout."""


class TrainingError(VitError):
    """Training stopped for a reason the user must act on (NaN loss, bad resume folder)."""
