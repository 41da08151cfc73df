"""Peer check: Django's own test packages, without and with ormbridge, must agree.

Runs the test packages of the installed Django's source distribution (``transactions``,
``delete``, ``delete_regress``, ``many_to_many``, ``signals``) twice per database backend:
plain, then with ormbridge installed and every model of those packages registered. A test
that passes plain but not with ormbridge is a regression, unless it is listed in
``expected_failures.txt``. Exits 1 on any regression, 0 otherwise. See docs/django-suite.md.

    .venv/bin/python tests/django_suite/run.py [--backend sqlite|postgresql|both] [--packages ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".cache" / "django-suite"
LOGS = CACHE / "logs"
ALLOW_LIST = HERE / "expected_failures.txt"

PACKAGES = ["transactions", "delete", "delete_regress", "many_to_many", "signals"]
SETTINGS = {
    "sqlite": "tests.django_suite.settings_sqlite",
    "postgresql": "tests.django_suite.settings_postgresql",
}
BAD = {"fail", "error", "xpass"}
MODES = ("baseline", "ormbridge")


def django_tests_dir() -> Path:
    """The ``tests/`` directory of the installed Django's sdist: downloaded and unpacked once."""
    version = importlib.metadata.version("django")
    unpacked = CACHE / f"django-{version}"
    if (unpacked / "tests" / "runtests.py").is_file():
        return unpacked / "tests"
    CACHE.mkdir(parents=True, exist_ok=True)
    wanted = {f"django-{version}.tar.gz"}
    sdists = [p for p in CACHE.iterdir() if p.name.lower() in wanted]
    if not sdists:
        print(f"downloading the source distribution of Django {version} into {CACHE} ...")
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"),
                *("--no-binary", ":all:", f"django=={version}", "-d", str(CACHE)),
            ],
            check=True,
        )
        sdists = [p for p in CACHE.iterdir() if p.name.lower() in wanted]
        if not sdists:
            sys.exit(f"pip download left no django-{version}.tar.gz in {CACHE}")
    # Unpacked beside the cache, then renamed: an interrupted unpack is never reused.
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="unpack-") as tmp:
        with tarfile.open(sdists[0]) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(tmp, filter="data")
            else:
                archive.extractall(tmp)  # Python < 3.11.4 has no filter
        roots = [p.parent.parent for p in Path(tmp).glob("*/tests/runtests.py")]
        if not roots:
            sys.exit(f"{sdists[0]} has no tests/runtests.py")
        shutil.rmtree(unpacked, ignore_errors=True)
        roots[0].rename(unpacked)
    return unpacked / "tests"


def clear_redis() -> None:
    """Delete the keys earlier runs left (ormbridge's and the cache's, all ``django-suite*``)."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        keys = list(client.scan_iter("django-suite*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    except Exception as exc:
        print(f"warning: Redis at {url} unusable ({exc}); ormbridge falls back to its change log")


@dataclass
class Run:
    backend: str
    mode: str  # baseline or ormbridge
    log: Path
    seconds: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)
    crashed: str = ""

    def count(self, *outcomes: str) -> int:
        return sum(1 for o in self.outcomes.values() if o in outcomes)

    def describe(self) -> str:
        if self.crashed:
            return f"CRASHED ({self.crashed}) after {self.seconds:.1f} s, log {rel(self.log)}"
        return (
            f"ran {len(self.outcomes)}: {self.count('pass')} passed, "
            f"{self.count(*BAD)} failed/errored, {self.count('skip')} skipped, "
            f"{self.count('xfail')} expected failures ({self.seconds:.1f} s)"
        )


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def run(backend: str, mode: str, packages: list[str], tests_dir: Path, timeout: float) -> Run:
    """One run of the packages in a subprocess (tests/django_suite/wrapper.py)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    result = Run(backend, mode, LOGS / f"{backend}-{mode}.log")
    results = LOGS / f"{backend}-{mode}.json"
    results.unlink(missing_ok=True)
    command = [
        *(sys.executable, "-m", "tests.django_suite.wrapper"),
        *("--django-tests", str(tests_dir), "--settings", SETTINGS[backend]),
        *("--results", str(results)),
        *(["--ormbridge"] if mode == "ormbridge" else []),
        *packages,
    ]
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    clear_redis()
    print(f"  {backend} {mode} ...", end="", flush=True)
    start = time.monotonic()
    with result.log.open("w") as log:
        try:
            proc = subprocess.run(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    result.seconds = time.monotonic() - start
    print(f" {result.seconds:.1f} s")
    if returncode is None:
        result.crashed = f"timed out after {timeout:.0f} s"
    elif returncode != 0 or not results.is_file():
        result.crashed = f"exit status {returncode}"
    else:
        data = json.loads(results.read_text())
        result.outcomes = data["outcomes"]
        result.details = data["details"]
        result.registered = data["registered"]
    if result.crashed:
        tail = result.log.read_text(errors="replace").rstrip().splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail))
    return result


