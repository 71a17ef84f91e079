"""A `torch.export` program from a user (`.pt2`, written by `torch.export.save`), checked and loaded
without running anything it carries.

`torch.export.load` is not safe on a file from someone else, whatever `torch.load`'s defaults are
(its own docstring says "uses pickle under the hood ... Never load data from an untrusted source";
shown with torch 2.13 in tests/test_torch_conversion.py):

- the archive's example inputs (`data/sample_inputs/model.pt`) go to `deserialize_torch_artifact`,
  which tries `torch.load(weights_only=True)` and, when that fails, `torch.load(weights_only=False)`:
  any pickle runs (`os.system` included);
- weights and constants saved "with pickle" (tensor subclasses) are read with
  `torch.load(weights_only=False)`, opaque constants with `pickle.loads`, TorchBind objects with
  `torch._C._pickle_load_obj`;
- every symbolic-shape expression in `models/model.json` goes to `sympy.sympify`, which `eval`s it
  (`__import__('os').system(...)` runs);
- a node's target is resolved by `getattr` from the `torch`, `operator` or `math` modules, so
  `torch.os.system` resolves to `os.system` (torch's verifier then refuses that node: here it is
  refused by name first, with the rest of what is not an operator); a node's `source_fn_stack`
  metadata is resolved the same way (dropped here);
- `guards_code` is Python source, `exec`uted when the program is turned back into a module;
- an AOTInductor package in the same archive is native code.

So this module reads the zip with `zipfile` (members checked first: no path leaving the archive,
declared sizes bounded, only the members of a torch.export program, nothing compiled), parses the
program's JSON itself, refuses node targets that are not PyTorch operators and symbolic-shape
expressions that are not plain arithmetic on shape symbols, builds the weights from their raw bytes
(refusing anything pickled), never reads the example inputs, drops the guards, and only then hands
the checked document to torch's deserializer (`ExportedProgramDeserializer`, a private API of the
pinned torch; tests/test_torch_conversion.py runs it).
"""

from __future__ import annotations

import json
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engines.errors import InvalidModelError, UnsupportedOperatorError
from engines.ingest.archives import is_zip_archive, unpacked_size_problem

#: The name `torch.export.save` gives the one program it writes.
PROGRAM_NAME = "model"
MAX_MEMBERS = 100_000
#: The program's graph, as JSON: parsed in memory, so bounded on its own.
MAX_JSON_BYTES = 256 * 2**20
#: A symbolic-shape expression longer than this is not a shape.
MAX_EXPRESSION_CHARS = 2_000

_PROGRAM_JSON = f"models/{PROGRAM_NAME}.json"
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_WEIGHTS_CONFIG = f"{_WEIGHTS_DIR}{PROGRAM_NAME}_weights_config.json"
_CONSTANTS_CONFIG = f"{_CONSTANTS_DIR}{PROGRAM_NAME}_constants_config.json"
#: Pickled by `torch.save`: never read (the conversion does not need example inputs).
_SAMPLE_INPUTS = f"data/sample_inputs/{PROGRAM_NAME}.pt"
_METADATA = frozenset(
    {"archive_format", "archive_version", "byteorder", "version", ".data/version", ".data/serialization_id"}
)
_EXTRA_DIR = "extra/"
#: What else a `.pt2` can hold, each refused with the reason.
_REFUSED_DIRS = {
    "data/aotinductor/": "an AOTInductor-compiled model (native code)",
    "data/executorch/": "an ExecuTorch program",
    "data/mtia/": "an MTIA-compiled model",
    "xl_model_weights/": "weights in the AOTInductor XL layout",
}
_PAYLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_TENSOR_CONSTANT_PREFIX = "tensor_"

# --- node targets -------------------------------------------------------------------------------

