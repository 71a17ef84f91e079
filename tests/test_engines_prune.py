"""Pruning on the digits CNN through the library: every criterion, recovery, magnitude, pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.errors import InvalidRecipeError
from engines.ingest.datasets import Dataset
from engines.measure.latency import MeasureConfig
from engines.pipeline import run_recipe
from engines.prune.finetune import FinetuneConfig
from engines.prune.methods import PruneConfig, check_prune_config
from engines.recipe import Recipe
from engines.torch_bridge import _inline_identity_initializers, onnx_to_torch
from tests.conftest import QUICK_MEASURE, DigitsArtifacts

FAST = MeasureConfig(**QUICK_MEASURE)


@pytest.fixture(scope="module")
def labelled_train(digits: DigitsArtifacts) -> Dataset:
    return Dataset({"input": digits.split.train_x}, digits.split.train_y)


@pytest.fixture(scope="module")
def bn_model(digits: DigitsArtifacts) -> Path:
    return digits.bn_onnx_path


@pytest.mark.parametrize("method", ["l1", "taylor", "fpgm", "random"])
def test_structured_pruning_shrinks_and_keeps_the_signature(
    digits: DigitsArtifacts, labelled_train: Dataset, evaluation: Dataset, tmp_path: Path, method: str
) -> None:
    recipe = Recipe(prune=PruneConfig(method=method, ratio=0.3), batch_sizes=(8,), measure=FAST)
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=labelled_train)
    (engine,) = result.engines
    prune = engine.artifact.metadata["prune"]
    assert prune["method"] == method and prune["macs_after"] * 2 <= prune["macs_before"]
    assert prune["params_after"] < prune["params_before"] and prune["kept_whole"] == ["13/Gemm"]
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    assert [o.name for o in pruned.graph.output] == ["logits"] and pruned.graph.input[0].name == "input"
    conv_widths = [i.dims[0] for i in pruned.graph.initializer if len(i.dims) == 4]
    assert all(width % 8 == 0 for width in conv_widths), conv_widths


def test_distillation_recovers_accuracy(
    digits: DigitsArtifacts, labelled_train: Dataset, evaluation: Dataset, tmp_path: Path
) -> None:
    recipe = Recipe(
        prune=PruneConfig("l1", 0.3), finetune=FinetuneConfig(epochs=4), batch_sizes=(8,), measure=FAST
    )
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=labelled_train)
    prune = result.engines[0].artifact.metadata["prune"]
    assert prune["top1_after_finetune"] > prune["top1_after_pruning"] + 0.3
    assert len(prune["finetune"]["history"]) == 4
    assert result.engines[0].measurement.accuracy["top1"] == pytest.approx(
        prune["top1_after_finetune"], abs=0.01
    )


def test_pipeline_prune_then_int8_reports_a_row_per_stage(
    digits: DigitsArtifacts, labelled_train: Dataset, evaluation: Dataset, tmp_path: Path
) -> None:
    recipe = Recipe(
        precision="int8",
        prune=PruneConfig("l1", 0.3),
        finetune=FinetuneConfig(epochs=2),
        batch_sizes=(8,),
        measure=FAST,
    )
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation, calibration=labelled_train)
    assert [engine.artifact.precision for engine in result.engines] == ["fp32", "int8"]
    assert all(engine.artifact.metadata["prune"]["macs"] < 2_507_392 for engine in result.engines)


def test_magnitude_pruning_reports_sparsity_and_says_it_is_not_faster(
    digits: DigitsArtifacts, evaluation: Dataset, tmp_path: Path
) -> None:
    recipe = Recipe(prune=PruneConfig("magnitude", sparsity=0.5), batch_sizes=(8,), measure=FAST)
    result = run_recipe(digits.onnx_path, recipe, tmp_path, evaluation=evaluation)
    prune = result.engines[0].artifact.metadata["prune"]
    assert prune["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert prune["compressed_bytes"] < prune["compressed_bytes_original"]
    assert any("not speed" in message for message in result.messages)


def test_slimming_needs_batchnorm(
    digits: DigitsArtifacts, bn_model: Path, labelled_train: Dataset, tmp_path: Path
) -> None:
    folded = {node.op_type: 1 for node in onnx.load(str(digits.onnx_path)).graph.node}
    with pytest.raises(InvalidRecipeError, match=r"TrainingMode\.PRESERVE"):
        check_prune_config(PruneConfig("slimming"), folded)
    kept = {node.op_type: 1 for node in onnx.load(str(bn_model)).graph.node}
    check_prune_config(PruneConfig("slimming"), kept)
    recipe = Recipe(prune=PruneConfig("slimming", 0.3), batch_sizes=(8,), measure=FAST)
    result = run_recipe(bn_model, recipe, tmp_path, calibration=labelled_train)
    assert result.engines[0].artifact.metadata["prune"]["macs_reduction"] >= 2


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (PruneConfig(ratio=1.0), "ratio"),
        (PruneConfig(ratio=0.0), "ratio"),
        (PruneConfig("magnitude", sparsity=1.5), "sparsity"),
        (PruneConfig("obd"), "unknown pruning method"),
    ],
)
def test_bad_prune_configs(config: PruneConfig, fragment: str) -> None:
    with pytest.raises(InvalidRecipeError, match=fragment):
        check_prune_config(config, {"BatchNormalization": 1})


def test_identity_initializers_are_inlined_and_unconvertible_ops_named(
    digits: DigitsArtifacts, tmp_path: Path
) -> None:
    from onnx import helper

    model = onnx.load(str(digits.onnx_path))
    weight = model.graph.node[0].input[1]
    model.graph.node.insert(0, helper.make_node("Identity", [weight], ["shared_weight"]))
    model.graph.node[1].input[1] = "shared_weight"
    _inline_identity_initializers(model)
    assert "Identity" not in {node.op_type for node in model.graph.node}
    onnx.save(model, tmp_path / "identity.onnx")
    assert onnx_to_torch(tmp_path / "identity.onnx") is not None

    custom = onnx.load(str(digits.onnx_path))
    custom.graph.node.append(helper.make_node("Frobnicate", ["logits"], ["z"], domain="com.example"))
    custom.graph.output[0].name = "z"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(custom, tmp_path / "custom.onnx")
    from engines.errors import EngineError

    with pytest.raises(EngineError, match="Frobnicate"):
        onnx_to_torch(tmp_path / "custom.onnx")


def test_a_model_that_cannot_be_converted_skips_pruning_with_the_reason(
    digits: DigitsArtifacts, tmp_path: Path
) -> None:
    from onnx import helper

    from engines.prune.stage import run_prune_stage

    custom = onnx.load(str(digits.onnx_path))
    custom.graph.node.append(helper.make_node("Frobnicate", ["logits"], ["z"], domain="com.example"))
    custom.graph.output[0].name = "z"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(custom, tmp_path / "custom.onnx")
    stage = run_prune_stage(
        tmp_path / "custom.onnx",
        PruneConfig(),
        None,
        tmp_path,
        inputs=[],
        output_names=["z"],
        calibration=None,
        evaluation=None,
        progress=lambda fraction, stage: None,
        check_cancelled=lambda: None,
    )
    assert not stage.pruned and stage.path == tmp_path / "custom.onnx"
    assert stage.messages[0].startswith("pruning skipped") and "Frobnicate" in stage.messages[0]


def test_network_slimming_sparsity_training(
    bn_model: Path, labelled_train: Dataset, evaluation: Dataset, tmp_path: Path
) -> None:
    config = PruneConfig("slimming", 0.3, sparsity_epochs=2, sparsity_lambda=1e-3)
    recipe = Recipe(prune=config, finetune=FinetuneConfig(epochs=2), batch_sizes=(8,), measure=FAST)
    result = run_recipe(bn_model, recipe, tmp_path, evaluation=evaluation, calibration=labelled_train)
    prune = result.engines[0].artifact.metadata["prune"]
    assert len(prune["sparsity_training"]["history"]) == 2 and prune["sparsity_training"]["lambda"] == 1e-3
    assert prune["top1_after_finetune"] > 0.8
    with pytest.raises(InvalidRecipeError, match="slimming"):
        check_prune_config(PruneConfig("l1", sparsity_epochs=2), {})


def test_opset18_reductions_convert(tmp_path: Path) -> None:
    """Dynamo exports (opset 18) give ReduceMean its axes as an input: registered through onnx2torch."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from engines.torch_bridge import unconvertible_ops

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "mean.onnx")
    assert unconvertible_ops(["ReduceMean", "Conv"], 18) == []
    assert unconvertible_ops(["Frobnicate"], 18) == ["Frobnicate"]
    module = onnx_to_torch(tmp_path / "mean.onnx")
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    torch.testing.assert_close(module(x), x.mean(dim=2))


