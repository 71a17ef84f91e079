"""Tensors on the wire: the Open Inference Protocol (KServe v2) with Triton's binary extension.

One module for both sides: the client encodes requests and decodes responses, the server does
the reverse, and both use these functions, so the two cannot drift apart.

A message is a JSON header, optionally followed by raw little-endian tensor bytes. When there
are binary parts, the `Inference-Header-Content-Length` HTTP header gives the JSON's length and
each binary tensor carries `"parameters": {"binary_data_size": n}`, in order.

JSON has no NaN or infinities. In JSON tensor data they are the strings "NaN", "Infinity" and
"-Infinity": how the protocol's gRPC messages read in their canonical JSON form (proto3's JSON
mapping of float and double fields), and the spellings Triton writes bare (Triton's bare tokens
are not JSON: strict parsers refuse the whole response). Every message written here is strict
JSON; the reader takes the strings, and the bare tokens too.

JSON is read and written by pydantic-core (Rust; a dependency of pydantic): several times faster
than the standard library on megabytes of numbers, which matters to a server whose other requests
wait while a parse holds the GIL.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
from pydantic_core import from_json, to_json

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Bounds on a declared shape, checked before any arithmetic on it: a shape of thousands of huge
#: dims would otherwise cost seconds of big-integer math (ONNX tensors have far fewer dims).
MAX_RANK = 32
MAX_ELEMENTS = 2**40
BINARY_CONTENT_TYPE = "application/octet-stream"
#: Non-finite floats in JSON tensor data (see the module's docstring).
NAN, POS_INF, NEG_INF = "NaN", "Infinity", "-Infinity"

#: OIP datatype name -> numpy dtype (little-endian). BYTES (strings) is not supported.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_NUMPY_NAME = {dtype.name: name for name, dtype in DATATYPES.items()}


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the server answers it with a 400)."""


def datatype_of(dtype: np.dtype | str) -> str:
    """The OIP datatype of a numpy dtype ("float32" -> "FP32")."""
    name = np.dtype(dtype).name
    if name not in _BY_NUMPY_NAME:
        raise ProtocolError(f"dtype {name} has no Open Inference Protocol datatype")
    return _BY_NUMPY_NAME[name]


def dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype ("FP32" -> float32)."""
    if datatype not in DATATYPES:
        raise ProtocolError(f"unsupported datatype '{datatype}'; supported: {sorted(DATATYPES)}")
    return DATATYPES[datatype]


def encode(
    header: dict[str, Any],
    key: str,
    arrays: Mapping[str, np.ndarray],
    binary: bool | Collection[str] = True,
) -> tuple[bytes, int | None]:
    """Serialize `header` with `arrays` as its `key` ("inputs" or "outputs") list.

    `binary` is True (all tensors as raw bytes), False (all as JSON) or the names to send raw.
    Returns the body and the JSON header's length (None when everything is JSON, in which case
    no `Inference-Header-Content-Length` header must be sent).
    """
    entries, parts = [], []
    for name, value in arrays.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if binary is True or (binary is not False and name in binary):
            raw = np.ascontiguousarray(array, dtype=DATATYPES[entry["datatype"]]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = json_values(array.reshape(-1))
        entries.append(entry)
    head = to_json({**header, key: entries})  # compact; nothing non-finite is left in it
    if not parts:
        return head, None
    return head + b"".join(parts), len(head)


def json_values(array: np.ndarray) -> Any:
    """The array as (nested) lists for strict JSON: floats as numbers, NaN and ±infinity as the
    strings "NaN", "Infinity" and "-Infinity" (for `/v2` data, flat; for `/v1` outputs, nested)."""
    if array.dtype.kind != "f" or array.size == 0 or np.isfinite(array).all():
        return array.tolist()
    boxed = array.astype(object)  # Python floats, where the strings can go
    boxed[np.isnan(array)] = NAN
    boxed[np.isposinf(array)] = POS_INF
    boxed[np.isneginf(array)] = NEG_INF
    return boxed.tolist()


def split(body: bytes | bytearray, header_length: int | str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of a message and the binary bytes after it."""
    view = memoryview(body)
    if header_length is None or header_length == "":
        json_part, tail = body, view[len(view) :]
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {length}, but the body is only {len(body)} bytes")
        json_part, tail = bytes(view[:length]), view[length:]
    try:  # bare NaN and Infinity are read too (Triton writes them); nesting is limited (ValueError)
        message = from_json(json_part)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"the JSON header does not parse: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("the JSON header must be an object")
    return message, tail


