from __future__ import annotations

import signal
import threading
import time
from argparse import RawDescriptionHelpFormatter
from typing import Any, NoReturn

from django.core.management.base import (
    BaseCommand,
    CommandError,
    CommandParser,
    DjangoHelpFormatter,
)
from tqdm import tqdm

from ormbridge import resync

__all__ = [
    "EXAMPLES",
    "Command",
]

EXAMPLES = """
examples:
  manage.py ormbridge_resync shop.Product
  manage.py ormbridge_resync shop.Product --filter category__name=books --exclude stock=0
  manage.py ormbridge_resync --all --mode invalidate --sync
  manage.py ormbridge_resync shop.Product --dry-run
  manage.py ormbridge_resync --resume 12 --wait
"""


class Command(BaseCommand):
    help = (
        "Replay post_save for (or invalidate) every selected row of registered models, in "
        "resumable chunks: after data changed behind ormbridge's back."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = _HelpFormatter
        parser.epilog = EXAMPLES
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "args",
            nargs="*",
            metavar="app_label.Model",
            help="Models to resync, e.g. shop.Product.",
        )
        parser.add_argument("--all", action="store_true", help="Resync every registered model.")
        parser.add_argument(
            "--filter",
            action="append",
            default=[],
            metavar="FIELD__LOOKUP=VALUE",
            help="Only rows matching this lookup, e.g. --filter price__gte=10. Repeatable.",
        )
        parser.add_argument(
            "--exclude",
            action="append",
            default=[],
            metavar="FIELD__LOOKUP=VALUE",
            help="Leave out rows matching this lookup, e.g. --exclude stock=0. Repeatable.",
        )
        parser.add_argument(
            "--chunk-size",
            metavar="N",
            default=str(resync.DEFAULT_CHUNK),
            help=f"Rows per chunk (default {resync.DEFAULT_CHUNK}), e.g. --chunk-size 20000.",
        )
        parser.add_argument(
            "--mode",
            default="replay",
            help="replay (default): send post_save per row and invalidate; "
            "invalidate: only invalidate caches and broadcast. E.g. --mode invalidate.",
        )
        parser.add_argument(
            "--sync",
            action="store_true",
            help="Do the work in this process (no worker needed), e.g. --sync.",
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help="Follow the job on the workers until it is done (Ctrl-C, once every chunk is "
            "handed out, stops watching, not the job).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print how many rows and chunks a run would touch; change nothing.",
        )
        parser.add_argument(
            "--no-progress", action="store_true", help="Print no progress bar or progress lines."
        )
        parser.add_argument(
            "--resume",
            metavar="JOB_ID",
            help="Continue an interrupted job, e.g. --resume 12 (finished chunks are not redone).",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Start even though another job is running on the same models.",
        )

    def handle(
        self,
        *labels: str,
        all: bool,
        filter: list[str],
        exclude: list[str],
        chunk_size: str,
        mode: str,
        sync: bool,
        wait: bool,
        dry_run: bool,
        no_progress: bool,
        resume: str | None,
        force: bool,
        **options: Any,
    ) -> None:
        try:
            if resume is not None:
                if labels or all or filter or exclude or dry_run:
                    raise resync.ResyncError("--resume takes no models, filters or --dry-run.")
                job = resync.get_job(_whole(resume, "--resume"))
            else:
                selection = resync.select(
                    list(labels), all_models=all, filters=filter, excludes=exclude
                )
                size = _whole(chunk_size, "--chunk-size")
                if mode not in ("replay", "invalidate"):
                    raise resync.ResyncError(f"--mode must be replay or invalidate, not {mode!r}.")
                if dry_run:
                    self._dry_run(selection, size)
                    return
                job = resync.start(selection, mode=mode, chunk_size=size, sync=sync, force=force)
        except resync.ResyncError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"resync job {job.pk}: {job.rows_total:,} rows of {', '.join(job.labels)}, "
            f"chunks of {job.chunk_size:,}, mode {job.mode}, "
            + ("in this process" if sync else "on the workers")
        )
        self._run(job, sync=sync, wait=wait, progress=not no_progress)

    def _run(self, job: Any, *, sync: bool, wait: bool, progress: bool) -> None:
        try:
            with _CtrlC() as ctrl_c:
                if sync:
                    with _Progress(self, job, "replayed", progress) as show:
                        resync.run(job, sync=True, on_progress=ctrl_c.checked(show))
                else:
                    resync.run(job, sync=False, on_progress=ctrl_c.checked(None))
                    if wait:
                        with _Progress(self, job, "done", progress) as show:
                            resync.wait(job, on_progress=ctrl_c.checked(show))
        except KeyboardInterrupt:
            raise _interrupted(job, sync) from None
        resync.refresh(job)
        if sync or wait:
            self.stdout.write(
                self.style.SUCCESS(f"resync job {job.pk} done: {resync.rows_done(job):,} rows.")
            )
        else:
            self.stdout.write(
                f"resync job {job.pk} handed to the workers ({job.rows_planned:,} rows); follow it "
                f"with manage.py ormbridge_status or --resume {job.pk} --wait."
            )

    def _dry_run(self, selection: resync.Selection, size: int) -> None:
        counts = resync.count(selection)
        for label, rows in counts.items():
            self.stdout.write(f"{label}: {rows:,} rows in {-(-rows // size):,} chunks of {size:,}")
        total = sum(counts.values())
        self.stdout.write(f"total: {total:,} rows (dry run: nothing changed)")


