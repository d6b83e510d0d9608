"""Prefect's records of a failed task or flow run: no traceback for a user's error, and not twice on the console."""

from __future__ import annotations

import logging
import sys

import pytest

from npu_sft.download import HubNotFoundError, HubUnavailableError, IntegrityError
from npu_sft.settings import ConfigError
from npu_sft.user_errors import UserErrorTracebacks, is_user_error, quiet_user_error_tracebacks, user_error_names


def record_for(error: BaseException, message: str = "Task run failed with exception") -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, (), exc_info)


def test_bad_input_is_a_user_error_and_an_outage_or_a_bug_is_not() -> None:
    assert is_user_error(HubNotFoundError("no model")) and is_user_error(IntegrityError("sha256"))
    assert is_user_error(ConfigError("configs/x.yaml: model.id: ..."))
    assert not is_user_error(HubUnavailableError("hub down"))  # retryable: its traceback may matter
    assert not is_user_error(RuntimeError("a bug"))
    assert "HubNotFoundError" in user_error_names() and "HubUnavailableError" not in user_error_names()


def test_the_runs_log_keeps_the_record_without_its_traceback() -> None:
    record = record_for(HubNotFoundError("ModelScope has no model 'a/b'"))

    assert UserErrorTracebacks(keep_record=True).filter(record) is True
    assert record.exc_info is None and record.exc_text is None


def test_the_console_drops_it_even_after_the_api_handler_stripped_it() -> None:
    record = record_for(IntegrityError("model.safetensors: sha256 mismatch"))
    UserErrorTracebacks(keep_record=True).filter(record)  # Prefect's API handler comes first

    assert UserErrorTracebacks(keep_record=False).filter(record) is False


@pytest.mark.parametrize("error", [RuntimeError("a bug"), HubUnavailableError("hub down")])
def test_other_errors_keep_their_traceback_everywhere(error: BaseException) -> None:
    record = record_for(error)

    assert UserErrorTracebacks(keep_record=True).filter(record) is True
    assert UserErrorTracebacks(keep_record=False).filter(record) is True
    assert record.exc_info is not None


def test_the_console_drops_a_failed_state_line_that_repeats_a_user_error() -> None:
    console = UserErrorTracebacks(keep_record=False)

    def state_line(error: str) -> logging.LogRecord:
        message = f"Finished in state Failed('Task run encountered an exception {error}: ...')"
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, (), None)

    assert console.filter(state_line("HubNotFoundError")) is False
    assert console.filter(state_line("ZeroDivisionError")) is True
    assert UserErrorTracebacks(keep_record=True).filter(state_line("HubNotFoundError")) is True


def test_installing_twice_adds_one_filter_per_handler() -> None:
    handler = logging.StreamHandler()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        quiet_user_error_tracebacks()
        quiet_user_error_tracebacks()
        assert [type(f) for f in handler.filters] == [UserErrorTracebacks]
        assert handler.filters[0].keep_record is True  # type: ignore[union-attr]
    finally:
        logger.removeHandler(handler)
