"""Transformer graph optimization (engines.graphopt) on small graphs in the layouts the exporters
write (tests.transformer_graphs): the model type, heads and hidden size read from the graph (a
Llama decoder's too: RMSNorm, rotary positions, grouped-query attention, a causal mask from a Trilu
or from position comparisons); ONNX Runtime's fusions counted, what they left named with a reason;
outputs within cosine 0.9999 of the unfused model in real ONNX Runtime sessions; a CNN, and attention
the optimizer has no type for, left alone with a message; stated values the graph contradicts and
heads nobody can find refused as 422s when a job is made; the stage in a job end to end, in the
search, and the OpenVINO decision measured."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.errors import InvalidRecipeError
from engines.graphopt.config import AUTO, GraphOptConfig
from engines.graphopt.detect import HEADS_UNKNOWN, MISMATCH, detect, plan_fusion
from engines.graphopt.fidelity import FUSION_MIN_COSINE
from engines.graphopt.model_types import MODEL_TYPES, ModelType, optimizer_lacks, register
from engines.graphopt.stage import METADATA_KEY, run_graph_stage
from engines.ingest.datasets import Dataset
from engines.ingest.model import inspect_model
from tests.conftest import QUICK_MEASURE, LocalApi
from tests.transformer_graphs import bert_encoder, gpt2_decoder, llama_decoder, small_cnn, vit_encoder

SEQUENCE = 16


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    return {
        "bert": bert_encoder(root / "bert.onnx"),
        "bert-constant": bert_encoder(root / "bert-constant.onnx", head_shape="constant"),
        "bert-runtime": bert_encoder(root / "bert-runtime.onnx", head_shape="runtime"),
        "vit": vit_encoder(root / "vit.onnx"),
        "gpt2": gpt2_decoder(root / "gpt2.onnx"),
        "llama": llama_decoder(root / "llama.onnx"),
        "llama-range": llama_decoder(root / "llama-range.onnx", mask="range"),
        "llama-mha": llama_decoder(root / "llama-mha.onnx", kv_heads=4),
        "rms-rotary-encoder": llama_decoder(root / "rms-rotary-encoder.onnx", mask="none"),
        "bert-where": bert_encoder(root / "bert-where.onnx", padding_where=True),
        "cnn": small_cnn(root / "cnn.onnx"),
    }


def token_data(samples: int = 12, seed: int = 0) -> Dataset:
    """Token ids with padding at the end of most rows, the masks that say so, token types zero."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(samples, SEQUENCE)).astype(np.int64)
    mask = np.ones((samples, SEQUENCE), dtype=np.int64)
    for row in range(samples):
        length = int(rng.integers(4, SEQUENCE + 1))
        ids[row, length:], mask[row, length:] = 0, 0
    return Dataset({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, None)


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("name", "model_type"),
    [("bert", "bert"), ("bert-constant", "bert"), ("bert-where", "bert"), ("vit", "vit"), ("gpt2", "gpt2")],
)
def test_the_model_type_heads_and_hidden_size_are_read_from_the_graph(
    graphs, name: str, model_type: str
) -> None:
    found = detect(onnx.load(str(graphs[name])))
    assert (found.model_type, found.num_heads, found.hidden_size) == (model_type, 4, 32), found
    assert found.attention_blocks == 2 and found.layer_norm_widths == (32,)


def decoder_tokens(samples: int = 6, seed: int = 1) -> Dataset:
    """A decoder's inputs: token ids and right-padded masks, no token types."""
    data = token_data(samples, seed)
    return Dataset({name: data.inputs[name] for name in ("input_ids", "attention_mask")}, None)


@pytest.mark.parametrize("name", ["llama", "llama-range"])
def test_a_llama_decoder_is_recognised_with_its_grouped_heads(graphs, name: str) -> None:
    """SmolLM2's export (RMSNorm, rotary positions, 4 query heads over 2 K/V heads, head size -1, a
    causal mask from a Trilu three nodes below the scores' Add, no token_type_ids) read as bert with
    unknown heads: a 422 for a recipe on "auto". Through the rotary Add and the K/V repeat, the heads
    and the mask are found; a Where over position comparisons is causal too."""
    found = detect(onnx.load(str(graphs[name])))
    assert (found.model_type, found.num_heads, found.hidden_size, found.kv_heads) == ("llama", 4, 32, 2), (
        found
    )
    assert found.attention_blocks == 2 and found.layer_norm_widths == ()
    assert found.patterns["rms_norm_decomposed"] == 5 and found.patterns["rotary"] == 4
    for part in ("causal self-attention", "RMSNorm", "rotary", "4 query heads over 2 key/value heads"):
        assert part in found.type_reason, found.type_reason
    plan = plan_fusion(GraphOptConfig(AUTO), found)
    assert (plan.model_type, plan.num_heads, plan.hidden_size, plan.skip) == ("llama", 4, 32, None)
    assert MODEL_TYPES["llama"].ort_type == "qwen3" and optimizer_lacks("llama") is None
    mha = detect(onnx.load(str(graphs["llama-mha"])))  # as many K/V heads as query heads
    assert (mha.model_type, mha.num_heads, mha.hidden_size, mha.kv_heads) == ("llama", 4, 32, None)


