"""One run of Django's own test packages: Django's ``runtests.py``, imported as a module.

Run by ``run.py`` in a subprocess, from the repository root::

    python -m tests.django_suite.wrapper --django-tests DIR --settings MODULE \
        --results FILE [--ormbridge] PACKAGE...

With ``--ormbridge``, ``django_celery_beat``, the helper app ``peerapp`` (which registers every
model of the packages) and ``ormbridge`` are added to ``runtests.ALWAYS_INSTALLED_APPS``, the
apps ``runtests`` installs besides the test packages. The outcome of every test goes to
``--results`` as JSON::

    {"outcomes": {id: outcome}, "details": {id: exception line}, "ran": n, "registered": [label]}

an outcome being one of pass, fail, error, skip, xfail, xpass.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import traceback
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORMBRIDGE_APPS = [
    "django_celery_beat",
    "tests.django_suite.peerapp.PeerAppConfig",  # before ormbridge: registers in its ready()
    "ormbridge",
]

OUTCOMES: dict[str, str] = {}
DETAILS: dict[str, str] = {}
BAD = {"fail", "error", "xpass"}


def _note(test: unittest.TestCase, outcome: str, err=None) -> None:
    test_id = test.id()
    if OUTCOMES.get(test_id) in BAD and outcome not in BAD:
        return  # a failed subtest makes its test fail
    OUTCOMES[test_id] = outcome
    if err is not None:  # the exception's first line; the log has the traceback
        summary = traceback.format_exception_only(err[0], err[1])[0].strip().splitlines()
        DETAILS[test_id] = summary[0][:300] if summary else err[0].__name__


class RecordingResult(unittest.TextTestResult):
    """Django's text result, noting each test's outcome by id."""

    def addSuccess(self, test):
        super().addSuccess(test)
        _note(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        _note(test, "fail", err)

    def addError(self, test, err):
        # A class or module fixture error comes as an _ErrorHolder whose id() is
        # "setUpClass (package.tests.SomeTests)": kept as such.
        super().addError(test, err)
        _note(test, "error", err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            _note(test, "fail" if issubclass(err[0], test.failureException) else "error", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        _note(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        _note(test, "xfail")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        _note(test, "xpass")


def recording_runner():
    from django.test.runner import DiscoverRunner

    class RecordingRunner(DiscoverRunner):
        def get_resultclass(self):
            return super().get_resultclass() or RecordingResult

    return RecordingRunner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--django-tests", required=True, help="the tests/ dir of Django's sdist")
    parser.add_argument("--settings", required=True, help="settings module")
    parser.add_argument("--results", required=True, help="JSON file to write the outcomes to")
    parser.add_argument("--ormbridge", action="store_true", help="install ormbridge, register")
    parser.add_argument("packages", nargs="+")
    args = parser.parse_args()

    # As if runtests.py were the script: its directory first on sys.path; this repository
    # after it, for the settings and the helper app.
    sys.path[:] = [args.django_tests, str(REPO), *(p for p in sys.path if p not in ("", "."))]
    # What runtests.py's __main__ block does before calling django_tests().
    tmpdir = tempfile.mkdtemp(prefix="django_")
    tempfile.tempdir = os.environ["TMPDIR"] = tmpdir
    atexit.register(shutil.rmtree, tmpdir, True)
    os.environ["DJANGO_SETTINGS_MODULE"] = args.settings
    os.environ["DJANGO_SUITE_PACKAGES"] = " ".join(args.packages)

    runtests = importlib.import_module("runtests")
    if args.ormbridge:
        # Extended in place: setup_collect_tests() assigns this very list to INSTALLED_APPS.
        runtests.ALWAYS_INSTALLED_APPS.extend(ORMBRIDGE_APPS)
    runner = recording_runner()
    runtests.get_runner = lambda settings, test_runner_class=None: runner

    options = {
        "verbosity": 2,
        "interactive": False,
        "failfast": False,
        "keepdb": False,
        "reverse": False,
        "test_labels": args.packages,
        "debug_sql": False,
        "parallel": 1,
        "tags": None,
        "exclude_tags": None,
        "test_name_patterns": None,
        "start_at": None,
        "start_after": None,
        "pdb": False,
        "buffer": False,
        "timing": False,
        "shuffle": False,
        "durations": None,
    }
    accepted = inspect.signature(runtests.django_tests).parameters
    runtests.django_tests(**{k: v for k, v in options.items() if k in accepted})

    peerapp = sys.modules.get("tests.django_suite.peerapp")
    report = {
        "outcomes": OUTCOMES,
        "details": DETAILS,
        "ran": len(OUTCOMES),
        "registered": peerapp.REGISTERED if peerapp else [],
    }
    Path(args.results).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
