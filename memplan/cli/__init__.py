"""The memplan command line: a thin typer app, one small module per command, no arithmetic."""

from __future__ import annotations

from memplan.cli.app import app, main

__all__ = ["app", "main"]