_IDENT = r"(?!__)[A-Za-z_][A-Za-z0-9_]*"  # no dunder: no `__class__`, `__globals__`, ...
_TORCH_OP = re.compile(rf"torch\.ops\.({_IDENT})\.({_IDENT})(?:\.({_IDENT}))?")
#: PyTorch's own operator namespaces: pure tensor operators (and control flow over subgraphs).
_TORCH_NAMESPACES = frozenset({"aten", "prims", "higher_order"})
#: What torch.export writes for Python arithmetic on sizes (torch._export.serde.serialize._SYM_OPS)
#: and for `getitem` on an operator's tuple output.
_PYTHON_TARGETS = frozenset(
    {f"_operator.{name}" for name in (
        "getitem", "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv",
        "mod", "pow", "truediv", "and_", "or_", "lshift", "rshift", "not_",
    )}
    | {"math.trunc", "math.ceil", "math.floor", "math.sqrt"}
    | {f"torch.{name}" for name in (
        "sym_not", "sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_sum",
    )}
)  # fmt: skip

# --- symbolic-shape expressions -----------------------------------------------------------------

#: Names a symbolic-shape expression may use: what sympy's `srepr` writes for arithmetic on shape
#: symbols, torch's own sympy functions (the deserializer's `sympy_functions`), and the assumptions
#: a Symbol carries. Anything else (`__import__`, `eval`, sympy's `preview`, which runs LaTeX) is
#: refused: `sympy.sympify` evaluates the string with Python's `eval`.
_EXPRESSION_NAMES = frozenset(
    {
        "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
        "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
        "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
        "Piecewise", "ExprCondPair", "true", "false", "True", "False", "oo", "zoo", "nan",
        "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse",
        # torch.utils._sympy.functions
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
        "RoundDecimal", "ToFloat", "Identity",
        # a Symbol's assumptions, a Float's precision
        "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
        "infinite", "zero", "nonzero", "even", "odd", "rational", "commutative", "extended_real",
        "extended_positive", "extended_negative", "extended_nonnegative", "extended_nonpositive",
        "precision",
    }
)  # fmt: skip
#: Shape symbols as torch names them: s0, s77, u3 (unbacked), zf1, zuf0 (floats).
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
_EXPRESSION_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<number>[0-9]+(?:\.[0-9]+)?)
      | (?P<string>'[^'\\]{0,64}')
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<operator>\*\*|//|==|!=|<=|>=|[-+*/%(),=<>&|~])""",
    re.VERBOSE,
)
_NUMERIC_STRING = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:e[+-]?[0-9]{1,3})?")
_POWER_NAMES = frozenset({"Pow", "PowByNatural", "FloatPow"})


@dataclass(frozen=True)
class Pt2Contents:
    """What the checks found in a `.pt2`: its members (relative to its top folder) and what will be
    ignored."""

    root: str
    members: frozenset[str]
    extra_files: tuple[str, ...]
    has_sample_inputs: bool


@dataclass(frozen=True)
class LoadedProgram:
    """A program loaded by `load_exported_program`, with what a person should know about it."""

    program: Any  # torch.export.ExportedProgram
    saved_by_torch: str | None
    notes: tuple[str, ...]


def _refuse(detail: str, *, code: str = "invalid_torch_program") -> InvalidModelError:
    return InvalidModelError(detail, code=code)


# --- the archive --------------------------------------------------------------------------------


def open_pt2(path: Path) -> zipfile.ZipFile:
    """The `.pt2` as an open zip (InvalidModelError for an empty file or one that is not a zip)."""
    if path.stat().st_size == 0:
        raise _refuse("the uploaded file is empty", code="empty_file")
    if not is_zip_archive(path):
        raise _refuse(
            "the file is not a torch.export program: a .pt2 written by torch.export.save is a zip "
            "archive, and this file does not start like one"
        )
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError) as exc:
        raise _refuse(f"the .pt2 archive is damaged: {exc}") from exc


