"""The one small interface every backend implements.

A backend compiles an ONNX file into something it runs (an EngineArtifact) and loads that
artifact into a Runner. Adding a backend (OpenVINO, TensorRT) means one new module plus a line
in `engines.backends.registry`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from engines.ingest.signature import StatedAxes, TensorSpec, validate_feeds


@dataclass(frozen=True)
class CompileOptions:
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = (1,)
    threads: int | None = None  # None: the backend's default (all cores)
    #: The batch axes a user stated for the model's inputs (engines.ingest.signature.stated_batch_axes):
    #: a build that shapes by the batch (TensorRT's profile, CUDA graphs) uses them, not the graph's.
    batch_axes: StatedAxes = field(default_factory=dict)
    #: A token model's sequence lengths the engine is timed at, as the batch sizes are: a recipe's
    #: `sequence_lengths`, a search objective's length, or, where none is named, the datasets' own
    #: lengths. A build that shapes by the sequence (TensorRT's profile, CUDA graphs) covers them.
    sequence_lengths: tuple[int, ...] = ()
    #: Input name -> its sequence axis (engines.ingest.sequence.sequence_axes over the model's input
    #: specs, the stated batch axes decided): where `sequence_lengths` apply. Empty: no sequence axis.
    sequence_axes: Mapping[str, int] = field(default_factory=dict)
    #: The longest sequence the engine must take when it is longer than every timed length (the
    #: accuracy run feeds the evaluation set at its own length); None: the longest timed length.
    max_sequence_length: int | None = None


#: The metadata (an engine record's build_info) key of the batch axes a user stated for the model's
#: inputs: an engine is loaded with them (LoadOptions.batch_axes) wherever it runs.
STATED_AXES_KEY = "batch_axes"


@dataclass(frozen=True)
class EngineArtifact:
    """A compiled engine: one file, plus what is needed to load and trust it later."""

    backend: str
    precision: str
    path: Path
    build_seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


def engine_size(engine_path: Path) -> int:
    """Bytes of an engine: its file and the files named like it (`engine.onnx.data`, OpenVINO's
    `engine.bin`), not the reports and settings stored beside it (`layer_errors.json`,
    `torch_engine.json`)."""
    stem = engine_path.name.split(".")[0]
    return sum(path.stat().st_size for path in engine_path.parent.glob(stem + ".*") if path.is_file())


@dataclass(frozen=True)
class LoadOptions:
    """How a backend loads an engine; each backend subclasses it with its own knobs (threads and
    spinning for a CPU runtime, a device and a stream for a GPU one)."""

    #: The batch axes a user stated for the model's inputs: the runner's signature takes them over
    #: the graph's (engines.ingest.signature.decide_batch_axes); the engine file does not know them.
    batch_axes: StatedAxes = field(default_factory=dict)


class Runner(abc.ABC):
    """A loaded engine, with a lifecycle (as Polygraphy's runners have).

    `activate()` takes the resources (a session, a GPU execution context), `deactivate()` gives
    them back; the engine pool deactivates what it evicts. `infer()` validates the feeds against
    the engine's signature, then calls the backend's own `_infer`. `max_concurrency` is how many
    calls may run at once on one runner (None: any, for thread-safe sessions; 1 for a GPU
    execution context): the engine pool honours it.
    """

    max_concurrency: ClassVar[int | None] = None

    def __init__(self) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> Runner:
        if not self._active:
            self._activate()
            self._active = True
        return self

    def deactivate(self) -> None:
        if self._active:
            self._deactivate()
            self._active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *_exc: object) -> None:
        self.deactivate()

    def infer(self, feeds: Mapping[str, np.ndarray], check_inputs: bool = True) -> dict[str, np.ndarray]:
        """Outputs by name. `check_inputs=False` skips validation for feeds already checked (a timing
        loop, a batch stacked from validated requests)."""
        from engines.errors import EngineError

        if not self._active:
            raise EngineError("the runner is not active: activate() it first", code="runner_inactive")
        if check_inputs:
            validate_feeds(feeds, self.input_metadata())
        return self._infer(feeds)

    @abc.abstractmethod
    def _activate(self) -> None:
        """Take the resources inference needs."""

    @abc.abstractmethod
    def _deactivate(self) -> None:
        """Give them back; the runner may be activated again."""

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The backend's own inference on feeds that fit the signature."""

    @abc.abstractmethod
    def input_metadata(self) -> list[TensorSpec]: ...

    @abc.abstractmethod
    def output_metadata(self) -> list[TensorSpec]: ...


class Backend(abc.ABC):
    name: ClassVar[str]
    #: The Celery queue whose workers can build this backend's engines.
    queue: ClassVar[str] = "cpu"
    #: Which INT8 flavour of QDQ ONNX it runs best (see engines.quantize.int8).
    quantization_profile: ClassVar[str] = "cpu"
    #: The precisions it builds engines at; a recipe asking another is refused when the job is made.
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    #: Precisions it applies itself to the fp32 model (PyTorch casts its weights), so the pipeline
    #: hands it the fp32 model instead of building an ONNX at that precision.
    native_precisions: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    @abc.abstractmethod
    def available(cls) -> bool:
        """Whether this node can compile and run the backend (libraries and hardware present)."""

    @abc.abstractmethod
    def compile(self, onnx_path: Path, out_dir: Path, options: CompileOptions) -> EngineArtifact:
        """Turn an ONNX file into an engine file inside `out_dir`."""

    #: This backend's LoadOptions subclass.
    load_options: ClassVar[type[LoadOptions]] = LoadOptions

    @classmethod
    def options(cls, **knobs: Any) -> LoadOptions:
        """This backend's load options from generic knobs (threads=…, spin_wait=…): the ones it has
        are taken, the others ignored, so a caller need not know which backend it loads."""
        names = {item.name for item in fields(cls.load_options)}
        return cls.load_options(**{key: value for key, value in knobs.items() if key in names})

    @classmethod
    def precision_unavailable(cls, precision: str) -> str | None:
        """Why this node's hardware cannot compute `precision` with this backend although the backend
        builds it elsewhere (bf16 on a CPU without bfloat16 arithmetic), or None. Compiling such an
        engine is an EngineError with this reason; the search skips it with the reason."""
        return None

    @classmethod
    def model_precision(cls, precision: str) -> str:
        """The precision of the ONNX model this backend compiles for an engine at `precision`: the
        fp32 model for the precisions it applies itself (`native_precisions`)."""
        return "fp32" if precision in cls.native_precisions else precision

    @classmethod
    def load_options_for(cls, options: LoadOptions | None) -> LoadOptions:
        """`options` as this backend's own LoadOptions: another backend's are read knob by knob
        (the ones this backend has are kept), None gives the defaults."""
        if options is None:
            return cls.load_options()
        if isinstance(options, cls.load_options):
            return options
        return cls.options(**{item.name: getattr(options, item.name) for item in fields(options)})

    @abc.abstractmethod
    def load(self, engine_path: Path, options: LoadOptions | None = None) -> Runner:
        """Load an engine file written by `compile`: an active runner (deactivate it when done)."""

    @abc.abstractmethod
    def hardware(self, threads: int | None = None) -> dict[str, Any]:
        """The hardware and library versions an engine built here is measured on and tied to."""
