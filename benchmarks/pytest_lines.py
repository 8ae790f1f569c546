"""A pytest plugin for the GPU suite: one JSON line per test, written (and flushed) as each test
starts and ends, so a run stopped at its time limit still says which tests passed, failed, and
which one was running; and a per-test timeout that ends a hung process (pytest's junit is
written only at the end of the run, so a stopped run leaves none).

    HPRUNE_TEST_LINES=out.jsonl HPRUNE_TEST_TIMEOUT=120 pytest -p benchmarks.pytest_lines ...

The timeout (faulthandler.dump_traceback_later(exit=True)) prints the stacks and exits the
process: the test's "start" line without an "end" names the one that hung."""
from __future__ import annotations

import faulthandler
import json
import os
import time

_file = None


def _write(rec: dict) -> None:
    global _file
    path = os.environ.get("HPRUNE_TEST_LINES")
    if not path:
        return
    if _file is None:
        _file = open(path, "a", buffering=1)
    _file.write(json.dumps(rec) + "\n")
    _file.flush()


def pytest_runtest_logstart(nodeid, location):
    _write({"event": "start", "test": nodeid, "t": round(time.time(), 3)})
    timeout = float(os.environ.get("HPRUNE_TEST_TIMEOUT", "0") or 0)
    if timeout > 0:
        faulthandler.dump_traceback_later(timeout, exit=True)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":  # a result, or a setup / teardown problem
        msg = str(report.longrepr)[-600:] if report.outcome == "failed" else ""
        _write({"event": "end", "test": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": round(report.duration, 3), "message": msg})


def pytest_runtest_logfinish(nodeid, location):
    faulthandler.cancel_dump_traceback_later()
