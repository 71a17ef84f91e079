"""torch.export programs (`.pt2`) converted to ONNX (engines.convert), and the SDK's client-side
export (optiforge_client.torch_export).

Real small models, converted and run by ONNX Runtime against PyTorch at batch 1 and 5; an operator
the exporter cannot translate and a custom operator, each named in the error; hostile archives
(paths leaving the archive, pickles and expressions that would run `os.system`, a node target that is
`os.system`, compiled code, bombs), each refused or never run; and proof that `torch.export.load`
itself runs such payloads, which is why the loader is ours.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import pickle
import shlex
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from optiforge_client.torch_export import export_module

from engines.convert import convert_exported_program
from engines.convert.pt2_archive import check_expression
from engines.errors import (
    BackendUnavailableError,
    ConversionError,
    InvalidModelError,
    UnsupportedOperatorError,
)
from engines.ingest.model import inspect_model

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

LIMIT = 64 * 2**20  # max_unpacked_bytes for the tests' archives


class TinyCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: Any) -> Any:
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(self.dropout(x))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # running statistics that are not the identity, as after training
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


class TwoInputs(torch.nn.Module):
    """Features and a per-sample mask of another rank, sharing the batch dim."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)
        self.register_buffer("scale", torch.tensor([0.5, 1.0, 2.0, 4.0]))

    def forward(self, features: Any, mask: Any) -> tuple[Any, Any]:
        hidden = torch.tanh(self.proj(features)) * self.scale
        return hidden * mask.mean(dim=(1, 2)).unsqueeze(1), torch.softmax(hidden, dim=-1)


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def exported(module: Any, args: tuple[Any, ...], path: Path, dynamic_shapes: Any = None) -> Path:
    torch.export.save(torch.export.export(module, args, dynamic_shapes=dynamic_shapes), path)
    return path


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program the SDK exported from a batch of 1 (repeated to 2 for the trace)."""
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt2"
    return export_module(tiny_cnn(), (torch.randn(1, 1, 16, 16),), path)


def rewrite(
    source: Path,
    target: Path,
    *,
    program: Callable[[dict[str, Any]], None] | None = None,
    members: dict[str, bytes] | None = None,
) -> Path:
    """A copy of a .pt2 with its program JSON changed by `program` and `members` (paths relative to
    the top folder) replaced or added."""
    members = dict(members or {})
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            relative = info.filename[len(root) + 1 :]
            data = members.pop(relative, None)
            if data is None:
                data = src.read(info)
                if program is not None and relative == "models/model.json":
                    document = json.loads(data)
                    program(document)
                    data = json.dumps(document).encode()
            dst.writestr(info.filename, data)
        for relative, data in members.items():
            dst.writestr(f"{root}/{relative}", data)
    return target


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


class RunsShell:
    """Unpickled, runs a shell command: what a hostile archive would hide."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


# --- conversion fidelity ------------------------------------------------------------------------


