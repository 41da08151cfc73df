"""Run a sample test module twice in a row in one process with Django's test runner.

``python -m tests.sample.twice <module>`` prints, as the last line, a JSON list
with one report per run: tests run, failures (errors included), and the keys
ormbridge's Redis holds afterwards.
"""

import json
import os
import sys

import django


def main(label: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.sample.settings")
    django.setup()
    from django.test.runner import DiscoverRunner

    from ormbridge import redis_store

    runner = DiscoverRunner(verbosity=1, interactive=False)
    runner.setup_test_environment()
    databases = runner.setup_databases()
    reports = []
    try:
        for _ in range(2):
            result = runner.run_suite(runner.build_suite([label]))
            reports.append(
                {
                    "tests": result.testsRun,
                    "failures": len(result.failures) + len(result.errors),
                    "keys": sorted(redis_store.get_redis().keys("*")),
                }
            )
    finally:
        runner.teardown_databases(databases)
        runner.teardown_test_environment()
    print(json.dumps(reports))


if __name__ == "__main__":
    main(sys.argv[1])
