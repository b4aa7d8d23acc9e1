"""The log handler's RepeatQuota: a flood is cut, different news is not."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator

import pytest

from guard.control.app import RepeatQuota, configure_logging


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RepeatQuota(every_s=0.3, distinct_max=3))
    logger = logging.getLogger("guard.test-quota")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_a_flood_of_one_line_is_cut_and_counted(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    for _ in range(1000):
        logger.error("method name %r is not UTF-8", b"\xff")
    logger.info("an info line always passes")
    time.sleep(0.35)
    logger.error("method name %r is not UTF-8", b"\xff")
    assert out.getvalue().splitlines() == [
        "ERROR method name b'\\xff' is not UTF-8",
        "INFO an info line always passes",
        "ERROR method name b'\\xff' is not UTF-8 (999 more like it in the last minute left out)",
    ]


def test_different_reload_failures_within_the_minute_are_each_shown(
    log: tuple[logging.Logger, io.StringIO],
) -> None:
    """A config fixed and broken again a few seconds later: the operator
    sees the second reason, not only the first."""
    logger, out = log
    for reason in ("field 'a'", "field 'a'", "field 'b'", "field 'c'", "field 'd'", "field 'b'"):
        logger.error("reload failed, keeping the old rules: %s", reason)
    assert out.getvalue().splitlines() == [
        "ERROR reload failed, keeping the old rules: field 'a'",
        "ERROR reload failed, keeping the old rules: field 'b'",
        "ERROR reload failed, keeping the old rules: field 'c'",
    ]
    time.sleep(0.35)
    logger.error("reload failed, keeping the old rules: %s", "field 'e'")
    assert out.getvalue().splitlines()[-1] == (
        "ERROR reload failed, keeping the old rules: field 'e' "
        "(3 more like it in the last minute left out)"
    )


def test_arguments_that_do_not_fit_do_not_break_the_filter(
    log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, _ = log
    quota = RepeatQuota()
    record = logger.makeRecord("guard.x", logging.ERROR, __file__, 1, "%d apples", ("x",), None)
    assert quota.filter(record) is True
    assert quota.filter(record) is False


def test_configure_logging_filters_only_the_handler_it_makes() -> None:
    """Found: it added the quota to every handler on the root logger, pytest's
    capture included, so in-process tests that ran `guard serve` made later
    tests' caplog drop their fifth different error from one place."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    already = logging.StreamHandler(io.StringIO())
    root.handlers = [already]
    try:
        configure_logging("info")  # basicConfig adds nothing: a handler is there
        assert not [f for f in already.filters if isinstance(f, RepeatQuota)]
        root.handlers = []
        configure_logging("info")
        (made,) = root.handlers
        assert [f for f in made.filters if isinstance(f, RepeatQuota)]
    finally:
        root.handlers, root.level = saved_handlers, saved_level


def test_grpcs_unsent_answers_share_one_quota_whatever_the_method() -> None:
    """Found (red team): the guard's rewrite of gRPC's ExecuteBatchError
    line put the method, which a client names, into the template the quota
    keys on: each new method name was a new line."""
    from guard.server.handler import _QuietClientNoise

    quota, quiet = RepeatQuota(every_s=60, distinct_max=3), _QuietClientNoise()
    passed = 0
    for i in range(500):
        record = logging.LogRecord(
            "grpc._cython.cygrpc", logging.ERROR, __file__, 1,
            f"ExecuteBatchError raised in core by servicer method [/x.Y/M{i}]", (), None,
        )  # fmt: skip
        passed += quiet.filter(record) and quota.filter(record)
    assert passed == 3
    assert record.getMessage().startswith("could not send the answer to /x.Y/M499")
