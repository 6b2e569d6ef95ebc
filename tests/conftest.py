"""Fixtures shared by the test folders."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands


@pytest.fixture(scope="session")
def cli():
    """Run a memplan command in this process: ``cli("estimate", "--model", ...)``."""
    app = load_commands()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))
