"""Errors the user must act on. Their message is one line: the file or value, what is wrong, what to do."""


class InputError(ValueError):
    """Bad input (a missing or corrupt file, inconsistent picks, an impossible size)."""


class Aborted(RuntimeError):
    """The caller asked the pipeline to stop (e.g. RELION_JOB_ABORT_NOW)."""
