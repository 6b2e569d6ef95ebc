"""``python -m memplan``."""

from memplan.cli import main

main()