def test_a_where_over_a_padding_mask_is_not_a_causal_mask(graphs) -> None:
    found = detect(onnx.load(str(graphs["bert-where"])))
    assert found.model_type == "bert" and "bidirectional" in found.type_reason


def test_rms_norm_and_rotary_attention_without_a_causal_mask_run_unfused_and_say_why(graphs) -> None:
    """Neither bert (whose fusion does not match RMSNorm or rotary positions) nor a decoder: auto
    never refuses it; it runs unfused, saying what the graph has and how to state a type."""
    found = detect(onnx.load(str(graphs["rms-rotary-encoder"])))
    assert found.model_type is None and (found.num_heads, found.hidden_size) == (4, 32)
    assert "no causal mask" in found.type_reason and "no token_type_ids input" in found.type_reason
    plan = plan_fusion(GraphOptConfig(AUTO), found)
    assert plan.skip and plan.skip.startswith("not identified as a model type the optimizer knows")
    assert "it runs unfused" in plan.skip and '"num_heads": 4' in plan.skip


def test_a_type_the_installed_optimizer_lacks_runs_unfused(graphs) -> None:
    """A registered type whose ONNX Runtime type is not in the installed optimizer's MODEL_TYPES (as
    qwen3, which llama maps onto, is not in older ONNX Runtimes): unfused, stated or detected."""
    register(ModelType("future", "no_such_ort_type", "a type a newer ONNX Runtime has", detected=False))
    try:
        assert "has no 'no_such_ort_type' model type" in (optimizer_lacks("future") or "")
        plan = plan_fusion(GraphOptConfig("future"), detect(onnx.load(str(graphs["llama"]))))
        assert (
            plan.model_type is None and plan.skip and plan.skip.startswith("unfused: the model type future")
        )
    finally:
        del MODEL_TYPES["future"]
        optimizer_lacks.cache_clear()


def test_a_cnn_has_no_attention_and_is_not_identified(graphs) -> None:
    found = detect(onnx.load(str(graphs["cnn"])))
    assert found.model_type is None and found.attention_blocks == 0 and "no attention" in found.type_reason
    plan = plan_fusion(GraphOptConfig(AUTO), found)
    assert plan.skip and "not identified as a transformer" in plan.skip


def test_heads_computed_at_run_time_are_a_422_unless_stated(graphs) -> None:
    found = detect(onnx.load(str(graphs["bert-runtime"])))
    assert found.model_type == "bert" and found.num_heads is None and found.hidden_size == 32
    with pytest.raises(InvalidRecipeError) as refused:
        plan_fusion(GraphOptConfig(AUTO), found)
    assert refused.value.code == HEADS_UNKNOWN
    assert (
        '"num_heads": <num_attention_heads>' in refused.value.detail
        and '"hidden_size": 32' in refused.value.detail
    )
    plan = plan_fusion(GraphOptConfig("bert", num_heads=4, hidden_size=32), found)
    assert (plan.num_heads, plan.hidden_size, plan.skip) == (4, 32, None)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (GraphOptConfig("bert", num_heads=8), "state num_heads 4"),
        (GraphOptConfig(AUTO, hidden_size=64), "state hidden_size 32"),
    ],
)
def test_stated_values_the_graph_contradicts_are_refused(
    graphs, config: GraphOptConfig, fragment: str
) -> None:
    with pytest.raises(InvalidRecipeError) as refused:
        plan_fusion(config, detect(onnx.load(str(graphs["bert"]))))
    assert refused.value.code == MISMATCH and fragment in refused.value.detail


def test_a_stated_type_on_a_model_without_attention_is_refused(graphs) -> None:
    with pytest.raises(InvalidRecipeError) as refused:
        plan_fusion(GraphOptConfig("bert"), detect(onnx.load(str(graphs["cnn"]))))
    assert refused.value.code == MISMATCH and "nothing to fuse" in refused.value.detail