def test_sdk_export_converts_to_a_normal_upload_with_a_dynamic_batch(cnn_pt2: Path, tmp_path: Path) -> None:
    result = convert_exported_program(cnn_pt2, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert result.onnx_path == tmp_path / "out" / "model.onnx"
    assert result.dynamic_dims == {"x": (0,)}
    assert result.opset >= 18 and not result.external_data
    assert any("dynamo exporter" in note for note in result.notes)
    assert any("not read" in note for note in result.notes)  # the pickled example inputs

    info = inspect_model(result.onnx_path)  # the ingest validation any ONNX upload gets
    (spec,) = info.inputs
    assert spec.shape == ("batch", 1, 16, 16) and spec.batch_axis == 0
    assert [out.shape for out in info.outputs] == [("batch", 10)]
    assert info.opset == result.opset

    reference = tiny_cnn()
    for batch in (1, 5):
        x = torch.randn(batch, 1, 16, 16)
        with torch.no_grad():
            expected = reference(x).numpy()
        (got,) = run_onnx(result.onnx_path, {"x": x.numpy()})
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_two_inputs_share_the_batch_dim_at_a_chosen_opset(tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = TwoInputs().eval()
    batch = torch.export.Dim("batch")
    pt2 = exported(
        module,
        (torch.randn(3, 6), torch.rand(3, 2, 5)),
        tmp_path / "two.pt2",
        dynamic_shapes=({0: batch}, {0: batch}),
    )
    result = convert_exported_program(pt2, tmp_path / "out", max_unpacked_bytes=LIMIT, opset=18)
    assert result.opset == 18
    assert result.dynamic_dims == {"features": (0,), "mask": (0,)}
    info = inspect_model(result.onnx_path)
    assert [spec.shape for spec in info.inputs] == [("batch", 6), ("batch", 2, 5)]
    assert all(spec.batch_axis == 0 for spec in (*info.inputs, *info.outputs))
    for size in (1, 5):
        features, mask = torch.randn(size, 6), torch.rand(size, 2, 5)
        with torch.no_grad():
            expected = [tensor.numpy() for tensor in module(features, mask)]
        got = run_onnx(result.onnx_path, {"features": features.numpy(), "mask": mask.numpy()})
        for actual, wanted in zip(got, expected, strict=True):
            np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-6)


def test_a_program_without_dynamic_shapes_stays_static(tmp_path: Path) -> None:
    module = tiny_cnn()
    x = torch.randn(3, 1, 16, 16)
    pt2 = exported(module, (x,), tmp_path / "static.pt2")
    result = convert_exported_program(pt2, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert result.dynamic_dims == {}
    assert inspect_model(result.onnx_path).inputs[0].shape == (3, 1, 16, 16)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(
        run_onnx(result.onnx_path, {"x": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5
    )


# --- what the exporter cannot translate ---------------------------------------------------------


class QR(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        return torch.linalg.qr(x)[0] + 1  # aten.linalg_qr has no ONNX translation in torch 2.13


def test_an_operator_without_onnx_translation_is_named_with_the_exporters_message(tmp_path: Path) -> None:
    pt2 = exported(QR(), (torch.randn(2, 4, 4),), tmp_path / "qr.pt2")
    with pytest.raises(UnsupportedOperatorError) as caught:
        convert_exported_program(pt2, tmp_path / "out", max_unpacked_bytes=LIMIT)
    error = caught.value
    assert error.code == "unsupported_op"
    assert error.operators == ["aten.linalg_qr.default"]
    assert error.to_dict()["operators"] == ["aten.linalg_qr.default"]
    assert "No ONNX function found" in error.detail  # the exporter's own words
    assert "\x1b" not in error.detail and len(error.detail) < 1000
    assert str(Path(torch.__file__).parent) not in error.detail  # no server paths


@torch.library.custom_op("optiforge_test::scale_rows", mutates_args=())
def scale_rows(x: torch.Tensor) -> torch.Tensor:
    return x * torch.arange(1, x.shape[0] + 1, dtype=x.dtype).unsqueeze(1)


@scale_rows.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        return scale_rows(x) + 1


def test_a_custom_operator_is_named_before_anything_is_loaded(tmp_path: Path) -> None:
    pt2 = exported(UsesCustomOp(), (torch.randn(3, 4),), tmp_path / "custom.pt2")
    with pytest.raises(UnsupportedOperatorError) as caught:
        convert_exported_program(pt2, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert caught.value.operators == ["optiforge_test::scale_rows"]
    assert "custom operator" in caught.value.detail
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", [11, 99, True])
def test_an_opset_the_exporter_cannot_write_is_refused_first(
    cnn_pt2: Path, tmp_path: Path, opset: Any
) -> None:
    with pytest.raises(ConversionError) as caught:
        convert_exported_program(cnn_pt2, tmp_path / "out", max_unpacked_bytes=LIMIT, opset=opset)
    assert caught.value.code == "invalid_opset" and "from 18 to" in caught.value.detail
    assert not (tmp_path / "out").exists()


def test_a_worker_without_onnxscript_says_so(
    cnn_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(BackendUnavailableError, match="onnxscript"):
        convert_exported_program(cnn_pt2, tmp_path / "out", max_unpacked_bytes=LIMIT)


# --- hostile archives ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_export_load_itself_runs_what_a_pt2_hides(cnn_pt2: Path, tmp_path: Path) -> None:
    """Why engines.convert has its own loader: torch 2.13's `torch.export.load` unpickles the example
    inputs (falling back to weights_only=False) and sympifies (evals) shape expressions."""
    pickled = tmp_path / "pickled"
    evil = rewrite(
        cnn_pt2,
        tmp_path / "evil1.pt2",
        members={"data/sample_inputs/model.pt": pickle.dumps(RunsShell(touch(pickled)))},
    )
    with contextlib.suppress(Exception):  # it fails afterwards: the command has run by then
        torch.export.load(evil)
    assert pickled.exists()

    evaluated = tmp_path / "evaluated"

    def inject(document: dict[str, Any]) -> None:
        sizes = document["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        expression = sizes[0]["as_expr"]["expr_str"]
        sizes[0]["as_expr"]["expr_str"] = f"__import__('os').system({touch(evaluated)!r}) + {expression}"

    torch.export.load(rewrite(cnn_pt2, tmp_path / "evil2.pt2", program=inject))
    assert evaluated.exists()


def test_pickled_example_inputs_are_never_read(cnn_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = rewrite(
        cnn_pt2,
        tmp_path / "evil.pt2",
        members={"data/sample_inputs/model.pt": pickle.dumps(RunsShell(touch(marker)))},
    )
    result = convert_exported_program(evil, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert result.dynamic_dims == {"x": (0,)}
    assert not marker.exists()


def test_a_pickled_weight_is_refused_unread(cnn_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with zipfile.ZipFile(cnn_pt2) as archive:
        root = archive.namelist()[0].split("/")[0]
        config = json.loads(archive.read(f"{root}/data/weights/model_weights_config.json"))
    fqn = next(iter(config["config"]))
    config["config"][fqn]["use_pickle"] = True
    payload = config["config"][fqn]["path_name"]
    evil = rewrite(
        cnn_pt2,
        tmp_path / "evil.pt2",
        members={
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{payload}": pickle.dumps(RunsShell(touch(marker))),
        },
    )
    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(evil, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert caught.value.code == "pickle_refused" and fqn in caught.value.detail
    assert not marker.exists()


def test_an_expression_that_is_code_is_refused_unevaluated(cnn_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def inject(document: dict[str, Any]) -> None:
        sizes = document["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = f"__import__('os').system({touch(marker)!r})"

    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(
            rewrite(cnn_pt2, tmp_path / "evil.pt2", program=inject),
            tmp_path / "out",
            max_unpacked_bytes=LIMIT,
        )
    assert caught.value.code == "invalid_torch_program"
    assert not marker.exists()


def test_a_target_that_is_not_an_operator_is_refused(cnn_pt2: Path, tmp_path: Path) -> None:
    def retarget(document: dict[str, Any]) -> None:
        document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"  # getattr(torch, "os")

    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(
            rewrite(cnn_pt2, tmp_path / "evil.pt2", program=retarget),
            tmp_path / "out",
            max_unpacked_bytes=LIMIT,
        )
    assert caught.value.code == "invalid_torch_program"
    assert "torch.os.system" in caught.value.detail


def test_guards_are_dropped_not_run(cnn_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    def guard(document: dict[str, Any]) -> None:
        document["guards_code"] = [f"__import__('os').system({touch(marker)!r}) == 0"]

    result = convert_exported_program(
        rewrite(cnn_pt2, tmp_path / "guarded.pt2", program=guard), tmp_path / "out", max_unpacked_bytes=LIMIT
    )
    assert any("guard" in note for note in result.notes)
    assert not marker.exists()


@pytest.mark.parametrize(
    "member", ["../escape.txt", "cnn/../../escape.txt", "/etc/cron.d/evil", "cnn\\..\\escape.txt", "C:/evil"]
)
def test_members_leaving_the_archive_are_refused(cnn_pt2: Path, tmp_path: Path, member: str) -> None:
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(cnn_pt2) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(member, b"x")
    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(evil, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert caught.value.code == "archive_path_traversal"
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("build", "code", "words"),
    [
        (
            lambda path: path.write_bytes(b"\x08\x07\x12\x07pytorch"),
            "invalid_torch_program",
            "zip",
        ),  # ONNX bytes
        (lambda path: path.write_bytes(b""), "empty_file", "empty"),
        (lambda path: write_zip(path, {"notes/readme.txt": b"hi"}), "invalid_torch_program", "not part of"),
    ],
    ids=["not-a-zip", "empty", "zip-of-something-else"],
)
def test_files_that_are_not_programs_are_refused(
    tmp_path: Path, build: Callable[[Path], Any], code: str, words: str
) -> None:
    path = tmp_path / "upload.pt2"
    build(path)
    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(path, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert caught.value.code == code and words in caught.value.detail


def test_compiled_code_and_damaged_archives_are_refused(cnn_pt2: Path, tmp_path: Path) -> None:
    aoti = rewrite(cnn_pt2, tmp_path / "aoti.pt2", members={"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(InvalidModelError, match="AOTInductor") as caught:
        convert_exported_program(aoti, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert caught.value.code == "invalid_torch_program"

    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(cnn_pt2.read_bytes()[:2000])
    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(truncated, tmp_path / "out", max_unpacked_bytes=LIMIT)
    assert caught.value.code == "invalid_torch_program"


def test_declared_sizes_over_the_limit_are_refused_before_reading(cnn_pt2: Path, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(cnn_pt2) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        root = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(f"{root}/extra/zeros.bin", bytes(8 * 2**20))  # 8 MiB, deflated to a few KiB
    assert bomb.stat().st_size < 2**20
    with pytest.raises(InvalidModelError) as caught:
        convert_exported_program(bomb, tmp_path / "out", max_unpacked_bytes=4 * 2**20)
    assert caught.value.code == "upload_too_large"


@pytest.mark.parametrize(
    "expression",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(6), Symbol('s17', positive=True, integer=True))",
        "FloorDiv(s0, 2) + Max(1, s1)",
        "Pow(s0, -1)",
        "Float('0.5', precision=53)",
    ],
)
def test_shape_expressions_torch_writes_pass(expression: str) -> None:
    check_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('id')",
        "s0.__class__",
        "lambda: 0",
        "preview(s0, viewer='file', filename='x')",
        "Symbol('s0')[0]",
        "Pow(Integer(10), Integer(999999999))",
        "99**99**99",
        "Float('1.5', precision=99999999999)",
        "Pow(Integer(99), Pow(Integer(99), Integer(99)))",
        "eval('1')",
    ],
)
def test_shape_expressions_that_are_code_are_refused(expression: str) -> None:
    with pytest.raises(InvalidModelError):
        check_expression(expression)


# --- the SDK's export ---------------------------------------------------------------------------


def test_export_module_keeps_the_modules_mode_and_can_stay_static(tmp_path: Path) -> None:
    module = tiny_cnn().train()
    path = export_module(module, torch.randn(4, 1, 16, 16), tmp_path / "static.pt2", dynamic_batch=False)
    assert module.training  # traced in eval mode, then put back
    with zipfile.ZipFile(path) as archive:
        document = json.loads(
            next(archive.read(n) for n in archive.namelist() if n.endswith("models/model.json"))
        )
    assert document["range_constraints"] == {}  # nothing dynamic
    modes = {
        node["target"].split(".")[3]: argument["arg"]
        for node in document["graph_module"]["graph"]["nodes"]
        for argument in node["inputs"]
        if argument["name"] in ("training", "train")
    }
    assert modes == {"batch_norm": {"as_bool": False}, "dropout": {"as_bool": False}}  # traced in eval mode


class FixedBatch(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        return x.view(2, -1)


def test_export_module_explains_a_module_that_fixes_its_batch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dynamic_batch=False"):
        export_module(FixedBatch(), (torch.randn(2, 3),), tmp_path / "fixed.pt2")
    assert export_module(
        FixedBatch(), (torch.randn(2, 3),), tmp_path / "fixed.pt2", dynamic_batch=False
    ).exists()


def test_export_module_without_torch_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as where it is absent
    with pytest.raises(ImportError, match="pip install torch"):
        export_module(object(), (), tmp_path / "m.pt2")


def test_the_sdk_module_imports_without_torch() -> None:
    """optiforge_client.torch_export imports torch only inside the function (the SDK has no torch)."""
    source = Path(sys.modules["optiforge_client.torch_export"].__file__ or "").read_text()
    top_level = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all("torch" not in ast.unparse(node) for node in top_level)
