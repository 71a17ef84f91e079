"""/v1/capabilities: what this service can do, read from the registries of engines/.

Clients (the SDK's CLI among them) read their choices here rather than keeping a copy that could
drift from the server they talk to.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.core.orm import JobKind
from engines.backends.registry import backend_names, backend_queue, unavailable_reason
from engines.prune.criteria import CRITERIA
from engines.quantize.budget import BUDGET_METRICS
from engines.quantize.int8 import CALIBRATION_METHODS
from engines.variants import PRECISIONS

router = APIRouter(prefix="/v1", tags=["capabilities"])


@router.get("/capabilities", summary="Precisions, calibration methods, pruning criteria, backends, job kinds")
def capabilities() -> dict[str, Any]:
    return {
        "precisions": list(PRECISIONS),
        "calibration_methods": list(CALIBRATION_METHODS),
        "prune_methods": [criterion.to_dict() for criterion in CRITERIA.values()],
        "budget_metrics": list(BUDGET_METRICS),
        "backends": [
            {"name": name, "queue": backend_queue(name), "available_here": unavailable_reason(name) is None}
            for name in backend_names()
        ],
        "job_kinds": list(JobKind.ALL),
    }