def read_allow_list() -> dict[str, str]:
    """Test id -> reason, from ``expected_failures.txt`` (``id  # reason`` a line)."""
    allowed = {}
    if ALLOW_LIST.is_file():
        for line in ALLOW_LIST.read_text().splitlines():
            test_id, _, reason = line.partition("#")
            if test_id.strip():
                allowed[test_id.strip()] = reason.strip()
    return allowed


def compare(baseline: Run, peer: Run, allowed: dict[str, str]) -> int:
    """Print the backend's summary; return its number of problems (regressions, crashes)."""
    print(f"\n== {baseline.backend} ==")
    print(f"baseline:  {baseline.describe()}")
    print(f"ormbridge: {peer.describe()}")
    if baseline.crashed or peer.crashed:
        print("RESULT: the runs could not be compared")
        return 1
    print(f"models registered with ormbridge: {len(peer.registered)}")
    if not peer.registered:
        print("RESULT: no model was registered; the ormbridge run proves nothing")
        return 1
    failing = {test_id for test_id, outcome in peer.outcomes.items() if outcome in BAD}
    lost = {  # passed plain, not with ormbridge (failed, errored, skipped or not run)
        test_id: peer.outcomes.get(test_id, "not run")
        for test_id, outcome in baseline.outcomes.items()
        if outcome == "pass" and peer.outcomes.get(test_id) != "pass"
    }
    # Errors of class or module fixtures ("setUpClass (pkg.tests.Case)") absent from the baseline.
    lost.update({test_id: peer.outcomes[test_id] for test_id in failing - set(baseline.outcomes)})
    regressions = sorted(test_id for test_id in lost if test_id not in allowed)
    excused = sorted(test_id for test_id in lost if test_id in allowed)
    if excused:
        print(f"allowed by expected_failures.txt: {len(excused)}")
        for test_id in excused:
            print(f"  {test_id}  # {allowed[test_id]}")
    ran = {test_id.split(".")[0] for test_id in baseline.outcomes}
    for test_id in sorted(t for t in set(allowed) - failing if t.split(".")[0] in ran):
        print(f"warning: stale allow-list entry, does not fail on {baseline.backend}: {test_id}")
    print(f"regressions: {len(regressions)}")
    for test_id in regressions:
        detail = peer.details.get(test_id, "")
        print(f"  {test_id}: {lost[test_id]}" + (f": {detail}" if detail else ""))
    print(f"logs: {rel(baseline.log)}, {rel(peer.log)}")
    return len(regressions)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Run Django's own test packages without and with ormbridge; "
        "exit 1 when a test passing without ormbridge fails with it."
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--packages", nargs="+", default=PACKAGES, metavar="PACKAGE")
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds one run may take (default 900)"
    )
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]

    started = time.monotonic()
    tests_dir = django_tests_dir()
    print(f"Django {importlib.metadata.version('django')} tests: {rel(tests_dir)}")
    print(f"packages: {' '.join(args.packages)}")
    allowed = read_allow_list()
    problems = 0
    pairs = []
    for backend in backends:
        pairs.append([run(backend, mode, args.packages, tests_dir, args.timeout) for mode in MODES])
    for baseline, peer in pairs:
        problems += compare(baseline, peer, allowed)
    verdict = "FAILED" if problems else "passed"
    print(f"\npeer check {verdict} in {time.monotonic() - started:.0f} s", end="")
    print(f" ({problems} regression(s) or failed run(s))" if problems else "")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
