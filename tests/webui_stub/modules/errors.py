"""Stand-in for modules.errors: the host prints and carries on; the stand-in also records, so tests can assert."""

import logging
import traceback

log = logging.getLogger(__name__)
reported: list = []


def report(message: str, *, exc_info: bool = False) -> None:
    text = message + ("\n" + traceback.format_exc() if exc_info else "")
    reported.append(text)
    log.error(text)


def display(e: Exception, task, *, full_traceback=False):
    report(f"{task or 'error'}: {type(e).__name__}: {e}", exc_info=True)


def record_exception():
    reported.append(traceback.format_exc())
