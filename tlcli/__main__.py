"""`python -m tlcli`."""

from tlcli.cli import run

run()