def check_pt2_members(archive: zipfile.ZipFile, *, max_unpacked_bytes: int) -> Pt2Contents:
    """Check every member from the central directory, before anything is inflated: names that stay
    inside the archive, the declared unpacked size within `max_unpacked_bytes`, plain files in
    stored or deflate form, one top folder, and only what a torch.export program holds."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _refuse(f"the archive holds {len(infos)} members; at most {MAX_MEMBERS} are accepted")
    problem = unpacked_size_problem(
        archive, max_unpacked_bytes, remedy="upload a smaller model, or ask the operator for a higher limit"
    )
    if problem:
        raise _refuse(problem, code="upload_too_large")
    names: list[str] = []
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        _check_member(info)
        if name in seen:
            raise _refuse(f"archive member '{name}' appears twice")
        seen.add(name)
        if not info.is_dir():
            names.append(name)
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise _refuse(
            "the archive is not a torch.export program: torch.export.save puts every member under one "
            f"top folder, and this one has {len(roots)} top-level entries"
        )
    root = roots.pop()
    members = frozenset(name[len(root) + 1 :] for name in names)
    extra: list[str] = []
    for member in sorted(members):
        kind = _member_kind(member)
        if kind == "extra":
            extra.append(member[len(_EXTRA_DIR) :])
        elif kind is None:
            raise _refuse(f"archive member '{member}' is not part of a torch.export program")
    missing = [
        name
        for name in ("archive_format", "archive_version", _PROGRAM_JSON, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG)
        if name not in members
    ]
    if missing:
        hint = (
            " (an archive written by torch before 2.7 has another layout: load it with that torch "
            "and save it again with torch.export.save)"
            if "archive_format" in missing
            else ""
        )
        raise _refuse(f"the archive is not a torch.export program: it lacks {', '.join(missing)}{hint}")
    return Pt2Contents(
        root=root, members=members, extra_files=tuple(extra), has_sample_inputs=_SAMPLE_INPUTS in members
    )


def _check_member(info: zipfile.ZipInfo) -> None:
    name = info.filename
    path = PurePosixPath(name)
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or ":" in name
        or "\x00" in name
        or ".." in path.parts
    ):
        raise _refuse(f"archive member '{name}' points outside the archive", code="archive_path_traversal")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise _refuse(f"archive member '{name}' is a symlink", code="archive_path_traversal")
    if info.flag_bits & 0x1:
        raise _refuse(f"archive member '{name}' is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _refuse(
            f"archive member '{name}' uses compression method {info.compress_type}; "
            "torch.export.save writes stored members"
        )


def _member_kind(member: str) -> str | None:
    """What a member is (None: nothing a torch.export program holds); refused kinds raise."""
    for prefix, what in _REFUSED_DIRS.items():
        if member.startswith(prefix.rstrip("/")):
            raise _refuse(
                f"archive member '{member}' is {what}; only the program torch.export.save writes is "
                "accepted (nothing compiled)"
            )
    if member in _METADATA or member in (_PROGRAM_JSON, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, _SAMPLE_INPUTS):
        return "known"
    if member.startswith("models/"):
        raise _refuse(
            f"archive member '{member}' is a second program; upload one program per file "
            "(torch.export.save writes models/model.json)"
        )
    for directory in (_WEIGHTS_DIR, _CONSTANTS_DIR):
        if member.startswith(directory) and _PAYLOAD_NAME.fullmatch(member[len(directory) :]):
            return "payload"
    if member.startswith(_EXTRA_DIR) and len(member) > len(_EXTRA_DIR):
        return "extra"
    return None


def _read_text(archive: zipfile.ZipFile, contents: Pt2Contents, member: str, limit: int) -> str:
    info = archive.getinfo(f"{contents.root}/{member}")
    if info.file_size > limit:
        raise _refuse(f"archive member '{member}' is {info.file_size} bytes, over {limit}")
    try:
        return archive.read(info).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(f"archive member '{member}' is not UTF-8 text") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise _refuse(f"archive member '{member}' cannot be read: {exc}") from exc


def _read_json(archive: zipfile.ZipFile, contents: Pt2Contents, member: str) -> dict[str, Any]:
    text = _read_text(archive, contents, member, MAX_JSON_BYTES)
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _refuse(f"archive member '{member}' is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise _refuse(f"archive member '{member}' is not a JSON object")
    return document


# --- the program's JSON -------------------------------------------------------------------------


def check_program_document(document: dict[str, Any]) -> list[str]:
    """Check a program's JSON (models/model.json) in place, before torch reads any of it: every node
    target a PyTorch operator (UnsupportedOperatorError naming custom ones), every symbolic-shape
    expression plain arithmetic on shape symbols. Guards (Python source) are dropped. Returns notes."""
    if not isinstance(document.get("graph_module"), dict):
        raise _refuse(f"'{_PROGRAM_JSON}' holds no graph")
    notes: list[str] = []
    guards = document.get("guards_code")
    if guards:
        notes.append(
            f"the program's {len(guards)} guard(s) on input sizes (stored as Python source) were dropped, "
            "not run: ONNX has no place for them"
        )
    document["guards_code"] = []
    custom: list[str] = []
    stack: list[Any] = [document]
    while stack:  # iterative: a deeply nested document cannot exhaust the stack
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        if "target" in item and "inputs" in item and "outputs" in item:
            _check_target(item["target"], custom)
            if isinstance(item.get("metadata"), dict):
                # Debugging data that torch resolves by getattr into functions: not needed here.
                item["metadata"].pop("source_fn_stack", None)
        for key, value in item.items():
            if key == "expr_str":
                check_expression(value)
            elif key == "as_operator":
                _check_target(value, custom)
            elif isinstance(value, (dict, list)):
                stack.append(value)
    if custom:
        names = sorted(set(custom))
        raise UnsupportedOperatorError(
            f"the program calls custom operator(s) {', '.join(names)}: only PyTorch's built-in "
            "operators (aten, prims) can be converted to ONNX here; rewrite the model with built-in "
            "operations, or export it to ONNX yourself with a translation for them",
            names,
        )
    return notes


def _check_target(target: Any, custom: list[str]) -> None:
    if not isinstance(target, str):
        raise _refuse(f"a node's target is a {type(target).__name__}, not an operator name")
    if target in _PYTHON_TARGETS:
        return
    match = _TORCH_OP.fullmatch(target)
    if match is None:
        shown = target if len(target) <= 100 else target[:100] + "…"
        raise _refuse(f"node target '{shown}' is not a PyTorch operator")
    if match.group(1) not in _TORCH_NAMESPACES:
        custom.append(f"{match.group(1)}::{match.group(2)}")


def check_expression(expression: Any) -> None:
    """Refuse a symbolic-shape expression that is anything but arithmetic on shape symbols in the
    form torch writes (`Mul(Integer(2), Symbol('s77', positive=True, integer=True))`): sympy
    evaluates it with `eval`."""
    if not isinstance(expression, str):
        raise _refuse("a symbolic-shape expression is not a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise _refuse(f"a symbolic-shape expression is {len(expression)} characters long")
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expression):
        match = _EXPRESSION_TOKEN.match(expression, position)
        if match is None:
            raise _refuse(
                f"symbolic-shape expression '{expression[:80]}' holds '{expression[position]}', "
                "which no shape expression uses"
            )
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    # A power of integers is computed exactly when parsed (`99**99**99` never ends): one power at
    # most, of small numbers.
    powers = sum(value == "**" or (kind == "name" and value in _POWER_NAMES) for kind, value in tokens)
    if powers > 1:
        raise _refuse(f"symbolic-shape expression '{expression[:80]}' holds {powers} powers")
    for index, (kind, value) in enumerate(tokens):
        if value == "precision" and [token[1] for token in tokens[index + 1 : index + 2]] == ["="]:
            # a Float's bits: mpmath would allocate whatever is asked
            following = tokens[index + 2 : index + 3]
            if not following or following[0][0] != "number" or len(following[0][1]) > 3:
                raise _refuse(f"symbolic-shape expression '{expression[:80]}' asks for a huge precision")
        if kind == "name" and value not in _EXPRESSION_NAMES and not _SYMBOL.fullmatch(value):
            raise _refuse(
                f"symbolic-shape expression '{expression[:80]}' uses '{value}', which is not accepted"
            )
        if kind == "string" and not (
            _SYMBOL.fullmatch(value[1:-1]) or _NUMERIC_STRING.fullmatch(value[1:-1])
        ):
            raise _refuse(f"symbolic-shape expression '{expression[:80]}' holds the string {value}")
        if kind == "number" and len(value) > (2 if powers else 20):
            raise _refuse(f"symbolic-shape expression '{expression[:80]}' holds the number {value[:24]}")


# --- loading ------------------------------------------------------------------------------------


def load_exported_program(pt2_path: Path, *, max_unpacked_bytes: int) -> LoadedProgram:
    """The `torch.export.ExportedProgram` in a `.pt2`, after every check above (InvalidModelError
    with a code naming what is wrong; UnsupportedOperatorError for custom operators). Nothing in the
    archive is unpickled or evaluated; the example inputs it holds are not read."""
    with open_pt2(pt2_path) as archive:
        contents = check_pt2_members(archive, max_unpacked_bytes=max_unpacked_bytes)
        archive_format = _read_text(archive, contents, "archive_format", 64).strip()
        archive_version = _read_text(archive, contents, "archive_version", 64).strip()
        if archive_format != "pt2" or archive_version != "0":
            raise _refuse(
                f"the archive declares format '{archive_format[:20]}' version '{archive_version[:20]}'; "
                "this server reads torch.export archives of format 'pt2' version '0'"
            )
        if "byteorder" in contents.members:
            byteorder = _read_text(archive, contents, "byteorder", 64).strip()
            if byteorder != "little":
                raise _refuse(
                    f"the archive's tensors are stored {byteorder[:20]}-endian; only little-endian is read"
                )
        document = _read_json(archive, contents, _PROGRAM_JSON)
        notes = check_program_document(document)
        budget = _Budget(max_unpacked_bytes)
        state_dict = _payload_tensors(
            archive, contents, _read_json(archive, contents, _WEIGHTS_CONFIG), _WEIGHTS_DIR, budget
        )
        constants = _payload_tensors(
            archive, contents, _read_json(archive, contents, _CONSTANTS_CONFIG), _CONSTANTS_DIR, budget
        )
    saved_by = document.get("torch_version") if isinstance(document.get("torch_version"), str) else None
    program = _deserialize(document, state_dict, constants, saved_by)
    if contents.has_sample_inputs:
        notes.append("the example inputs stored in the archive (a pickle) were not read")
    if contents.extra_files:
        shown = ", ".join(name[:60] for name in contents.extra_files[:10])
        notes.append(f"{len(contents.extra_files)} extra file(s) ignored: {shown}")
    return LoadedProgram(program=program, saved_by_torch=saved_by, notes=tuple(notes))


class _Budget:
    """What the tensors may take once materialized (the ONNX export copies each into the graph): a
    view can repeat a small payload (stride 0) into any size, so views are bounded, not payloads."""

    #: Views of one payload (tied weights) count each time: allow some repetition in all.
    TOTAL_FACTOR = 4

    def __init__(self, max_unpacked_bytes: int):
        self.per_tensor = max_unpacked_bytes
        self.left = self.TOTAL_FACTOR * max_unpacked_bytes

    def take(self, fqn: str, nbytes: int) -> None:
        if nbytes > self.per_tensor or nbytes > self.left:
            raise _refuse(
                f"'{fqn}' would take {nbytes} bytes once materialized, over what the archive may hold "
                f"({self.per_tensor} bytes)",
                code="upload_too_large",
            )
        self.left -= nbytes


def _payload_tensors(
    archive: zipfile.ZipFile, contents: Pt2Contents, config: dict[str, Any], directory: str, budget: _Budget
) -> dict[str, Any]:
    """Weights or constants, each a view of a raw little-endian payload as its metadata describes
    (aliases share the payload, as torch.export.save wrote them). Pickled payloads are refused."""
    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass, deserialize_scalar_type

    try:
        parsed = _dict_to_dataclass(schema.PayloadConfig, config)
        entries = dict(parsed.config.items())
    except Exception as exc:
        raise _refuse(f"'{directory}' has an unreadable payload list ({type(exc).__name__}: {exc})") from exc
    flats: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for fqn, meta in entries.items():
        name = meta.path_name
        if meta.use_pickle or (directory == _CONSTANTS_DIR and not name.startswith(_TENSOR_CONSTANT_PREFIX)):
            raise _refuse(
                f"'{fqn}' is stored as a pickle ({directory}{name}): pickled objects (tensor subclasses, "
                "TorchBind or opaque objects) are never loaded here; only plain tensors are accepted",
                code="pickle_refused",
            )
        if (
            not isinstance(name, str)
            or not _PAYLOAD_NAME.fullmatch(name)
            or f"{directory}{name}" not in contents.members
        ):
            raise _refuse(f"'{fqn}' names payload '{directory}{name}', which is not in the archive")
        tensor_meta = meta.tensor_meta
        if tensor_meta is None:
            raise _refuse(f"'{fqn}' has no tensor metadata")
        try:
            dtype = deserialize_scalar_type(tensor_meta.dtype)
            sizes = [_static_int(value) for value in tensor_meta.sizes]
            strides = [_static_int(value) for value in tensor_meta.strides]
            offset = _static_int(tensor_meta.storage_offset)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise _refuse(f"'{fqn}' has unreadable tensor metadata ({exc})") from exc
        if name not in flats:
            flats[name] = _flat_tensor(archive, f"{contents.root}/{directory}{name}", dtype, torch)
        flat = flats[name]
        if flat.dtype != dtype:
            raise _refuse(f"'{fqn}' reads payload '{name}' as {dtype}, another tensor as {flat.dtype}")
        if len(sizes) != len(strides) or min([offset, *sizes, *strides], default=0) < 0:
            raise _refuse(f"'{fqn}' has inconsistent sizes, strides or offset")
        extent = (
            0
            if 0 in sizes
            else offset + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True)) + 1
        )
        if extent > flat.numel():
            raise _refuse(f"'{fqn}' needs {extent} elements of payload '{name}', which holds {flat.numel()}")
        numel = 1
        for size in sizes:
            numel *= size
        budget.take(fqn, numel * flat.element_size())
        try:
            tensor = torch.as_strided(flat, sizes, strides, offset)
            if meta.is_param:
                tensor = torch.nn.Parameter(tensor, requires_grad=bool(tensor_meta.requires_grad))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise _refuse(f"'{fqn}' cannot be built from its payload: {exc}") from exc
        tensors[fqn] = tensor
    return tensors


def _static_int(value: Any) -> int:
    if getattr(value, "type", None) != "as_int" or type(value.value) is not int:
        raise ValueError("a stored tensor has a symbolic size")
    return value.value


def _flat_tensor(archive: zipfile.ZipFile, member: str, dtype: Any, torch: Any) -> Any:
    try:
        data = bytearray(archive.read(member))  # writable: torch.frombuffer shares it
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise _refuse(f"archive member '{member}' cannot be read: {exc}") from exc
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) % itemsize:
        raise _refuse(f"archive member '{member}' holds {len(data)} bytes, not a whole number of {dtype}")
    if not data:
        return torch.empty(0, dtype=dtype)
    try:
        return torch.frombuffer(data, dtype=dtype)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _refuse(f"archive member '{member}' cannot be read as {dtype}: {exc}") from exc


def _deserialize(
    document: dict[str, Any], state_dict: dict[str, Any], constants: dict[str, Any], saved_by: str | None
) -> Any:
    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
        # No example inputs: torch would unpickle them, and the conversion does not need them.
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except (UnsupportedOperatorError, InvalidModelError):
        raise
    except Exception as exc:  # SerializeError, a schema from another torch, a malformed document
        first_line = (str(exc).strip().splitlines() or [""])[0][:400]
        origin = f" (saved by torch {saved_by[:40]})" if saved_by else ""
        raise _refuse(
            f"torch {torch.__version__} cannot read this program{origin}: {type(exc).__name__}: {first_line}"
        ) from exc
