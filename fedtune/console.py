"""Console output: progress bars and tables (rich), silent in quiet mode."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


@contextlib.contextmanager
def progress_bar(total: int, description: str, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield `update(completed)`; draws a bar unless `quiet`."""
    if quiet:
        yield lambda completed: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda completed: progress.update(task, completed=completed)


def print_table(title: str, rows: list[dict], quiet: bool = False) -> None:
    """Print dict rows as a table; floats get 4 significant decimals."""
    if quiet or not rows:
        return
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)


def say(message: str, quiet: bool = False) -> None:
    if not quiet:
        console.print(message)


def warn(message: str) -> None:
    """A warning the user must see, `--quiet` or not: one line on stderr (stdout may be data),
    printed as written (brackets in it, as in a tuning trial's label, are not markup)."""
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


class _Expected:
    """Drops Flower warnings about choices fedtune makes on purpose: the `run_simulation` entry
    point (deprecated in favour of `flwr run`, which `fedtune run` wraps in-process) and server-side
    evaluation only (`fraction_evaluate` 0)."""

    EXPECTED = ("DEPRECATED FEATURE", "This is a deprecated feature", "fraction_evaluate is set to 0.0")

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


def quiet_libraries() -> None:
    """Hide library chatter (load reports, per-step bars, Flower's INFO log); keep warnings.

    fedtune prints its own progress bar and round table; Flower's warnings, such as a
    dropped client reply, still show.
    """
    import logging
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.WARNING)
    if not any(isinstance(f, _Expected) for f in flwr.filters):
        flwr.addFilter(_Expected())
    warnings.filterwarnings("ignore", category=FutureWarning)
