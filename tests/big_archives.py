"""Archives that declare gigabytes and weigh megabytes, built in about a second.

Deflate compresses a run of zeros about 1000:1, and after a full flush every equal chunk of input
compresses to the same bytes, so a member of N zero bytes is one compressed chunk repeated, and
the zip around it is written by hand (zipfile would compress the N bytes itself). What they hold
is real: every reader inflates them to the declared bytes, CRC included.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper

_CHUNK = 1 << 24
_STORED, _DEFLATED = 0, 8


def _deflated(prefix: bytes, zeros: int) -> tuple[bytes, int]:
    """A raw deflate stream of `prefix` then `zeros` zero bytes, and its CRC-32."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(prefix)
    full, rest = divmod(zeros, _CHUNK)
    if full:
        chunk = bytes(_CHUNK)
        repeated = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
        parts.append(repeated * full)
        for _ in range(full):
            crc = zlib.crc32(chunk, crc)
    parts.append(compressor.compress(bytes(rest)) + compressor.flush())
    return b"".join(parts), zlib.crc32(bytes(rest), crc)


def zip_of(members: dict[str, tuple[bytes, int]]) -> bytes:
    """A zip whose members are `name: (prefix, zeros)`: the prefix's bytes followed by that many
    zeros, deflated (sizes under 4 GiB: no ZIP64 needed)."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, (prefix, zeros) in members.items():
        data, crc = _deflated(prefix, zeros)
        size, encoded = len(prefix) + zeros, name.encode()
        offset = out.tell()
        # a local header, the data, and the member's entry in the central directory (APPNOTE 4.3.7, 4.3.12)
        sizes = (crc, len(data), size, len(encoded))
        out.write(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, _DEFLATED, 0, 33, *sizes, 0))
        out.write(encoded)
        out.write(data)
        attributes = (0, 0, 0, 0, 0o644 << 16, offset)
        central.write(
            struct.pack(
                "<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, _DEFLATED, 0, 33, *sizes, *attributes
            )
        )
        central.write(encoded)
    start = out.tell()
    out.write(central.getvalue())
    count = len(members)
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central.getvalue()), start, 0))
    return out.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def zeros_npz(data_bytes: int, row: int = 256) -> bytes:
    """An `.npz` whose `input` is float32 zeros of about `data_bytes`, `row` values per sample."""
    samples = data_bytes // 4 // row
    return zip_of({"input.npy": (npy_header((samples, row)), samples * row * 4)})


def gather_model(weight_elements: int, location: str = "weights.bin") -> onnx.ModelProto:
    """y = W[idx]: one float32 initializer of `weight_elements` kept in external data."""
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[weight_elements])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(weight_elements * 4)}.items():
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "idx"], ["y"])],
        "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def zeros_bundle(weight_bytes: int) -> bytes:
    """A model bundle (.zip of model.onnx and weights.bin) whose weights are `weight_bytes` of zeros."""
    elements = weight_bytes // 4
    model = gather_model(elements).SerializeToString()
    return zip_of({"model.onnx": (model, 0), "weights.bin": (b"", elements * 4)})