# ---------------------------------------------------------------- the stage


def _stage(path: Path, tmp_path: Path, data: Dataset | None = None, **kwargs):
    return run_graph_stage(
        path,
        kwargs.pop("config", GraphOptConfig(AUTO)),
        tmp_path / "graphopt",
        targets=kwargs.pop("targets", ["onnxruntime-cpu"]),
        inputs=list(inspect_model(path).inputs),
        data=data,
        data_name="evaluation",
        **kwargs,
    )


def test_bert_fuses_fully_and_keeps_its_outputs(graphs, tmp_path: Path) -> None:
    data = token_data()
    stage = _stage(graphs["bert"], tmp_path, data)
    assert stage.report["fused"] == {
        "Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4
    }  # fmt: skip
    assert stage.report["not_fused"] == [] and stage.fused_path is not None
    fidelity = stage.report["fidelity"]
    assert (
        fidelity["faithful"]
        and fidelity["min_cosine"] >= FUSION_MIN_COSINE
        and fidelity["data"] == "evaluation"
    )
    assert "fused Attention ×2" in stage.messages[0] and "bert, 4 heads, hidden 32" in stage.messages[0]
    # measured again here, on every sample, in sessions of our own
    fused_graph = onnx.load(str(stage.fused_path))
    assert {node.op_type for node in fused_graph.graph.node} >= {"Attention", "SkipLayerNormalization"}
    feeds = data.feeds(np.arange(data.samples))
    assert (
        _min_cosine(_outputs(stage.fused_path, feeds)[0], _outputs(graphs["bert"], feeds)[0])
        >= FUSION_MIN_COSINE
    )
    # fp32 starts from the fused graph; static INT8 from the unfused one, saying why
    assert stage.source_for("onnxruntime-cpu", "fp32") == stage.fused_path
    assert stage.source_for("onnxruntime-cpu", "int8") == graphs["bert"]


def test_a_vit_fuses_attention_and_layer_norms(graphs, tmp_path: Path) -> None:
    stage = _stage(graphs["vit"], tmp_path)  # generated pixels
    assert stage.report["fused"]["Attention"] == 2 and stage.report["fused"]["SkipLayerNormalization"] == 4
    assert stage.report["fidelity"]["data"] == "generated" and stage.report["fidelity"]["faithful"]


def test_what_the_optimizer_did_not_fuse_is_named_with_a_reason(graphs, tmp_path: Path) -> None:
    """The GPT-2 graph's attention is not the layout ONNX Runtime's gpt2 fusion matches: the other
    fusions happen, the attention blocks are reported left unfused, with a reason."""
    stage = _stage(graphs["gpt2"], tmp_path)
    assert stage.report["fused"]["FastGelu"] == 2 and "Attention" not in stage.report["fused"]
    [left] = stage.report["not_fused"]
    assert left["fusion"] == "attention" and left["expected"] == 2 and left["left"] == 2 and left["reason"]
    assert "not fused: 2 of 2 attention" in stage.messages[0]
    assert stage.fused_path is not None and stage.report["fidelity"]["faithful"]


def test_a_llama_decoder_fuses_its_rms_norms_and_names_what_it_left(graphs, tmp_path: Path) -> None:
    """ONNX Runtime's qwen3 type (decoders with RoPE, GQA, RMSNorm) fuses the RMSNorms into
    SimplifiedLayerNormalization and, after a residual Add, SkipSimplifiedLayerNormalization; its
    rotary fusions do not match this export (nor SmolLM2's), and the report says so with the
    optimizer's own words. The fused model's logits stay within cosine 0.9999 on padded rows."""
    data = decoder_tokens()
    stage = _stage(graphs["llama"], tmp_path, data)
    assert stage.report["model_type"] == "llama"
    assert stage.report["fused"] == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    left = {item["fusion"]: item for item in stage.report["not_fused"]}
    assert set(left) == {"attention", "rotary"} and all(item["reason"] for item in left.values())
    assert (left["rotary"]["expected"], left["attention"]["expected"]) == (4, 2)
    assert stage.report["fidelity"]["faithful"] and stage.report["fidelity"]["data"] == "evaluation"
    assert stage.messages[0].startswith("graph optimization (llama, 4 heads, hidden 32): fused ")
    feeds = data.feeds(np.arange(data.samples))
    assert (
        _min_cosine(_outputs(stage.fused_path, feeds)[0], _outputs(graphs["llama"], feeds)[0])
        >= FUSION_MIN_COSINE
    )


