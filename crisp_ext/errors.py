"""Errors the user must act on. Their message is one line: the file or value, what is wrong, what to do."""


class InputError(ValueError):
    """Bad input (a missing or corrupt file, inconsistent picks, an impossible size)."""


class Aborted(RuntimeError):
    """The caller asked the pipeline to stop (e.g. RELION_JOB_ABORT_NOW)."""


class RunFailed(RuntimeError):
    """The run could not finish for a reason outside the input (a lost Dask scheduler, workers that kept dying);
    the message is one line naming what failed."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
