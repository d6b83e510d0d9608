"""`npu-sft`: run the pipeline, or one stage of it, from a pipeline config.

    npu-sft demo                                   # the whole flow on the embedded tiny model (CPU)
    npu-sft run configs/qwen7b.yaml --set devices.train=4
    npu-sft plan configs/qwen7b.yaml               # validate and show what would run, starting nothing
    npu-sft evaluate configs/tiny_cpu.yaml --run RUN_ID   # score an earlier run's adapter again
    npu-sft evaluate configs/tiny_cpu.yaml --version champion   # the champion, as the registry holds it
    npu-sft prepare configs/tiny_cpu.yaml          # dataset preparation alone
    npu-sft devices                                # device inventory and current leases
    npu-sft doctor configs/qwen7b.yaml             # is this host ready for the config: devices, CANN, HCCL
    npu-sft compare sft-tiny                       # an experiment's runs, best first, the params that differ
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
DEBUG_VAR = "NPU_SFT_DEBUG"  # set (to anything): errors end with their traceback, as bugs do


def _use_project_prefect_home() -> None:
    # Prefect's telemetry heartbeat writes to the local server's SQLite database while its first migration runs, and
    # one of them then fails with "database is locked"; these hosts are offline anyway. Set the variable to opt in.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server needs ~15 s to start on an idle 2-core host; Prefect gives up after 20 s ("Timed out while
    # attempting to connect to ephemeral Prefect API server"), which a busy host exceeds.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Keeps the demo's Prefect database with the project's state unless the user chose a home or a server.
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_HOME"] = str(Path(".npu-sft/prefect").resolve())
    if "PREFECT_HOME" in os.environ:
        # Prefect's local server cannot create its SQLite database in a directory that does not exist yet.
        home = Path(os.environ["PREFECT_HOME"]).expanduser()
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            from npu_sft.errors import BadInputError

            raise BadInputError(f"PREFECT_HOME={home}: {err.strerror}; set it to a directory this user may create, "
                                "or unset it (runs then keep Prefect's state in .npu-sft/prefect)") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npu-sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="pipeline config (YAML), e.g. configs/qwen7b.yaml")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a pipeline key, e.g. --set devices.train=4 (repeatable)")
        return sub

    with_config("run", "run the sft flow on a pipeline config")
    demo = commands.add_parser("demo", help="run the sft flow on the embedded tiny model (configs/tiny_cpu.yaml)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    again = with_config("evaluate", "score an earlier run's adapter again with the current eval settings, into that run")
    target = again.add_mutually_exclusive_group(required=True)
    target.add_argument("--run", metavar="RUN_ID", help="the MLflow run of a pipeline run on this host")
    target.add_argument("--version", metavar="N",
                        help="a version of publish.registered_model (a number, latest, champion), scored from the registry's files")
    with_config("plan", "validate a config and print the engine config, devices and command, starting nothing")
    with_config("prepare", "run dataset preparation alone and print its statistics and rejects")
    doctor = commands.add_parser("doctor", help="check this host for what a config needs (devices, CANN, HCCL), "
                                 "one line per check with the fix")
    doctor.add_argument("config", nargs="?", help="pipeline config (YAML); without one: this host's devices")
    doctor.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    devices = commands.add_parser("devices", help="show the device inventory and current leases")
    devices.add_argument("--config", help="pipeline config whose `devices:` settings to use")
    compare = commands.add_parser("compare", help="an experiment's runs best first, with the params that differ")
    compare.add_argument("experiment", nargs="?", help="MLflow experiment (default: the config's mlflow.experiment)")
    compare.add_argument("--config", help="pipeline config whose MLflow store (and experiment) to read")
    compare.add_argument("--metric", help="order by this metric (default: eval/rouge_l, else eval_loss); loss-like "
                         "metrics rank lower first, scores higher first")
    compare.add_argument("--format", choices=("table", "csv", "json"), default="table")
    return parser


_warned: set[str] = set()


def _show_warning_once(message: Warning | str, *_: object, **__: object) -> None:
    """One line per warning, each said once: a source is validated by the config, the cache key and the task.

    (A "once" filter is not enough: every `warnings.catch_warnings()` in a library resets what it remembers.)
    """
    line = f"npu-sft: warning: {message}\n"
    if line not in _warned:
        _warned.add(line)
        sys.stderr.write(line)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.showwarning = _show_warning_once
    from npu_sft.errors import BadInputError, NpuSftError

    try:
        _use_project_prefect_home()
        from npu_sft.commands import run_command

        return run_command(args)
    except NpuSftError as err:
        if os.environ.get(DEBUG_VAR):
            raise
        # The flow's log (Prefect's UI, the console above) holds the details; this is the line that matters.
        print(f"npu-sft: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(err, BadInputError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("npu-sft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