def test_static_batch_survives_pruning(
    digits: DigitsArtifacts, labelled_train: Dataset, tmp_path: Path
) -> None:
    recipe = Recipe(prune=PruneConfig("l1", 0.3), batch_sizes=(1,), measure=FAST)
    result = run_recipe(digits.static_batch_onnx_path, recipe, tmp_path, calibration=labelled_train)
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert result.engines[0].artifact.metadata["prune"]["macs"] < 2_507_392


def test_taylor_without_labels_uses_pseudo_labels(digits: DigitsArtifacts, tmp_path: Path) -> None:
    unlabelled = Dataset({"input": digits.split.train_x[:256]}, None)
    recipe = Recipe(prune=PruneConfig("taylor", 0.3), batch_sizes=(8,), measure=FAST)
    result = run_recipe(digits.onnx_path, recipe, tmp_path, calibration=unlabelled)
    assert result.engines[0].artifact.metadata["prune"]["macs_after"] < 2_507_392


def test_a_two_input_model_skips_pruning_but_keeps_its_engines(tmp_path: Path) -> None:
    import torch

    class TwoBranch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(1, 16, 3, padding=1)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x, y):
            features = torch.cat([self.a(x), self.b(y)], dim=1).mean(dim=(2, 3))
            return self.head(features)

    path = tmp_path / "two.onnx"
    torch.onnx.export(
        TwoBranch().eval(),
        (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)),
        str(path),
        input_names=["x", "y"],
        output_names=["out"],
        dynamic_axes={"x": {0: "b"}, "y": {0: "b"}, "out": {0: "b"}},
        opset_version=17,
        dynamo=False,
    )
    data = Dataset({"x": np.ones((16, 1, 8, 8), np.float32), "y": np.ones((16, 1, 8, 8), np.float32)}, None)
    recipe = Recipe(precision="int8", prune=PruneConfig("taylor", 0.5), batch_sizes=(4,), measure=FAST)
    result = run_recipe(path, recipe, tmp_path / "run", calibration=data)
    assert result.engines, result.messages
    pruned_or_skipped = [m for m in result.messages if m.startswith("pruning skipped")]
    assert pruned_or_skipped or "prune" in result.engines[0].artifact.metadata


