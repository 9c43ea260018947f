"""How ``noxctl`` shows answers: one JSON document with ``--json``, else rich tables and short
lines for people; progress bars on stderr while a transfer or a backup goes on.

Text from the server (file names, log lines, program output) is never read as rich markup.
Progress bars appear only when stderr is a terminal and ``--json`` is off.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from noxsdk.cli._session import Session

__all__ = [
    "ProgressHook",
    "emit_json",
    "err_console",
    "kv_table",
    "note",
    "out_console",
    "print_table",
    "show",
    "size",
    "table",
    "transfer",
    "waiting",
    "when",
    "write_exact",
]

_PIPED_WIDTH = 1000  # columns of human output that is not going to a terminal
ProgressHook = Callable[[int, int | None], None]  # (bytes done, bytes in all or None)


def out_console() -> Console:
    """Human output on stdout: colour and width from the terminal; piped, plain and as wide as
    the content (up to ``COLUMNS`` when that is set), so that no cell is cut short."""
    console = Console(file=sys.stdout, markup=False, highlight=False, emoji=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = _PIPED_WIDTH
    return console


def show(renderable: RenderableType) -> None:
    """``renderable`` on stdout; piped, without the spaces that pad table cells at line ends."""
    console = out_console()
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    lines = captured.get().splitlines()
    sys.stdout.write("".join(line.rstrip() + "\n" for line in lines))
    sys.stdout.flush()


def err_console() -> Console:
    return Console(file=sys.stderr, markup=False, highlight=False, emoji=False)


def emit_json(data: BaseModel | dict[str, Any] | list[Any]) -> None:
    """The one JSON document of a command's answer, on stdout."""
    value = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    print(json.dumps(value, indent=2, ensure_ascii=False), flush=True)


def note(session: Session, text: str) -> None:
    """A remark for people on stderr (never with ``--json``)."""
    if not session.json:
        print(f"noxctl: {text}", file=sys.stderr, flush=True)


def write_exact(stream: Any, text: str) -> None:
    """``text`` on ``stream`` byte for byte as UTF-8, whatever the locale's encoding."""
    stream.flush()
    raw = getattr(stream, "buffer", None)
    if raw is None:
        stream.write(text)
    else:
        raw.write(text.encode("utf-8", "surrogateescape"))
        raw.flush()
    stream.flush()


def size(count: int | None) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    if count is None:
        return "-"
    if abs(count) < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def when(moment: datetime | str | None) -> str:
    """A time for people, in UTC to the second: ``2026-01-02 03:04:05``."""
    if moment is None:
        return "-"
    if isinstance(moment, datetime):
        parsed = moment
    else:
        try:
            parsed = datetime.fromisoformat(moment)
        except ValueError:
            return moment
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%d %H:%M:%S")


def table(*columns: str, title: str | None = None) -> Table:
    """A table whose columns are named ``columns`` (a name ending in ``>`` is right-aligned)."""
    grid = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for column in columns:
        right = column.endswith(">")
        grid.add_column(column.rstrip(">"), justify="right" if right else "left")
    return grid


def _cell(value: object) -> Text:
    if value is None:
        return Text("-")
    return value if isinstance(value, Text) else Text(str(value))


def print_table(grid: Table, rows: Iterable[Iterable[object]], *, empty: str) -> None:
    """``rows`` in ``grid`` on stdout, or the line ``empty`` when there are none."""
    count = 0
    for row in rows:
        grid.add_row(*(_cell(v) for v in row))
        count += 1
    show(grid if count else Text(empty, style="dim"))


def kv_table(pairs: Iterable[tuple[str, object]], *, title: str | None = None) -> None:
    """A two-column table of names and values on stdout."""
    grid = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in pairs:
        grid.add_row(Text(name), _cell(value))
    show(grid)


def _shown(session: Session) -> bool:
    return not session.json and sys.stderr.isatty()


@contextmanager
def transfer(session: Session, label: str) -> Iterator[ProgressHook | None]:
    """A progress bar of bytes on stderr for the SDK's ``progress=`` hook; ``None`` (no bar)
    with ``--json`` or when stderr is not a terminal."""
    if not _shown(session):
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def report(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield report


@contextmanager
def waiting(session: Session, label: str) -> Iterator[None]:
    """A spinner with the time elapsed on stderr while a long call (a backup) runs; nothing
    with ``--json`` or when stderr is not a terminal."""
    if not _shown(session):
        yield
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console(), transient=True) as bar:
        bar.add_task(label, total=None)
        yield
