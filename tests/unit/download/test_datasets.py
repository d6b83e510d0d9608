"""ModelScope datasets named in a pipeline config, fetched with the real `modelscope` client from the hub stand-in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu_sft.datasets.reading import load_source, parse_rows
from npu_sft.download.datasets import with_downloaded_datasets
from npu_sft.settings import load_pipeline
from tests.fakes.hub_standin import HubStandIn

REPO = Path(__file__).resolve().parents[3]
ALPACA_EN = "llamafactory/alpaca_en"  # LLaMA-Factory's dataset_info.json: "alpaca_en": {"ms_hub_url": ...}


@pytest.fixture
def hub() -> Iterator[HubStandIn]:
    with HubStandIn() as standin:
        yield standin


def alpaca_en_files(rows: int) -> dict[str, bytes]:
    """The repository as LLaMA-Factory publishes it: one JSON array of alpaca rows, beside its card."""
    data = [{"instruction": f"Give tip {i} for staying healthy.", "input": "", "output": f"Tip {i}."} for i in range(rows)]
    return {
        "alpaca_data_en_52k.json": json.dumps(data).encode(),
        "README.md": b"---\nlicense: cc-by-4.0\n---\n# alpaca_en\n",
        ".gitattributes": b"*.json filter=lfs diff=lfs merge=lfs -text\n",
    }


def test_the_qwen7b_config_gets_its_datasets_through_the_download_path(hub: HubStandIn, tmp_path: Path) -> None:
    # A fresh host: no hand-copied data/alpaca_en_demo.json, only the hub.
    commit = hub.add_repo(ALPACA_EN, alpaca_en_files(rows=1200), repo_type="dataset")
    pipeline = load_pipeline(
        REPO / "configs/qwen7b.yaml", [f"model.endpoint={hub.url}", f"model.cache_dir={tmp_path / 'hub-cache'}"]
    )
    assert {spec.name: spec.source for spec in pipeline.settings.data.datasets} == {
        "identity": "builtin",
        "alpaca_en_demo": "modelscope",
    }

    data, downloads = with_downloaded_datasets(pipeline.settings.data, pipeline.settings.model)

    [(name, downloaded)] = downloads
    assert name == "alpaca_en_demo" and downloaded.resolved_revision == commit  # pinned, as the model is
    spec = next(spec for spec in data.datasets if spec.name == "alpaca_en_demo")
    source = load_source(spec)
    assert [Path(f.display).name for f in source.files] == ["alpaca_data_en_52k.json"]  # not the card
    assert len(parse_rows(source.files[0])) == 1200
    # The seed recipe trains on the first 1000 of them, as it does with the demo file.
    assert pipeline.llamafactory["max_samples"] == 1000
