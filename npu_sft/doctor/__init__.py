"""`npu-sft doctor [CONFIG]`: whether this host can run a config, one line per check (ok / warning / error, with the
fix): the device tool and each card (health, processes, a supported chip), enough cards for each task, CANN where the
engine finds it, HCCL's timeout against ddp_timeout, torch reaching each card from the engine env; then what the run
must reach: each ModelScope repository at its revision, room for it on the cache's disk, Prefect and MLflow.

Modules: `models` (Finding), `errors`, `devices`, `ascend` (CANN, HCCL), `engine_probe` (torch and torch_npu in the
engine env, a small matmul on each card a training would lease), `downloads` (the hub and the disk), `services`
(Prefect and MLflow), `diagnose` (every check for a config), `report`.
"""

from npu_sft.doctor.diagnose import diagnose, diagnose_host
from npu_sft.doctor.engine_probe import require_working_cards
from npu_sft.doctor.errors import CardsNotWorking
from npu_sft.doctor.models import Finding, worst
from npu_sft.doctor.report import render_findings

__all__ = [
    "CardsNotWorking",
    "Finding",
    "diagnose",
    "diagnose_host",
    "render_findings",
    "require_working_cards",
    "worst",
]
