"""`python -m tlcli`."""

from tlcli.cli.app import run

run()
