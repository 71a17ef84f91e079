"""optiforge's Python client: manage models, datasets, jobs and engines, and run inference.

Installs without torch or any server dependency (httpx, pydantic, numpy).
"""

from optiforge_client.client import AsyncClient, Client
from optiforge_client.errors import (
    BadRequest,
    Conflict,
    DatasetFailed,
    DatasetTimeout,
    Forbidden,
    JobFailed,
    JobTimeout,
    ModelFailed,
    ModelTimeout,
    NotFound,
    OptiforgeError,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from optiforge_client.models import Dataset, Engine, InferResult, Job, Model

__version__ = "0.1.0"
__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "Dataset",
    "DatasetFailed",
    "DatasetTimeout",
    "Engine",
    "Forbidden",
    "InferResult",
    "Job",
    "JobFailed",
    "JobTimeout",
    "Model",
    "ModelFailed",
    "ModelTimeout",
    "NotFound",
    "OptiforgeError",
    "PayloadTooLarge",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
]
