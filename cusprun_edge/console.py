"""What a build shows on the terminal: one line per stage and a progress bar while one runs (the
libraries' own output goes to a log file: library_logs.py)."""

from __future__ import annotations

from .pipeline.stage import Progress


class RichProgress(Progress):
    """A transient rich bar per running stage (spinner, what it is doing, bar when the total is known,
    elapsed time) and one printed line per stage when it ends."""

    def __init__(self):
        self._bar = None
        self._task = None

    def begin(self, stage: str, own_progress: bool = False) -> None:
        import rich
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        # a stage with its own bar keeps it (one live display at a time); piped, a bar would only leave
        # blank lines behind
        if own_progress or not rich.get_console().is_terminal:
            return
        self._bar = Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=rich.get_console(), transient=True,
                        redirect_stdout=False, redirect_stderr=False)
        self._bar.start()
        self._task = self._bar.add_task(stage, total=None)

    def start(self, description: str, total: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description, total=total, completed=0)

    def update(self, description: str | None = None, advance: float = 0, total: float | None = None) -> None:
        if self._bar is None:
            return
        kwargs = {"advance": advance}
        if description is not None:
            kwargs["description"] = description
        if total is not None:
            kwargs["total"] = total
        self._bar.update(self._task, **kwargs)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar = self._task = None

    @staticmethod
    def line(text: str, markup: bool = False) -> None:
        import rich

        # soft_wrap: a path or the verdict stays one line; markup only where we wrote it (paths may hold [ ])
        rich.get_console().print(text, highlight=False, soft_wrap=True, markup=markup)
