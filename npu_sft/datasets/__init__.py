"""Dataset preparation: sources, row-level validation, dedup and split, statistics, LLaMA-Factory registration."""

from npu_sft.datasets.builtin import BUILTIN_DATASETS, demo_corpus
from npu_sft.datasets.errors import DatasetError
from npu_sft.datasets.prepare import PreparedData, prepare_datasets, prepared_dir_for
from npu_sft.datasets.recording import EVAL_SPLIT_ARTIFACTS, dataset_inputs, log_dataset_stats
from npu_sft.datasets.report import render_prepare_report, stats_table_rows
from npu_sft.datasets.settings import ColumnMap, DatasetSpec, DataSettings, IdentitySettings, TagMap
from npu_sft.datasets.stats import DatasetStats, LengthStats, SourceStats

__all__ = [
    "BUILTIN_DATASETS",
    "EVAL_SPLIT_ARTIFACTS",
    "ColumnMap",
    "DataSettings",
    "DatasetError",
    "DatasetSpec",
    "DatasetStats",
    "IdentitySettings",
    "LengthStats",
    "PreparedData",
    "SourceStats",
    "TagMap",
    "demo_corpus",
    "dataset_inputs",
    "log_dataset_stats",
    "prepare_datasets",
    "prepared_dir_for",
    "render_prepare_report",
    "stats_table_rows",
]
