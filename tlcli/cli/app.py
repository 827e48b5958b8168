"""The tlcli command line: parse options, call one library function, print a table or JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from tlcli import __version__, interrupts
from tlcli.cli import audit, data, evaluate, extract, info, inspect, report, train, workflow
from tlcli.cli.console import keep_native_logs_off_terminal, out

app = typer.Typer(
    name="tlcli",
    help="Transfer learning from the shell: pre-trained Keras backbones, a small head, your photos.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"tlcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Transfer learning from the shell.

    Typical flow: extract features with a frozen ImageNet backbone, train a small head on them,
    evaluate, predict. Exit codes: 0 ok, 1 failure, 2 bad usage or input, 3 quality gate not met,
    130 interrupted.
    """


def run() -> None:
    """Console-script entry point: SIGTERM (cron timeouts, docker stop, kill) stops like Ctrl-C, exit 130;
    TensorFlow's C++ log lines never reach the terminal."""
    interrupts.install()
    keep_native_logs_off_terminal()
    app()


app.command("fetch-data")(data.fetch_data_cmd)
app.command("extract")(extract.extract_cmd)
app.command("train-head")(train.train_head_cmd)
app.command("cross-validate")(train.cross_validate_cmd)
app.command("audit")(audit.audit_cmd)
app.command("evaluate")(evaluate.evaluate_cmd)
app.command("predict")(evaluate.predict_cmd)
app.command("export")(evaluate.export_cmd)
app.command("ideal-image")(inspect.ideal_image_cmd)
app.command("features")(inspect.features_cmd)
app.command("adversarial")(inspect.adversarial_cmd)
app.command("run")(workflow.run_cmd)
app.command("runs")(workflow.runs_cmd)
app.command("report")(report.report_cmd)
app.command("backbones")(info.backbones_cmd)
app.command("devices")(info.devices_cmd)
