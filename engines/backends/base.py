"""The one small interface every backend implements.

A backend compiles an ONNX file into something it runs (an EngineArtifact) and loads that
artifact into a Runner. Adding a backend (OpenVINO, TensorRT) means one new module plus a line
in `engines.backends.registry`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from engines.ingest.signature import TensorSpec


@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1,)
    threads: int | None = None  # None: the backend's default (all cores)


@dataclass(frozen=True)
class EngineArtifact:
    """A compiled engine: one file, plus what is needed to load and trust it later."""

    backend: str
    precision: str
    path: Path
    build_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """A loaded engine. `infer` must be safe to call from several threads at once."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def input_metadata(self) -> list[TensorSpec]: ...

    def output_metadata(self) -> list[TensorSpec]: ...


class Backend(abc.ABC):
    name: ClassVar[str]
    #: The Celery queue whose workers can build this backend's engines.
    queue: ClassVar[str] = "cpu"
    #: Which INT8 flavour of QDQ ONNX it runs best (see engines.quantize.int8).
    quantization_profile: ClassVar[str] = "cpu"

    @classmethod
    @abc.abstractmethod
    def available(cls) -> bool:
        """Whether this node can compile and run the backend (libraries and hardware present)."""

    @abc.abstractmethod
    def compile(self, onnx_path: Path, out_dir: Path, options: CompileOptions) -> EngineArtifact:
        """Turn an ONNX file into an engine file inside `out_dir`."""

    @abc.abstractmethod
    def load(self, engine_path: Path, threads: int | None = None, spin_wait: bool = True) -> Runner:
        """Load an engine file written by `compile`.

        `spin_wait` keeps idle compute threads spinning between calls: the lowest latency for
        back-to-back calls (what a benchmark does), but the spinning takes cores that a server's
        own threads need, so serving turns it off.
        """

    @abc.abstractmethod
    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        """The hardware and library versions an engine built here is measured on and tied to."""
