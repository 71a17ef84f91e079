"""What the search needs to know of a calibration method: its family, whether it applies, and which
family to try first.

Methods of one family (ONNX Runtime's minmax, entropy and percentile calibrators) share their
failure modes: when the first of a family breaks the budget by far, the next one breaks it the same
way, and the search's time is better spent on the float fallback, QAT or another family. The
methods and their families are engines.quantize.methods' registry (`QUANTIZATION_METHODS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from engines.quantize.int8 import QUANTIZATION_METHODS  # importing int8 registers every method

#: The families, in the order the search tries their first method: ONNX Runtime's minmax is the
#: cheapest build; NNCF (fast bias correction) kept fp32's top-1 on 73 % of EfficientNet-Lite0's
#: held-out crops where minmax kept 53 % and cross-layer equalization 51 % (per channel); so NNCF
#: before equalization. SmoothQuant applies to MatMul-heavy graphs only (transformers), where equalization
#: (Conv chains) does not: it comes right after NNCF. A family not named here comes after these, in
#: registration order.
FAMILY_PREFERENCE = ("onnxruntime", "nncf", "smoothquant", "equalization")


def method_names() -> tuple[str, ...]:
    """Every calibration method the quantizer knows, in registration order."""
    return tuple(QUANTIZATION_METHODS)


def family(name: str) -> str:
    """The method's family (its own name for a method the registry does not know)."""
    entry = QUANTIZATION_METHODS.get(name)
    return entry.family if entry is not None else name


def not_applicable(name: str, float_path: Path) -> str | None:
    """Why the method does not apply to this model, or None. A check that fails says nothing: the
    build then says what is wrong."""
    entry = QUANTIZATION_METHODS.get(name)
    if entry is None:
        return None
    try:
        return entry.applies(float_path) or None
    except Exception:
        return None


def family_first(names: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the first method of each family, in order; the others, in order)."""
    firsts: list[str] = []
    rest: list[str] = []
    seen: set[str] = set()
    for name in dict.fromkeys(names):
        kin = family(name)
        (rest if kin in seen else firsts).append(name)
        seen.add(kin)
    return tuple(firsts), tuple(rest)


def _preference(name: str) -> int:
    kin = family(name)
    return FAMILY_PREFERENCE.index(kin) if kin in FAMILY_PREFERENCE else len(FAMILY_PREFERENCE)


def default_calibrations() -> tuple[str, ...]:
    """Every registered method, the first of each family first, families in FAMILY_PREFERENCE's
    order (minmax, nncf, nncf-smoothquant, cle, then entropy, percentile)."""
    firsts, rest = family_first(sorted(method_names(), key=_preference))
    return firsts + rest
