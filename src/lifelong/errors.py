"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""


class LifelongError(Exception):
    """Base class for every error caused by user input (config, data, files)."""

    exit_code = 2


class ConfigError(LifelongError):
    """A config key or value is invalid."""


class DataNotFoundError(LifelongError):
    """A dataset or model asset is not installed; the message says how to install it."""


class DataFormatError(LifelongError):
    """A dataset exists but is malformed; the message names the offending file."""


class TrainingDivergedError(LifelongError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class LedgerError(LifelongError):
    """A ledger operation cannot proceed (no such ledger or change, a pending change, bad arguments)."""


class LedgerLockedError(LedgerError):
    """Another process holds the ledger's write lock."""


class LedgerCorruptError(LedgerError):
    """A ledger file is missing, truncated or does not match its recorded SHA-256."""


class UnsafeFileError(LifelongError):
    """A file would need unrestricted pickle loading (which can run arbitrary code) and the user did not opt in."""


class WorkerError(LifelongError):
    """A worker process of `lifelong run --jobs` failed; the message holds the end of its log and names the file."""

    exit_code = 1