def test_a_model_that_is_not_a_transformer_runs_unfused_and_says_so(graphs, tmp_path: Path) -> None:
    stage = _stage(graphs["cnn"], tmp_path)
    assert stage.fused_path is None and stage.report["kept"] == "unfused"
    assert stage.messages == [
        "graph optimization: not identified as a transformer: no attention found (no Softmax between a "
        "Q·Kᵀ MatMul and a ·V MatMul); it runs unfused"
    ]
    assert stage.source_for("onnxruntime-cpu", "fp32") == graphs["cnn"]


def test_a_model_optimized_already_is_left_as_it_is(graphs, tmp_path: Path) -> None:
    fused = _stage(graphs["bert"], tmp_path / "first").fused_path
    again = _stage(fused, tmp_path / "again")
    assert again.fused_path is None and "already optimized" in again.messages[0]


def test_each_backend_gets_the_faster_model_on_its_own_runner_and_torch_the_unfused_one(
    graphs, tmp_path: Path
) -> None:
    from engines.backends.registry import get_backend, unavailable_reason
    from engines.pipeline import built_runner

    if unavailable_reason("openvino-cpu"):
        pytest.skip("OpenVINO is not installed")

    def runner_for(target: str, path: Path):
        return built_runner(get_backend(target), tmp_path / "checks" / target, None, path)

    stage = _stage(
        graphs["bert"], tmp_path, token_data(), targets=["onnxruntime-cpu", "openvino-cpu", "torch-cpu"],
        runner_for=runner_for,
    )  # fmt: skip
    targets = stage.report["targets"]
    for name in ("onnxruntime-cpu", "openvino-cpu"):  # both read the fused graph; which is faster is measured
        assert targets[name]["reason"].startswith(f"measured on {name}: fused p50"), targets[name]
        assert set(targets[name]["latency_ms"]) == {"fused", "unfused"}
        fused = targets[name]["model"] == "fused"
        assert stage.source_for(name, "fp32") == (stage.fused_path if fused else graphs["bert"])
    assert targets["torch-cpu"]["model"] == "unfused" and "com.microsoft" in targets["torch-cpu"]["reason"]
    metadata = stage.build("torch-cpu", "fp32", lambda path: _Variant(path), [])
    assert metadata.metadata[METADATA_KEY]["built_from"]["model"] == "unfused"


class _Variant:
    def __init__(self, path: Path):
        self.path, self.metadata = path, {}


def test_a_variant_that_cannot_be_built_from_the_fused_graph_is_built_from_the_unfused_one(
    graphs, tmp_path: Path
) -> None:
    from engines.errors import EngineError

    stage = _stage(graphs["bert"], tmp_path)
    messages: list[str] = []

    def make(path: Path) -> _Variant:
        if path == stage.fused_path:
            raise EngineError("no kernel for the fused operator", code="quantization_failed")
        return _Variant(path)

    variant = stage.build("onnxruntime-cpu", "fp16", make, messages)
    assert (
        variant.path == graphs["bert"] and variant.metadata[METADATA_KEY]["built_from"]["model"] == "unfused"
    )
    assert "could not be built from the fused graph" in messages[0]


# ---------------------------------------------------------------- in a job, in the search


def test_a_recipe_runs_the_stage_before_its_precision(graphs, tmp_path: Path) -> None:
    from engines.measure.latency import MeasureConfig
    from engines.pipeline import run_recipe
    from engines.recipe import Recipe

    recipe = Recipe(
        batch_sizes=(2,), graph_optimization=GraphOptConfig(AUTO), measure=MeasureConfig(**QUICK_MEASURE)
    )
    result = run_recipe(graphs["bert"], recipe, tmp_path, evaluation=token_data())
    [engine] = result.engines
    report = engine.artifact.metadata[METADATA_KEY]
    assert report["fused"]["Attention"] == 2 and report["kept"] == "fused"
    timed = report["targets"]["onnxruntime-cpu"]  # built from whichever measured faster there
    assert report["built_from"]["model"] == timed["model"] and set(timed["latency_ms"]) == {
        "fused",
        "unfused",
    }
    assert engine.measurement.accuracy["fidelity"]["cosine_similarity"] >= FUSION_MIN_COSINE
    assert any(message.startswith("graph optimization (bert") for message in result.messages)


