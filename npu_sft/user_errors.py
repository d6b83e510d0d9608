"""Errors that are the user's to fix (a config key, a model id, a file's bytes, a token) end as one line.

`npu-sft` prints them as `npu-sft: error: ...`. Prefect's engine logs every failed task and flow run with its
traceback, which for a mistyped model id is forty lines of engine frames around the one line that matters:

    quiet_user_error_tracebacks()   # once per process, before a flow runs

keeps those records in the run's logs (Prefect's UI) without the traceback, and leaves them off the console,
where the run's final line (`npu-sft: error: ...`, or a worker's "Finished in state Failed(...)") says it once.
Errors worth retrying (a hub outage) and our own bugs keep their tracebacks.
"""

from __future__ import annotations

import logging
import re

from npu_sft.errors import BadInputError
# Prefect's run loggers send to its API (the UI's log view); everything reaches the console through the root logger.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_MARK = "npu_sft_user_error"
# How Prefect words a failed state's message: "Task run encountered an exception HubNotFoundError: ..."
_FAILED_STATE = re.compile(r"encountered an exception:? (?P<error>\w+):")


def is_user_error(error: BaseException | None) -> bool:
    """Bad input the user fixes in a config or on the hub; not an outage that a later retry may get past."""
    return isinstance(error, BadInputError) and not error.retryable


def user_error_names() -> set[str]:
    """The class names of every user error, as Prefect writes them into a failed state's message."""
    names: set[str] = set()
    pending: list[type[BadInputError]] = [BadInputError]
    while pending:
        cls = pending.pop()
        if not cls.retryable:
            names.add(cls.__name__)
        pending.extend(cls.__subclasses__())
    return names


class UserErrorTracebacks(logging.Filter):
    """Drops the traceback of a record logged for a user error.

    With `keep_record=False` (the console) drops the record itself, and each failed task's ERROR line
    "Finished in state Failed('... encountered an exception HubNotFoundError: ...')": the run's last line says it.
    """

    def __init__(self, *, keep_record: bool) -> None:
        super().__init__()
        self.keep_record = keep_record

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and is_user_error(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
            # The first handler strips the traceback that later handlers would judge by: they read this mark.
            setattr(record, _MARK, True)
        if getattr(record, _MARK, False):
            return self.keep_record
        if self.keep_record or record.levelno < logging.ERROR:
            return True
        failed = _FAILED_STATE.search(record.getMessage())
        return not (failed and failed["error"] in user_error_names())


def quiet_user_error_tracebacks() -> None:
    """Install the filters on the handlers Prefect configured (idempotent)."""
    targets = [(logging.getLogger(name), True) for name in RUN_LOGGERS] + [(logging.getLogger(), False)]
    for logger, keep_record in targets:
        for handler in logger.handlers:
            if not any(isinstance(existing, UserErrorTracebacks) for existing in handler.filters):
                handler.addFilter(UserErrorTracebacks(keep_record=keep_record))
