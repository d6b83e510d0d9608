"""Running the project's services on one host (`make up` / `make down`) and keeping Prefect and MLflow truthful.

Modules: `services` (up and down, `python -m npu_sft.ops.services`), `specs` (the four services), `supervisor`
(pid records, start, readiness, stop), `deploy` (work pool, automations, deployments), `reconcile` (crashed flow
runs and their MLflow runs), `prefect_setup` (the work pool and automations), `settings`, `errors`.
The Prefect-heavy `reconcile` and `prefect_setup` run as their own processes and are not imported here.
"""

from npu_sft.ops.errors import ServiceError
from npu_sft.ops.services import down, up
from npu_sft.ops.settings import HOST, ServiceSettings

__all__ = ["HOST", "ServiceError", "ServiceSettings", "down", "up"]
