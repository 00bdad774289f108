"""``python -m billing.cli``."""

from billing.cli import main

main()
