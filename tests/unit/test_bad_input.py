"""Broken inputs as users write them: `plan` and `run` each end with exit 2 and the same one line naming the file
and the key, without a traceback, an MLflow run, a lease or anything else started.

Each case is run in-process through `npu_sft.cli.main` (the CLI's own entry point); the LLaMA-Factory cases start the
real engine check once per config (`run` finds the verdict `plan` left).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from npu_sft.cli import main
from npu_sft.host_processes import descendants


@dataclass(frozen=True)
class Broken:
    expected: str  # in the error line; `{pipeline}`, `{lf}` and `{project}` are filled in
    pipeline: tuple[tuple[str, str], ...] = ()  # text replacements in the pipeline YAML
    lf: tuple[tuple[str, str], ...] = ()  # ... in the LLaMA-Factory YAML
    overrides: tuple[str, ...] = ()
    files: dict[str, bytes] = field(default_factory=dict)  # written into the project directory
    pipeline_bytes: bytes | None = None  # the pipeline file's whole content


PIPELINE_CASES = {
    "config not a mapping": Broken("{pipeline}: a pipeline config is a YAML mapping, got list", pipeline_bytes=b"- a\n"),
    "config not UTF-8": Broken("{pipeline}:1: not UTF-8 text (byte 0xe9); save it as UTF-8",
                               pipeline_bytes=b"name: caf\xe9\n"),
    "YAML syntax error": Broken("{pipeline}:", pipeline=(("name: tiny-cpu", "name: [tiny-cpu"),)),
    "unknown key": Broken("{pipeline}:38: serve.temprature: unknown key",
                          pipeline=(("  max_tokens: 32", "  max_tokens: 32\n  temprature: 0.5"),)),
    "wrong type": Broken("{pipeline}:25: devices.train: expected a device count", pipeline=(("  train: 2 ", "  train: many "),)),
    "device kind": Broken("{pipeline}:23: devices.kind: ", pipeline=(("kind: cpu", "kind: tpu"),)),
    "device id twice": Broken("devices.train: ", overrides=("devices.train=[0, 0]",)),
    "set without a value": Broken("--set 'devices.train': expected KEY=VALUE", overrides=("devices.train",)),
    "set into a scalar": Broken("--set name.first: 'name' is not a mapping", overrides=("name.first=x",)),
    "LLaMA-Factory file missing": Broken("LLaMA-Factory config (llamafactory.config) not found",
                                         overrides=("llamafactory.config=nope.yaml",)),
    "LLaMA-Factory YAML syntax": Broken("{lf}:", lf=(("stage: sft", "stage: [sft"),)),
    "dataset without a source": Broken("{pipeline}: data.datasets: no source for dataset(s) other",
                                       lf=(("dataset: identity,tiny_alpaca", "dataset: identity,other"),)),
    "unknown builtin dataset": Broken("data.datasets.1: dataset 'tiny_alpacca': no builtin dataset of that name",
                                      pipeline=(("name: tiny_alpaca", "name: tiny_alpacca"),)),
    "val_size out of range": Broken("{lf}:41: val_size: 1.5 is neither a share in [0, 1) nor a whole number of rows",
                                    lf=(("val_size: 0.1", "val_size: 1.5"),)),
    "val_size a word": Broken("{pipeline}: llamafactory.overrides.val_size: 'tenth' is neither a share",
                              overrides=("llamafactory.overrides.val_size=tenth",)),
    "cutoff_len zero": Broken("{lf}:21: cutoff_len: 0 is not a token count of 1 or more",
                              lf=(("cutoff_len: 128", "cutoff_len: 0"),)),
    "no held-out split": Broken("{lf}:41: val_size: 0 leaves no held-out rows", lf=(("val_size: 0.1", "val_size: 0"),)),
    "tracking URI scheme": Broken("mlflow.tracking_uri: ftp: is not a store MLflow tracks runs in",
                                  overrides=("mlflow.tracking_uri=ftp://host/runs",)),
    "engine python missing": Broken("engine.python: /opt/missing/bin/python does not exist",
                                    overrides=("engine.python=/opt/missing/bin/python",)),
    # No `engine:` in a project where `make setup` has not made .npu-sft/engine: the default is not there either.
    "engine python default missing": Broken(
        "{pipeline}: engine.python: {project}/.npu-sft/engine/bin/python does not exist or is not executable; run "
        "`make setup`", pipeline=(("\nengine:\n  python: ", "\n# python: "),)),
    "gain without a baseline": Broken("publish.gate.min_gain: needs the base model's scores",
                                      overrides=("eval.baseline=false", "publish.gate.min_gain=1")),
    "vllm on the CPU": Broken("serve.backend: vllm does not run on the CPU", overrides=("serve.backend=vllm",)),
    "hub model without an id": Broken("model", overrides=("model.source=modelscope",)),
    "hub endpoint with credentials": Broken(
        "model.endpoint: endpoint must not carry credentials",
        overrides=("model.source=modelscope", "model.id=qwen/Qwen1.5-7B", "model.endpoint=https://me:pw@hub.local"),
    ),
    "push repository not owner/name": Broken("publish.modelscope.repo_id: ",
                                             overrides=("publish.modelscope.repo_id=justaname",)),
    "registered model name unsearchable": Broken("publish.registered_model: holds both ' and \"",
                                                 overrides=("publish.registered_model=a'b\"c",)),
    "deepspeed file missing": Broken("{lf}: deepspeed: 'ds_z9' not found", lf=(("stage: sft", "stage: sft\ndeepspeed: ds_z9"),)),
}

MISSING_DATA_FILE = Broken(
    "{pipeline}:14: data.datasets.1.path: mine.json does not exist (relative to the current directory, {project})",
    pipeline=(("    - name: tiny_alpaca\n      source: builtin", "    - name: tiny_alpaca\n      path: mine.json"),),
)

ENGINE_CASES = {
    "learning rate a word": Broken("{lf}:35: learning_rate: 'fast' is not a number",
                                   lf=(("learning_rate: 0.005", "learning_rate: fast"),)),
    "learning rate quoted": Broken("{lf}:35: learning_rate: '5e-5' is quoted, so LLaMA-Factory would get text; write",
                                   lf=(("learning_rate: 0.005", "learning_rate: '5e-5'"),)),
    "flag quoted": Broken("{pipeline}: llamafactory.overrides.bf16: 'false' is quoted, so LLaMA-Factory would get",
                          overrides=("llamafactory.overrides.bf16='false'",)),
    "fine-tuning type unknown": Broken("{lf}:10: finetuning_type: 'qlora' is not one of lora, oft, freeze, full",
                                       lf=(("finetuning_type: lora", "finetuning_type: qlora"),)),
    "chat template misspelt": Broken("{lf}:20: template: 'qwne' is not a chat template of this LLaMA-Factory; did you",
                                     lf=(("template: qwen", "template: qwne"),)),
    "LoRA rank not whole": Broken("{pipeline}: llamafactory.overrides.lora_rank: 1.5 is not a whole number",
                                  overrides=("llamafactory.overrides.lora_rank=1.5",)),
    "flag neither true nor false": Broken("{pipeline}: llamafactory.overrides.bf16: 'maybe' is not true or false",
                                          overrides=("llamafactory.overrides.bf16=maybe",)),
    "unknown LLaMA-Factory key": Broken("{lf}: LLaMA-Factory refuses this config: ",
                                        lf=(("stage: sft", "stage: sft\nlerning_rate: 0.1"),)),
}


@pytest.fixture
def project(in_tmp_project: Path, repo: Path, engine_python: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the CLI replaces it; put it back after
    (in_tmp_project / "lf.yaml").write_text((repo / "configs/llamafactory/tiny_lora_sft.yaml").read_text())
    pipeline = (repo / "configs/tiny_cpu.yaml").read_text().replace(
        "config: llamafactory/tiny_lora_sft.yaml", f"config: {in_tmp_project / 'lf.yaml'}"
    )
    (in_tmp_project / "pipeline.yaml").write_text(pipeline + f"\nengine:\n  python: {engine_python}\n")
    return in_tmp_project


def break_project(project: Path, case: Broken) -> None:
    pipeline, lf = project / "pipeline.yaml", project / "lf.yaml"
    for path, replacements in ((pipeline, case.pipeline), (lf, case.lf)):
        text = path.read_text()
        for old, new in replacements:
            assert old in text, f"{old!r} not in {path.name}: the case no longer breaks anything"
            text = text.replace(old, new)
        path.write_text(text)
    if case.pipeline_bytes is not None:
        pipeline.write_bytes(case.pipeline_bytes)
    for name, content in case.files.items():
        (project / name).write_bytes(content)


def assert_both_refuse(project: Path, case: Broken, capsys: pytest.CaptureFixture[str]) -> None:
    expected = case.expected.format(pipeline=project / "pipeline.yaml", lf=project / "lf.yaml", project=project)
    sets = [arg for override in case.overrides for arg in ("--set", override)]
    leases = project / "leases"
    lines = {}
    for command in ("plan", "run"):
        code = main([command, str(project / "pipeline.yaml"), "--set", f"devices.state_dir={leases}", *sets])
        captured = capsys.readouterr()
        assert code == 2, f"{command}: exit {code}\n{captured.out[-2000:]}\n{captured.err[-2000:]}"
        errors = [line for line in captured.err.splitlines() if not line.startswith("npu-sft: warning:")]
        assert len(errors) == 1 and errors[0].startswith("npu-sft: error: "), f"{command}: {captured.err}"
        assert expected in errors[0], f"{command}: {errors[0]}"
        assert "Traceback" not in captured.out + captured.err
        lines[command] = errors[0]
    assert lines["plan"] == lines["run"]
    # Nothing started: no MLflow store, no run directory, no Prefect database, no lease.
    assert not (project / "mlruns").exists()
    assert not (project / ".npu-sft" / "runs").exists()
    assert not (project / ".prefect" / "prefect.db").exists()
    assert not leases.exists() or not any(leases.iterdir())


@pytest.mark.parametrize("case", PIPELINE_CASES.values(), ids=PIPELINE_CASES.keys())
def test_a_broken_pipeline_config_is_one_line_in_plan_and_run(
    project: Path, case: Broken, capsys: pytest.CaptureFixture[str]
) -> None:
    break_project(project, case)
    assert_both_refuse(project, case, capsys)


@pytest.mark.parametrize("case", ENGINE_CASES.values(), ids=ENGINE_CASES.keys())
def test_a_config_llamafactory_refuses_is_one_line_in_plan_and_run(
    project: Path, case: Broken, capsys: pytest.CaptureFixture[str]
) -> None:
    break_project(project, case)
    assert_both_refuse(project, case, capsys)


def test_a_missing_data_file_is_refused_by_run_and_a_warning_in_plan(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan may be made on a laptop for the host that has the data: it warns; `run` refuses, starting nothing."""
    break_project(project, MISSING_DATA_FILE)
    expected = MISSING_DATA_FILE.expected.format(pipeline=project / "pipeline.yaml", project=project)
    assert main(["plan", str(project / "pipeline.yaml")]) == 0
    assert f"warning: {expected}; `npu-sft run` here would refuse it" in " ".join(capsys.readouterr().out.split())
    assert main(["run", str(project / "pipeline.yaml")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"npu-sft: error: {expected}"]
    assert not (project / "mlruns").exists() and not (project / ".npu-sft" / "runs").exists()


ENVIRONMENT_CASES = {
    "PREFECT_HOME a file": ({"PREFECT_HOME": "{project}/afile"}, "PREFECT_HOME={project}/afile: File exists; set it"),
}


@pytest.mark.parametrize("case", ENVIRONMENT_CASES.values(), ids=ENVIRONMENT_CASES.keys())
def test_a_broken_environment_variable_is_one_line_in_plan_and_run(
    project: Path, case: tuple[dict[str, str], str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "afile").write_text("")
    variables, expected = case
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(project=project))
    assert_both_refuse(project, Broken(expected), capsys)


def test_compare_names_a_tracking_uri_from_the_environment_it_can_not_use(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://host/runs")
    assert main(["compare", "sft-tiny"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "npu-sft: error: MLFLOW_TRACKING_URI=ftp://host/runs: ftp: is not a store MLflow tracks runs in (file:, "
        "sqlite:, postgresql:, mysql:, mssql:, http:, https:, databricks: or a directory path)"]


def test_the_corpus_is_large_enough() -> None:
    assert len(PIPELINE_CASES) + len(ENGINE_CASES) + len(ENVIRONMENT_CASES) + 1 >= 30


def test_a_first_check_refusing_the_config_while_prefect_starts_is_one_line_and_stops_the_server(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` without a plan before it: the engine checks the config while Prefect's server starts; its refusal is the
    same one line, nothing is tracked or leased, and the server is stopped."""
    case = ENGINE_CASES["learning rate a word"]
    break_project(project, case)
    leases = project / "leases"
    servers_before = prefect_servers()
    assert main(["run", str(project / "pipeline.yaml"), "--set", f"devices.state_dir={leases}"]) == 2
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"npu-sft: error: {case.expected.format(lf=project / 'lf.yaml')}")
    assert "Traceback" not in captured.out + captured.err
    assert not (project / "mlruns").exists() and not (project / ".npu-sft" / "runs").exists()
    assert not leases.exists() or not any(leases.iterdir())
    assert prefect_servers() <= servers_before


def prefect_servers() -> set[int]:
    """This process's uvicorn children: Prefect's temporary servers."""
    return {pid for pid in descendants(os.getpid()) if b"uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()}