def decode(entries: Any, tail: memoryview, *, what: str = "input") -> dict[str, np.ndarray]:
    """Arrays from a list of tensor entries, taking binary ones from `tail` in order.

    Every length is checked: the declared shape against the data, and the binary sizes against
    the bytes actually sent (no more, no less).
    """
    if not isinstance(entries, list):
        raise ProtocolError(f"'{what}s' must be a list of tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        name, dtype, shape = _entry_fields(entry, what)
        if name in arrays:
            raise ProtocolError(f"{what} '{name}' is given twice")
        count = math.prod(shape)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ProtocolError(f"{what} '{name}': 'parameters' must be an object")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"{what} '{name}': binary_data_size must be a non-negative integer")
            if size != count * dtype.itemsize:
                raise ProtocolError(
                    f"{what} '{name}': binary_data_size is {size} bytes, but shape {shape} of "
                    f"{entry['datatype']} takes {count * dtype.itemsize}"
                )
            if offset + size > len(tail):
                raise ProtocolError(
                    f"{what} '{name}': binary data ends at byte {offset + size} of the binary part, "
                    f"which has only {len(tail)}"
                )
            try:
                array = np.frombuffer(tail[offset : offset + size], dtype=dtype).reshape(shape)
            except ValueError as exc:
                raise ProtocolError(f"{what} '{name}': cannot take shape {shape}: {exc}") from None
            offset += size
        elif "data" in entry:
            array = _from_json_data(entry["data"], dtype, shape, name, what)
        else:
            raise ProtocolError(f"{what} '{name}' has neither 'data' nor a binary_data_size parameter")
        arrays[name] = array.astype(dtype.newbyteorder("="), copy=False)
    if offset != len(tail):
        raise ProtocolError(f"{len(tail) - offset} bytes after the last binary tensor belong to none")
    return arrays


def _entry_fields(entry: Any, what: str) -> tuple[str, np.dtype, list[int]]:
    if not isinstance(entry, dict):
        raise ProtocolError(f"each {what} must be an object with name, datatype and shape")
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"an {what} has no 'name'")
    if not isinstance(datatype, str):
        raise ProtocolError(f"{what} '{name}' has no 'datatype'")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise ProtocolError(f"{what} '{name}': 'shape' must be a list of at most {MAX_RANK} dims")
    count = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim <= MAX_ELEMENTS:
            raise ProtocolError(
                f"{what} '{name}': each dim of 'shape' must be an integer in [0, {MAX_ELEMENTS}]"
            )
        count *= dim
        if count > MAX_ELEMENTS:
            raise ProtocolError(f"{what} '{name}': shape {shape[:8]}… has more than {MAX_ELEMENTS} elements")
    return name, dtype_of(datatype), shape


def _from_json_data(data: Any, dtype: np.dtype, shape: list[int], name: str, what: str) -> np.ndarray:
    try:  # numpy reads "NaN", "Infinity" and "-Infinity" into a float dtype, as float() does
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"{what} '{name}': data is not an array of {dtype.name}: {exc}") from None
    if array.size != math.prod(shape):
        raise ProtocolError(
            f"{what} '{name}': {array.size} values in 'data', but shape {shape} needs {math.prod(shape)}"
        )
    try:
        return array.reshape(shape)
    except ValueError as exc:  # e.g. an empty array with a dim numpy cannot index
        raise ProtocolError(f"{what} '{name}': cannot take shape {shape}: {exc}") from None


def requested_outputs(message: dict[str, Any], available: list[str], default_binary: bool) -> dict[str, bool]:
    """The outputs to return, in order, each with whether to send it as raw bytes.

    All outputs unless the request lists some in `outputs`; binary per output from its
    `parameters.binary_data`, else the request's `parameters.binary_data_output`, else the default
    (JSON for JSON requests, as Triton does).
    """
    fallback = _flag(_parameters(message, "the request"), "binary_data_output", default_binary)
    wanted = message.get("outputs")
    if wanted is None or wanted == []:
        return dict.fromkeys(available, fallback)
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list")
    chosen: dict[str, bool] = {}
    for entry in wanted:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in available:
            raise ProtocolError(f"unknown output {name!r}; outputs: {available}")
        chosen[name] = _flag(_parameters(entry, f"output '{name}'"), "binary_data", fallback)
    return chosen


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"'parameters' of {what} must be an object")
    return parameters


def _flag(parameters: dict[str, Any], key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"parameter '{key}' must be true or false, not {value!r}")
    return value


def metadata_datatype(dtype: str) -> str:
    """The datatype to show in model metadata, also for dtypes the tensor codec does not carry."""
    try:
        return datatype_of(dtype)
    except (ProtocolError, TypeError):
        return {"object": "BYTES", "str": "BYTES", "bfloat16": "BF16"}.get(dtype, dtype.upper())
