from __future__ import annotations

import json
import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ormbridge import status

__all__ = [
    "MAX_WORKER_TIMEOUT",
    "Command",
]

MAX_WORKER_TIMEOUT = 60.0


class Command(BaseCommand):
    help = (
        "Show ormbridge's pipeline: pending invalidations, the change log of every database, "
        "resync jobs, and whether Redis, the broker and a worker consuming ORMBRIDGE['QUEUE'] "
        "answer. Exits non-zero, naming the problem and its fix, when no worker consumes the "
        "queue, change-log rows failed, the oldest undelivered one or the oldest delivery in "
        "flight is older than STATUS_MAX_PENDING_AGE, a database holding registered models "
        "has no change log, or a worker refused a task message within "
        "STATUS_REFUSAL_WINDOW, so it can serve as a health check. "
        "Example: manage.py ormbridge_status --json"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="Print one JSON document (see docs/status.schema.json).",
        )
        parser.add_argument(
            "--worker-timeout",
            metavar="SECONDS",
            default="1",
            help="How long to wait for the workers to say which queues they consume "
            f"(default 1, at most {MAX_WORKER_TIMEOUT:g}): longer for a solo-pool worker "
            "busy with a long task, which answers only between tasks.",
        )

    def handle(self, *args: Any, as_json: bool, worker_timeout: str, **options: Any) -> None:
        report = status.collect(worker_timeout=_seconds_option(worker_timeout))
        if as_json:
            self.stdout.write(_dumps(report))
        else:
            self._print(report)
        if not report["healthy"]:
            raise CommandError("unhealthy: " + "; ".join(report["problems"]))

    def _print(self, report: dict[str, Any]) -> None:
        out, style = self.stdout, self.style
        for name, service in report["services"].items():
            state = style.SUCCESS("ok") if service["ok"] else style.ERROR("DOWN")
            detail = service["error"] or ", ".join(service.get("names") or [])
            out.write(f"{name:<8} {state} {detail}".rstrip())
        workers = report["services"]["workers"]
        for worker, queues in workers["queues"].items():
            out.write(f"         {worker} consumes {', '.join(queues) or 'nothing'}")
        self._print_refusals(report)
        delivery = report["delivery"]
        out.write(
            f"backlog  {delivery['backlog']:,} rows; oldest pending "
            f"{_seconds(delivery['oldest_pending_age'])}; oldest in flight "
            f"{_seconds(delivery['oldest_in_flight_age'])}"
        )
        out.write("")
        out.write(f"{'database':<24} {'log p/c/f':<16} {'oldest':>9} {'in flight':>10}")
        for alias, database in report["databases"].items():
            if database["log"]:
                log = database["change_log"]
                counts = f"{log['pending']}/{log['claimed']}/{log['failed']}"
            else:
                counts = "-"
            line = (
                f"{alias:<24} {counts:<16} {_seconds(database['oldest_undelivered_age']):>9} "
                f"{_seconds(database['oldest_in_flight_age']):>10}"
            )
            if database["error"]:
                line += f"  {style.ERROR(database['error'])}"
            out.write(line)
        out.write("")
        out.write(f"{'model':<24} {'triggers':<10} {'log p/c/f':<16} {'oldest':>9}  last delivery")
        for model in report["models"]:
            log = model["change_log"]
            counts = f"{log['pending']}/{log['claimed']}/{log['failed']}"
            age = model["oldest_undelivered_age"]
            triggers = model["triggers"] or "-"
            out.write(
                f"{model['model']:<24} {triggers:<10} {counts:<16} "
                f"{'-' if age is None else f'{age:,.0f} s':>9}  "
                f"{status.ago(model['last_delivery'])}"
            )
        out.write("")
        out.write(
            f"{'model':<24} {'hits':>10} {'misses':>10} {'stores':>10} {'uncached':>10} "
            f"{'invalidations':>14}"
        )
        for model in report["models"]:
            c = model["cache"]
            out.write(
                f"{model['model']:<24} {c['hits']:>10,} {c['misses']:>10,} {c['stores']:>10,} "
                f"{c['uncached']:>10,} {c['invalidations']:>14,}"
            )
            if c["uncached_by_reason"]:
                reasons = ", ".join(f"{k} {v:,}" for k, v in c["uncached_by_reason"].items())
                out.write(f"{'':<24} uncached: {reasons}")
        if report["jobs"]:
            out.write("")
            out.write("resync jobs:")
        for job in report["jobs"]:
            share = job["rows_done"] / job["rows_total"] if job["rows_total"] else 1
            out.write(
                f"  {job['id']:>5}  {job['state']:<11} {', '.join(job['models'])}  "
                f"{job['rows_done']:,} / {job['rows_total']:,} rows ({share:.0%})  {job['mode']}"
            )
        out.write("")
        out.write(style.SUCCESS("healthy") if report["healthy"] else style.ERROR("unhealthy"))

    def _print_refusals(self, report: dict[str, Any]) -> None:
        """Task messages the workers refused: recently (then unhealthy), and since Redis
        started; the reason of the newest recent one."""
        out, style = self.stdout, self.style
        recent, total = report["recent_refusals"], report["refused_tasks"]
        if recent is None:
            out.write("refused  unknown (Redis does not answer)")
            return
        since = ", ".join(f"{task} {n:,}" for task, n in total.items())
        since = f" ({since} since Redis started)" if since else ""
        if not recent["count"]:
            out.write(f"refused  none in the last {recent['window']:g} s{since}")
            return
        now = ", ".join(f"{task}: {n:,}" for task, n in recent["by_task"].items())
        out.write(style.ERROR(f"refused  {now} in the last {recent['window']:g} s") + since)
        last = recent["last"][0]
        out.write(
            f"         last {last['age']:,.0f} s ago: {last['task']}[{last['id']}]: "
            f"{last['reason']}"
        )


def _seconds_option(value: str) -> float:
    """``--worker-timeout``: seconds, more than 0 and at most ``MAX_WORKER_TIMEOUT``."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_WORKER_TIMEOUT:  # nan fails too
        raise CommandError(
            f"--worker-timeout takes seconds, more than 0 and at most {MAX_WORKER_TIMEOUT:g} "
            f"(e.g. --worker-timeout 5), not {value!r}."
        )
    return seconds


def _seconds(age: float | None) -> str:
    return "-" if age is None else f"{age:,.0f} s"


def _dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