def test_sensitivity_ratios_stop_at_the_first_ratio_over_budget() -> None:
    from engines.prune.sensitivity import ratios_within

    report = {
        "layers": {
            "a": {"0.1": 0.0, "0.3": 0.05, "0.5": 0.0},
            "b": {"0.1": None, "0.3": None},
            "c": {"0.1": 0.0, "0.3": 0.005},
        }
    }
    assert ratios_within(report, 0.01) == {"a": 0.1, "b": 0.0, "c": 0.3}


def test_reinserted_batchnorm_is_the_identity_and_folds_back(digits: DigitsArtifacts) -> None:
    """Fine-tuning trains the folded CNN with a BatchNorm after each conv: exact both ways, and
    folded back even when an epoch callback stops training."""
    import torch

    from engines.errors import Cancelled
    from engines.prune.finetune import finetune, fold_batchnorm, insert_batchnorm

    module = onnx_to_torch(digits.onnx_path)
    data = Dataset({"input": digits.split.train_x[:128]}, digits.split.train_y[:128])
    x = torch.from_numpy(digits.split.test_x[:32])
    before = module.eval()(x).detach()
    names = insert_batchnorm(module, data, 16)
    assert names == ["0/Conv", "4/Conv", "8/Conv"]  # not the Gemm head
    torch.testing.assert_close(module.eval()(x).detach(), before, atol=1e-4, rtol=1e-4)
    fold_batchnorm(module, names)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in module.modules())
    torch.testing.assert_close(module.eval()(x).detach(), before, atol=1e-4, rtol=1e-4)

    def stop(epoch: int, stats: dict[str, float]) -> None:
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        finetune(module, onnx_to_torch(digits.onnx_path), data, FinetuneConfig(epochs=2), on_epoch=stop)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in module.modules())
    assert module(x).shape == (32, 10)


def test_recovery_defaults_beat_no_recovery_and_keep_up_with_cross_entropy(
    digits: DigitsArtifacts, evaluation: Dataset
) -> None:
    """Regression for the recovery defaults (issue: distillation ended 2.4 points down and trailed
    plain cross-entropy). L1 at 0.3, 3 epochs on 512 training images: the former defaults reached
    about 0.79 top-1 here, the current ones about 0.96. bench/prune.py has the full-size table."""
    import torch

    from engines.prune.finetune import finetune
    from engines.prune.methods import prune_structured
    from engines.torch_bridge import torch_outputs

    n = 512
    labelled = Dataset({"input": digits.split.train_x[:n]}, digits.split.train_y[:n])
    unlabelled = Dataset({"input": digits.split.train_x[:n]}, None)

    def pruned() -> object:
        module = onnx_to_torch(digits.onnx_path)
        example = (torch.from_numpy(digits.split.train_x[:2]),)
        prune_structured(module, example, PruneConfig("l1", 0.3))
        return module

    def top1(module: object) -> float:
        logits = torch_outputs(module, evaluation)
        return float((logits.argmax(1) == evaluation.labels).mean())

    def recovered(config: FinetuneConfig, data: Dataset) -> float:
        module = pruned()
        finetune(module, onnx_to_torch(digits.onnx_path), data, config)
        return top1(module)

    unpruned = top1(onnx_to_torch(digits.onnx_path))
    none = top1(pruned())
    cross_entropy = recovered(FinetuneConfig(epochs=3, distill=False), labelled)
    distilled = recovered(FinetuneConfig(epochs=3), labelled)
    pure = recovered(FinetuneConfig(epochs=3), unlabelled)
    assert none < 0.6 < 0.93 < min(distilled, pure), (none, distilled, pure)
    assert unpruned - min(distilled, pure) < 0.05, (unpruned, distilled, pure)
    scores = (cross_entropy, distilled, pure)
    assert distilled >= cross_entropy - 0.015 and pure >= cross_entropy - 0.02, scores