def _interrupted(job: Any, sync: bool) -> CommandError:
    """What Ctrl-C did: stop the job, unless the workers hold all of it (then stop watching).

    While this process writes chunks (or delivers them, ``--sync``), the job
    stops there and is marked interrupted. Once every chunk is handed to the
    workers, they finish the job whatever this process does: Ctrl-C only
    stops watching, and the job is left running.
    """
    resync.refresh(job)
    if not sync and job.planned:
        return CommandError(
            f"stopped watching resync job {job.pk}; the job goes on on the workers. "
            f"Follow it with manage.py ormbridge_status or --resume {job.pk} --wait."
        )
    resync.interrupt(job, "interrupted")
    done, total = resync.progress(job)
    where = (
        f"{done:,} / {total:,} rows done"
        if sync
        else "the workers still deliver the chunks handed out so far"
    )
    return CommandError(
        f"resync job {job.pk} stopped (interrupted; {where}); continue it with --resume {job.pk}."
    )


class _HelpFormatter(DjangoHelpFormatter, RawDescriptionHelpFormatter):
    """Django's option order, and the examples epilog kept as written."""


class _CtrlC:
    """Ctrl-C noted, then raised as ``KeyboardInterrupt`` at the next chunk or poll.

    Raised between chunks, never inside a database or Redis call, where it could
    be lost (in a ``__del__``) or leave a connection half used.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _press(self, signum: int, frame: Any) -> None:
        self.pressed = True

    def checked(self, show: resync.OnProgress | None) -> resync.OnProgress:
        """``show``, then ``KeyboardInterrupt`` if Ctrl-C was pressed meanwhile."""

        def on_progress(done: int, total: int) -> None:
            if show is not None:
                show(done, total)
            if self.pressed:
                raise KeyboardInterrupt

        return on_progress


class _Progress:
    """A tqdm bar on a terminal, a line every few seconds elsewhere, or nothing.

    On stderr (stdout keeps the job's result lines for scripts), in the normal
    style rather than the error style Django gives stderr. The figures are the
    job's own (:func:`resync.progress`), so a resumed job counts its earlier
    runs' rows once.
    """

    LINE_EVERY = 5.0

    def __init__(self, command: BaseCommand, job: Any, verb: str, enabled: bool) -> None:
        self.command, self.verb, self.enabled = command, verb, enabled
        self.done, self.total = resync.progress(job) if enabled else (0, 0)
        self.bar: tqdm[NoReturn] | None = None
        self.last_line = time.monotonic()

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        if self.command.stderr.isatty():
            self.bar = tqdm(
                total=self.total, initial=self.done, unit="row", unit_scale=True,
                file=_Stream(self.command), desc=self.verb,
            )  # fmt: skip
        return self.update

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        elif time.monotonic() - self.last_line >= self.LINE_EVERY:
            self.last_line = time.monotonic()
            self._line()

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()

    def _line(self) -> None:
        share = self.done / self.total if self.total else 1
        line = f"{self.done:,} / {self.total:,} rows {self.verb} ({share:.0%})"
        self.command.stderr.write(line, style_func=_unstyled)


class _Stream:
    """tqdm's file: the command's stderr, without the newline OutputWrapper adds."""

    def __init__(self, command: BaseCommand) -> None:
        self.command = command

    def write(self, text: str) -> None:
        self.command.stderr.write(text, style_func=_unstyled, ending="")

    def flush(self) -> None:
        self.command.stderr.flush()


def _unstyled(text: str) -> str:
    return text


def _whole(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise resync.ResyncError(f"{option} takes a whole number, not {text!r}.") from None
    if value < 1:
        raise resync.ResyncError(f"{option} must be 1 or more, not {value}.")
    return value
