"""`npu-sft doctor [CONFIG]`: whether this host can run a config, one line per check (ok / warning / error, with the
fix): the device tool and each card (health, processes, a supported chip), enough cards for each task, CANN where the
engine finds it, HCCL's timeout against ddp_timeout, torch reaching each card from the engine env.

Modules: `models` (Finding), `errors`, `devices`, `ascend` (CANN, HCCL), `engine_probe` (torch and torch_npu in the engine env,
a small matmul on each card a training would lease), `diagnose` (every check for a config), `report`.
"""

from npu_sft.doctor.diagnose import diagnose
from npu_sft.doctor.engine_probe import require_working_cards
from npu_sft.doctor.errors import CardsNotWorking
from npu_sft.doctor.models import Finding, worst
from npu_sft.doctor.report import render_findings

__all__ = ["CardsNotWorking", "Finding", "diagnose", "render_findings", "require_working_cards", "worst"]