def test_the_search_fuses_once_before_its_candidates(graphs, tmp_path: Path) -> None:
    from engines.search.autotune import AutotuneRequest, autotune
    from engines.search.space import Budget, Objective, SearchSpace

    space = SearchSpace(backends=("onnxruntime-cpu",), precisions=("fp32",), calibrations=(), prune_ratios=())
    request = AutotuneRequest(Objective("latency", 1), Budget("fidelity", 0.01), 120.0, space)
    result = autotune(graphs["bert"], request, tmp_path, evaluation=token_data())
    ort_choice = result.outcomes[0].artifact.metadata[METADATA_KEY]
    assert ort_choice["fused"]["Attention"] == 2
    # timed beside the unfused model on ONNX Runtime itself; which won is the machine's to say
    assert set(ort_choice["targets"]["onnxruntime-cpu"]["latency_ms"]) == {"fused", "unfused"}
    assert any(message.startswith("graph optimization (bert") for message in result.messages)


# ---------------------------------------------------------------- over the API


def _post(api: LocalApi, kind: str, name: str, content: bytes) -> str:
    response = api.client.post(f"/v1/{kind}", files={"file": (name, content)})
    assert response.status_code in (200, 201), response.text  # 200: the same file again (deduplicated)
    return response.json()["id"]


def _npz(data: Dataset) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **data.inputs)
    return buffer.getvalue()


def _job(
    api: LocalApi, model: Path, graph_optimization: dict | None, data: Dataset | None = None, **recipe
) -> tuple[int, dict]:
    body = {
        "model_id": _post(api, "models", model.name, model.read_bytes()),
        "evaluation_dataset_id": _post(api, "datasets", "texts.npz", _npz(data or token_data())),
        "recipe": {
            "graph_optimization": graph_optimization,
            "batch_sizes": [2],
            "measure": QUICK_MEASURE,
            **recipe,
        },
    }
    response = api.client.post("/v1/jobs", json=body)
    return response.status_code, response.json()


@pytest.mark.parametrize(
    ("model", "section", "code", "fragment"),
    [
        ("bert", {"model_type": "bert", "num_heads": 8, "hidden_size": 32}, MISMATCH, "state num_heads 4"),
        (
            "bert-runtime",
            {"model_type": "auto"},
            HEADS_UNKNOWN,
            '"graph_optimization": {"model_type": "bert"',
        ),
        ("bert", {"model_type": "off", "num_heads": 4}, "invalid_recipe", '"model_type": "auto"'),
    ],
)
def test_unknown_or_wrong_heads_are_a_422_saying_how_to_state_them(
    local_api: LocalApi, graphs, model: str, section: dict, code: str, fragment: str
) -> None:
    status, body = _job(local_api, graphs[model], section)
    assert status == 422, body
    assert body["code"] == code and fragment in body["detail"], body


@pytest.mark.parametrize("model", ["llama", "rms-rotary-encoder"])
def test_auto_on_a_decoder_is_accepted(local_api: LocalApi, graphs, model: str) -> None:
    """A recipe on "auto" is no 422 for a Llama decoder (detected) nor for attention the optimizer has
    no type for (it runs unfused, saying why)."""
    status, body = _job(local_api, graphs[model], {"model_type": "auto"}, decoder_tokens())
    assert status == 202, body


def test_a_job_with_graph_optimization_builds_a_fused_engine_end_to_end(local_api: LocalApi, graphs) -> None:
    from workers.job_runner import run_job_by_id

    status, job = _job(local_api, graphs["bert"], {"model_type": "auto"})
    assert status == 202, job
    run_job_by_id(local_api.settings, job["id"])
    job = local_api.client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert any(
        message.startswith("graph optimization (bert, 4 heads, hidden 32)") for message in job["messages"]
    )
    engine = local_api.client.get(f"/v1/engines/{job['engine_ids'][0]}").json()
    report = engine["build_info"][METADATA_KEY]
    assert report["fused"]["EmbedLayerNormalization"] == 1
    assert report["built_from"]["model"] == report["targets"]["onnxruntime-cpu"]["model"]


def test_capabilities_list_the_model_types(local_api: LocalApi) -> None:
    listed = local_api.client.get("/v1/capabilities").json()["graph_optimization"]
    assert listed["modes"] == ["off", "auto"]
    assert [item["name"] for item in listed["model_types"]] == list(MODEL_TYPES)
    assert {item["name"] for item in listed["model_types"] if item["detected"]} == {
        "bert",
        "vit",
        "gpt2",
        "clip",
        "llama",
    }
