"""The typer app and the one place where bad input becomes a clear line and exit code 2."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import typer

from memplan.errors import MemplanError

app = typer.Typer(
    name="memplan",
    help="Plan, measure and prove the accelerator memory of a training job before you launch it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from memplan import __version__

        typer.echo(f"memplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True,
        help="Print memplan's version and exit.")) -> None:
    pass


def command(name: str | None = None, **kw: Any) -> Callable:
    """Register a command whose MemplanError becomes one red line on stderr and exit 2."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except MemplanError as exc:
                if os.environ.get("MEMPLAN_DEBUG"):
                    raise
                from memplan.report import error_line

                error_line(str(exc))
                raise typer.Exit(2) from None
        return app.command(name, **kw)(run)
    return wrap


def main() -> None:
    """Entry point of the ``memplan`` script and ``python -m memplan``."""
    import sys

    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show '·' gets '?', not a
        if hasattr(stream, "reconfigure"):   # UnicodeEncodeError (PYTHONIOENCODING=ascii...)
            stream.reconfigure(errors="replace")
    load_commands()
    app(prog_name="memplan")


def load_commands() -> typer.Typer:
    """Import every command module (for tests using CliRunner) and return the app."""
    from memplan.cli import (  # noqa: F401
        advise,
        catalog,
        estimate,
        fits,
        plot,
        profile,
        scale,
        serve,
        validate,
    )

    return app
