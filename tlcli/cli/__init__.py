"""The command line: the Typer app, its options and consoles, one module per command group."""
