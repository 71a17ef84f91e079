"""/v1/capabilities: what this service can do, read from the registries of engines/.

Clients (the SDK's CLI among them) read their choices here rather than keeping a copy that could
drift from the server they talk to.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy.orm import Session

from app.api.deps import get_db, get_settings_dep
from app.core.orm import JobKind
from app.core.presence import live_workers_by_queue
from app.core.settings import Settings
from engines.backends.registry import backend_class, backend_names, unavailable_reason
from engines.graphopt.config import AUTO, OFF
from engines.graphopt.model_types import MODEL_TYPES
from engines.prune.criteria import CRITERIA
from engines.quantize.budget import BUDGET_METRICS
from engines.quantize.int8 import CALIBRATION_METHODS, QUANTIZATION_METHODS
from engines.variants import PRECISIONS

router = APIRouter(prefix="/v1", tags=["capabilities"])


@router.get("/capabilities", summary="Precisions, calibration methods, pruning criteria, backends, job kinds")
def capabilities(
    session: Session = Depends(get_db), settings: Settings = Depends(get_settings_dep)
) -> dict[str, Any]:
    return {
        "precisions": list(PRECISIONS),
        "calibration_methods": list(CALIBRATION_METHODS),
        # each method's description, family (methods of one family fail alike) and INT8 profiles
        "quantization_methods": [method.to_dict() for method in QUANTIZATION_METHODS.values()],
        "prune_methods": [criterion.to_dict() for criterion in CRITERIA.values()],
        "budget_metrics": list(BUDGET_METRICS),
        # a recipe's graph_optimization.model_type: off, auto, or one of these (detected: auto finds it)
        "graph_optimization": {
            "modes": [OFF, AUTO],
            "model_types": [model_type.to_dict() for model_type in MODEL_TYPES.values()],
        },
        "backends": [
            {
                "name": name,
                "queue": backend_class(name).queue,
                "precisions": list(backend_class(name).precisions),
                "available_here": unavailable_reason(name) is None,
            }
            for name in backend_names()
        ],
        "job_kinds": list(JobKind.ALL),
        # live workers per queue: a `gpu` job waits for (and fails without) a GPU worker
        "workers": live_workers_by_queue(session, settings),
    }
