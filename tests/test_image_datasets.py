"""Image-folder datasets (engines.ingest.images): zips of real images built here with Pillow, read into
arrays the way torchvision's ImageFolder and transforms would make them, and every refusal's code.

torchvision is not installed (and must not be: it would replace the CPU torch build), so
`torchvision_reference` redoes its PIL path by hand from its source (transforms.functional:
`_compute_resized_output_size`, `resize`, `center_crop`, `to_tensor`, `normalize`) with Pillow and
numpy, one operation at a time in float32, and the library's output must equal it bit for bit.
Pillow's antialiased bilinear resize is checked separately against a numpy rewrite of its filter.
"""

from __future__ import annotations

import importlib.util
import io
import json
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.errors import InvalidDatasetError, InvalidImageError
from engines.ingest.datasets import inspect_arrays, inspect_npz
from engines.ingest.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessing,
    is_image_folder_archive,
    read_image_folder,
)
from tests.big_archives import zip_of

LIMIT = 256 * 1024 * 1024


# ---------------------------------------------------------------------------------------- builders


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with smooth gradients, edges and noise: resizing it is not trivial."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / max(1, width - 1)
    green = 255 * y / max(1, height - 1)
    blue = 127.5 + 127.5 * np.sin(x / 3.0) * np.cos(y / 5.0)
    pixels = np.stack([red, green, blue], axis=-1) + rng.normal(0, 12, (height, width, 3))
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 30)  # a sharp block
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(width: int = 64, height: int = 48, seed: int = 0, **options) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=92, **options)


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(photo_like(width, height, seed), "PNG")


def make_zip(path: Path, members: dict[str | zipfile.ZipInfo, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares width x height pixels (a decompression bomb:
    its one IDAT would inflate to gigabytes were it complete)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + chunk(b"IEND", b"")
    )


def read(path: Path, spec: ImagePreprocessing | None = None, **options):
    options = {"max_unpacked_bytes": LIMIT, "max_images": 1000, **options}
    return read_image_folder(path, spec or ImagePreprocessing(), **options)


def refused(path: Path, spec: ImagePreprocessing | None = None, **options) -> InvalidDatasetError:
    with pytest.raises(InvalidDatasetError) as caught:
        read(path, spec, **options)
    return caught.value


# ------------------------------------------------------------------ torchvision, redone by hand


def torchvision_reference(
    image: Image.Image,
    *,
    size: tuple[int, int] = (224, 224),
    resize: int | tuple[int, int] = 256,
    crop: bool = True,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resample=Image.Resampling.BILINEAR,
) -> np.ndarray:
    """`Compose([Resize(resize), CenterCrop(size), ToTensor(), Normalize(mean, std)])` on
    `pil_loader`'s image, as torchvision's functional code does it for PIL images: [C, H, W] float32."""
    image = image.convert("RGB")  # torchvision.datasets.folder.pil_loader
    width, height = image.size
    if isinstance(resize, int):  # F._compute_resized_output_size, size of one element
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = resize, int(resize * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_height, new_width = resize
    if (new_height, new_width) != (height, width):  # F.resize returns the image itself when equal
        image = image.resize((new_width, new_height), resample)  # F_pil.resize
    if crop:  # F.center_crop
        crop_height, crop_width = size
        crop_top = int(round((new_height - crop_height) / 2.0))  # noqa: RUF046 (torchvision's words)
        crop_left = int(round((new_width - crop_width) / 2.0))  # noqa: RUF046
        image = image.crop((crop_left, crop_top, crop_left + crop_width, crop_top + crop_height))
    tensor = np.array(image, np.uint8, copy=True).transpose(2, 0, 1)  # F.to_tensor: HWC -> CHW
    tensor = tensor.astype(np.float32) / np.float32(255)  # .to(float32).div(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]  # F.normalize: as_tensor(float32)
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]
    return (tensor - mean32) / std32  # tensor.sub_(mean).div_(std)


def pillow_bilinear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's BILINEAR `resize` in numpy (libImaging/Resample.c): a triangle filter whose support
    widens with the downscale factor (antialiasing), horizontal pass first, each pass rounded to 8 bits.
    Pillow computes in fixed point, so results may differ by 1."""

    def weights(in_size: int, out_size: int) -> np.ndarray:
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = 1.0 * filterscale
        matrix = np.zeros((out_size, in_size))
        for out in range(out_size):
            center = (out + 0.5) * scale
            low = max(int(center - support + 0.5), 0)
            high = min(int(center + support + 0.5), in_size)
            taps = np.arange(low, high)
            w = np.clip(1.0 - np.abs((taps - center + 0.5) / filterscale), 0.0, None)
            matrix[out, low:high] = w / w.sum()
        return matrix

    horizontal = weights(pixels.shape[1], width)
    vertical = weights(pixels.shape[0], height)
    tmp = np.clip(np.round(np.einsum("wx,hxc->hwc", horizontal, pixels.astype(np.float64))), 0, 255)
    return np.clip(np.round(np.einsum("yh,hwc->ywc", vertical, tmp)), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- layouts


def test_class_folders_give_sorted_classes_labels_and_rows(tmp_path: Path) -> None:
    zip_path = make_zip(
        tmp_path / "pets.zip",
        {
            "dog/b.png": png(70, 50, 1),
            "cat/a.jpg": jpeg(80, 60, 2),
            "cat/c.BMP": encode(photo_like(40, 90, 3), "BMP"),  # extensions compare without case
            "Zebra/z.webp": encode(photo_like(64, 64, 4), "WEBP", lossless=True),
            "cat/sub/d.JPEG": jpeg(90, 90, 5),  # a subfolder of a class belongs to it (torchvision)
            # junk every OS leaves behind: ignored
            "__MACOSX/cat/._a.jpg": b"\x00\x05\x16\x07 AppleDouble",
            ".DS_Store": b"\x00\x00\x00\x01Bud1",
            "cat/.hidden.jpg": b"not read",
            ".ipynb_checkpoints/x.png": b"not a class",
            "dog/Thumbs.db": b"\xd0\xcf\x11\xe0",
            "desktop.ini": b"[.ShellClassInfo]",
            "cat/": b"",  # a folder entry, as `zip -r` writes
        },
    )
    assert is_image_folder_archive(zip_path)
    folder = read(zip_path)
    # sorted() as torchvision sorts classes: case-sensitive, upper case first
    assert folder.classes == ("Zebra", "cat", "dog")
    assert folder.files == ("Zebra/z.webp", "cat/a.jpg", "cat/c.BMP", "cat/sub/d.JPEG", "dog/b.png")
    assert folder.labels is not None and folder.labels.dtype == np.int64
    assert folder.labels.tolist() == [0, 1, 1, 1, 2]
    array = folder.arrays["input"]
    assert array.shape == (5, 3, 224, 224) and array.dtype == np.float32 and array.flags.c_contiguous

    # the same checks and description as any .npz, then stored and read back as one
    info = inspect_arrays(folder.npz_arrays())
    assert (info.samples, info.has_labels, info.classes) == (5, True, 3)
    assert info.arrays["input"].to_dict() == {"shape": [5, 3, 224, 224], "dtype": "float32"}
    np.savez(tmp_path / "stored.npz", **folder.npz_arrays())
    assert inspect_npz(tmp_path / "stored.npz", max_unpacked_bytes=LIMIT) == info
    described = folder.describe()
    assert described["format"] == "image_folder" and described["images"] == 5
    assert described["class_names"] == ["Zebra", "cat", "dog"]
    assert described["preprocessing"] == folder.spec.to_dict()
    json.dumps(described)


def test_flat_images_and_wrapper_folders(tmp_path: Path) -> None:
    flat = read(make_zip(tmp_path / "flat.zip", {"b.jpg": jpeg(seed=1), "a.png": png(seed=2)}))
    assert flat.labels is None and flat.classes is None and flat.files == ("a.png", "b.jpg")
    assert inspect_arrays(flat.npz_arrays()).has_labels is False

    # one folder holding every image: a zipped folder, not a dataset of one class
    wrapped = read(make_zip(tmp_path / "w.zip", {"images/1.jpg": jpeg(), "images/2.jpg": jpeg(seed=3)}))
    assert wrapped.labels is None and wrapped.files == ("images/1.jpg", "images/2.jpg")

    # `zip -r val.zip val/` of a class tree, nested twice: the wrappers are not classes
    nested = read(
        make_zip(
            tmp_path / "val.zip",
            {"data/val/": b"", "data/val/dog/1.png": png(), "data/val/cat/2.png": png(seed=4)},
        )
    )
    assert nested.classes == ("cat", "dog") and nested.labels.tolist() == [0, 1]

    # zips written on Windows by some tools separate folders with backslashes
    windows = read(make_zip(tmp_path / "win.zip", {"cat\\1.png": png(), "dog\\2.png": png(seed=5)}))
    assert windows.classes == ("cat", "dog")


def test_a_class_list_maps_folders_onto_the_models_indices(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "subset.zip", {"goldfish/1.jpg": jpeg(), "tench/2.jpg": jpeg(seed=1)})
    model_classes = ["tench", "goldfish", "great_white_shark"]  # the model's output order, not sorted
    folder = read(zip_path, classes=model_classes)
    assert folder.classes == tuple(model_classes)
    assert folder.files == ("tench/2.jpg", "goldfish/1.jpg") and folder.labels.tolist() == [0, 1]

    # with a class list, one folder is one class, not a wrapper
    one = read(make_zip(tmp_path / "one.zip", {"goldfish/1.jpg": jpeg()}), classes=model_classes)
    assert one.labels.tolist() == [1]

    error = refused(zip_path, classes=["tench", "shark"])
    assert error.code == "invalid_labels" and "'goldfish/'" in error.detail
    assert refused(zip_path, classes=["tench", "tench"]).code == "invalid_labels"
    flat = make_zip(tmp_path / "flat.zip", {"1.jpg": jpeg()})
    assert refused(flat, classes=model_classes).code == "invalid_labels"

    # an empty class folder would shift every later label: refused, as ImageFolder does
    empty = make_zip(tmp_path / "empty.zip", {"ant/": b"", "bee/1.jpg": jpeg(), "cat/2.jpg": jpeg()})
    error = refused(empty)
    assert error.code == "invalid_labels" and "'ant/'" in error.detail
    assert read(empty, classes=["ant", "bee", "cat"]).labels.tolist() == [1, 2]


def test_mixed_layout_names_an_example_of_each(tmp_path: Path) -> None:
    error = refused(make_zip(tmp_path / "mixed.zip", {"loose.jpg": jpeg(), "cat/1.jpg": jpeg()}))
    assert error.code == "mixed_layout"
    assert "'loose.jpg'" in error.detail and "'cat/1.jpg'" in error.detail


# ------------------------------------------------------------------------- pixels: modes, EXIF


def test_modes_are_converted_explicitly(tmp_path: Path) -> None:
    """Each member is one flat colour; read raw (uint8, no resize) its pixels show the conversion."""
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([200, 10, 10] + [0, 0, 0] * 255)
    sixteen = Image.fromarray(np.full((8, 8), 100 * 256 + 255, dtype=np.uint16))  # mode I;16
    assert sixteen.mode == "I;16"
    members = {
        "a_gray.png": encode(Image.new("L", (8, 8), 100), "PNG"),
        "b_rgba.png": encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0)), "PNG"),  # alpha dropped
        "c_palette.png": encode(palette, "PNG"),
        "d_bilevel.bmp": encode(Image.new("1", (8, 8), 1), "BMP"),
        "e_sixteen.png": encode(sixteen, "PNG"),  # scaled to 8 bits (convert() would clip to 255)
        "f_gray_alpha.png": encode(Image.new("LA", (8, 8), (60, 128)), "PNG"),
        "g_cmyk.jpg": encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100),
        "h_gray.pgm": encode(Image.new("L", (8, 8), 7), "PPM"),
    }
    spec = ImagePreprocessing(resize="none", dtype="uint8", layout="NHWC")
    folder = read(make_zip(tmp_path / "modes.zip", members), spec)
    pixels = folder.arrays["input"]
    assert pixels.shape == (8, 8, 8, 3) and pixels.dtype == np.uint8
    first = {name: tuple(int(v) for v in pixels[i, 0, 0]) for i, name in enumerate(folder.files)}
    assert first["a_gray.png"] == (100, 100, 100)
    assert first["b_rgba.png"] == (10, 20, 30)
    assert first["c_palette.png"] == (200, 10, 10)
    assert first["d_bilevel.bmp"] == (255, 255, 255)
    assert first["e_sixteen.png"] == (100, 100, 100)
    assert first["f_gray_alpha.png"] == (60, 60, 60)
    red, green, blue = first["g_cmyk.jpg"]  # lossy, but red
    assert red > 240 and green < 15 and blue < 15
    assert first["h_gray.pgm"] == (7, 7, 7)

    gray = read(
        make_zip(tmp_path / "gray.zip", {"x.png": encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")}),
        ImagePreprocessing(resize="none", channel_order="GRAY", dtype="uint8"),
    )
    assert gray.arrays["input"].shape == (1, 1, 8, 8)
    assert int(gray.arrays["input"][0, 0, 0, 0]) == 76  # ITU-R 601-2 luma of pure red: 255 * 0.299


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored landscape with Orientation 6 (rotate 90 degrees clockwise to display)."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    zip_path = make_zip(tmp_path / "phone.zip", {"IMG_0001.jpg": data})

    upright = read(zip_path, ImagePreprocessing(resize="none", dtype="uint8", layout="NHWC"))
    pixels = upright.arrays["input"][0].astype(int)
    assert pixels.shape == (40, 20, 3)  # portrait, as the phone showed it
    top, bottom = pixels[:15].mean(axis=(0, 1)), pixels[25:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the stored left side is now on top
    assert bottom[2] > 200 and bottom[0] < 60

    # torchvision's pil_loader ignores the tag: exif_orientation=False reproduces it
    raw = read(zip_path, ImagePreprocessing(resize="none", dtype="uint8", exif_orientation=False))
    assert raw.arrays["input"].shape == (1, 3, 20, 40)

    # a damaged EXIF block (an orientation entry cut short) does not cost the photo
    damaged = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
    broken = make_zip(
        tmp_path / "broken.zip", {"a.jpg": encode(Image.fromarray(stored), "JPEG", exif=damaged)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow: "Corrupt EXIF data"
        assert read(broken, ImagePreprocessing(resize="none")).arrays["input"].shape == (1, 3, 20, 40)


# ------------------------------------------------------------------- pixels: layout, dtype, norm


def test_layout_channel_order_dtype_and_normalization(tmp_path: Path) -> None:
    zip_path = make_zip(tmp_path / "one.zip", {"a.png": png(120, 90, 7), "b.jpg": jpeg(90, 120, 8)})
    size = (32, 48)

    def run(**fields) -> np.ndarray:
        return read(zip_path, ImagePreprocessing(size=size, **fields)).arrays["input"]

    raw = run(dtype="uint8", layout="NHWC")
    assert raw.shape == (2, 32, 48, 3) and raw.dtype == np.uint8
    nchw = run(mean=[0.0], std=[1.0])
    assert nchw.shape == (2, 3, 32, 48)
    np.testing.assert_array_equal(nchw, raw.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))

    normalized = run()  # ImageNet's mean and std by default
    expected = (nchw - np.float32(IMAGENET_MEAN)[:, None, None]) / np.float32(IMAGENET_STD)[:, None, None]
    np.testing.assert_array_equal(normalized, expected)
    np.testing.assert_array_equal(run(layout="nhwc"), normalized.transpose(0, 2, 3, 1))

    bgr = run(channel_order="BGR")  # default statistics follow the channels: blue's for channel 0
    np.testing.assert_array_equal(bgr, normalized[:, ::-1])
    assert ImagePreprocessing(channel_order="BGR").mean == IMAGENET_MEAN[::-1]
    np.testing.assert_array_equal(run(dtype="uint8", channel_order="BGR"), raw.transpose(0, 3, 1, 2)[:, ::-1])

    half = run(dtype="float16")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, normalized.astype(np.float16))  # torch's .half(): round to even

    custom = run(mean=[0.5, 0.25, 0.0], std=[0.5, 0.5, 2.0])
    np.testing.assert_array_equal(custom[:, 0], (nchw[:, 0] - np.float32(0.5)) / np.float32(0.5))
    np.testing.assert_array_equal(custom[:, 2], nchw[:, 2] / np.float32(2.0))


# ------------------------------------------------------------------------ faithful to torchvision


@pytest.mark.parametrize(
    ("width", "height", "fmt"),
    [
        (500, 375, "PNG"),
        (375, 500, "PNG"),
        (300, 300, "PNG"),
        (257, 256, "PNG"),
        (259, 300, "PNG"),  # 256 * 300 / 259 = 296.5: int() rounds down
        (100, 80, "PNG"),  # enlarged
        (1000, 230, "PNG"),
        (1200, 900, "JPEG"),  # shrunk 3.5x: no JPEG draft mode, no reducing_gap shortcut
    ],
)
def test_resize_then_center_crop_equals_torchvision(
    tmp_path: Path, width: int, height: int, fmt: str
) -> None:
    data = encode(photo_like(width, height, seed=width), fmt)
    zip_path = make_zip(tmp_path / "t.zip", {f"a.{fmt.lower()}": data})
    ours = read(zip_path).arrays["input"][0]
    with Image.open(io.BytesIO(data)) as image:  # decoded as pil_loader decodes it
        np.testing.assert_array_equal(ours, torchvision_reference(image))


def test_stretch_bicubic_and_other_sizes_equal_torchvision(tmp_path: Path) -> None:
    image = photo_like(333, 211, seed=9)
    zip_path = make_zip(tmp_path / "t.zip", {"a.png": encode(image, "PNG")})
    stretched = read(zip_path, ImagePreprocessing(size=(120, 160), resize="resize")).arrays["input"][0]
    np.testing.assert_array_equal(stretched, torchvision_reference(image, resize=(120, 160), crop=False))

    # Inception-style 299 (resize_size 341 = floor(299 / 0.875)), bicubic
    spec = ImagePreprocessing(size=299, interpolation="bicubic")
    assert spec.resize_size == 341
    bicubic = read(zip_path, spec).arrays["input"][0]
    reference = torchvision_reference(image, size=(299, 299), resize=341, resample=Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(bicubic, reference)


def test_center_crop_rounds_like_torchvision(tmp_path: Path) -> None:
    """No resize happens when the shorter side is already resize_size: the crop's offset is then
    `int(round((W - 224) / 2))`, Python's round-half-to-even, read here on the raw pixels."""
    for width, left in ((257, 16), (259, 18)):  # 16.5 -> 16, 17.5 -> 18
        image = photo_like(width, 256, seed=width)
        zip_path = make_zip(tmp_path / f"{width}.zip", {"a.png": encode(image, "PNG")})
        ours = read(zip_path, ImagePreprocessing(dtype="uint8", layout="NHWC")).arrays["input"][0]
        np.testing.assert_array_equal(ours, np.asarray(image)[16:240, left : left + 224])


def test_resize_is_pillows_antialiased_bilinear(tmp_path: Path) -> None:
    image = photo_like(400, 300, seed=11)
    zip_path = make_zip(tmp_path / "a.zip", {"a.png": encode(image, "PNG")})
    spec = ImagePreprocessing(size=(75, 100), resize="resize", dtype="uint8", layout="NHWC")
    ours = read(zip_path, spec).arrays["input"][0].astype(int)
    rewrite = pillow_bilinear(np.asarray(image), 100, 75).astype(int)
    assert np.abs(ours - rewrite).max() <= 1

    # Antialiasing matters: a 1-pixel checkerboard shrunk 4x is flat gray, not aliased stripes
    board = ((np.indices((256, 256)).sum(axis=0) % 2) * 255).astype(np.uint8)
    board_zip = make_zip(tmp_path / "b.zip", {"b.png": encode(Image.fromarray(board), "PNG")})
    shrunk = read(board_zip, ImagePreprocessing(size=64, resize="resize", dtype="uint8")).arrays["input"]
    assert np.abs(shrunk.astype(int) - 127).max() <= 2


SKLEARN = importlib.util.find_spec("sklearn")
SAMPLE_PHOTOS = (
    Path(SKLEARN.submodule_search_locations[0]) / "datasets" / "images" if SKLEARN else Path("/nonexistent")
)


@pytest.mark.skipif(
    not (SAMPLE_PHOTOS / "china.jpg").is_file(), reason="scikit-learn's sample photos are not installed"
)
def test_real_photos_decode_like_torchvision(tmp_path: Path) -> None:
    """scikit-learn's two sample photos (427x640 camera JPEGs), through the library and by hand."""
    photos = {name: (SAMPLE_PHOTOS / f"{name}.jpg").read_bytes() for name in ("china", "flower")}
    zip_path = make_zip(
        tmp_path / "photos.zip", {f"{name}/{name}.jpg": data for name, data in photos.items()}
    )
    folder = read(zip_path)
    assert folder.classes == ("china", "flower") and folder.labels.tolist() == [0, 1]
    for index, name in enumerate(("china", "flower")):
        with Image.open(io.BytesIO(photos[name])) as image:
            expected = torchvision_reference(image)
        np.testing.assert_array_equal(folder.arrays["input"][index], expected)
    # normalized photos: roughly zero-centred, unit spread
    values = folder.arrays["input"]
    assert -1.5 < float(values.mean()) < 1.5 and 0.3 < float(values.std()) < 2.0

    nhwc = read(zip_path, ImagePreprocessing(size=(96, 128), resize="resize", layout="NHWC", dtype="float16"))
    assert nhwc.arrays["input"].shape == (2, 96, 128, 3) and nhwc.arrays["input"].dtype == np.float16


# -------------------------------------------------------------------------------------- refusals


def test_corrupt_and_non_image_members_are_refused_by_name(tmp_path: Path) -> None:
    whole = jpeg(200, 150)
    cases = {
        "truncated.jpg": (whole[: len(whole) // 2], "image_decode_failed"),
        "notes.jpg": (b"these are my notes, not a photo\n" * 20, "image_decode_failed"),
        "empty.png": (b"", "image_decode_failed"),
        "README.txt": (b"hello", "not_an_image"),
        "anim.gif": (encode(photo_like(8, 8), "GIF"), "not_an_image"),
        "float.ppm": (encode(Image.new("F", (4, 4), 0.5), "PPM"), "image_decode_failed"),
    }
    for name, (data, code) in cases.items():
        zip_path = make_zip(tmp_path / f"{name}.zip", {"good.png": png(), name: data})
        error = refused(zip_path)
        assert isinstance(error, InvalidImageError), name
        assert (error.code, error.member) == (code, name), (name, error.detail)
        assert f"'{name}'" in error.detail
        assert error.to_dict()["member"] == name


def test_decompression_bombs_are_refused_from_the_header(tmp_path: Path) -> None:
    bomb = png_declaring(100_000, 100_000)
    assert len(bomb) < 100
    error = refused(make_zip(tmp_path / "bomb.zip", {"cat/bomb.png": bomb, "dog/ok.png": png()}))
    assert (error.code, error.member) == ("image_too_large", "cat/bomb.png")
    assert "decompression bomb" in error.detail

    # under Pillow's own limit but over the one given
    small = make_zip(tmp_path / "small.zip", {"a.png": png(64, 64)})
    assert refused(small, max_pixels=1000).code == "image_too_large"
    assert read(small, max_pixels=64 * 64).samples == 1
    assert refused(small, max_image_bytes=100).code == "image_too_large"  # the file itself


def test_unsafe_archive_members_are_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("cat/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    for name, member in (
        ("slip", zipfile.ZipInfo("../evil.jpg")),
        ("deep", zipfile.ZipInfo("cat/../../evil.jpg")),
        ("absolute", zipfile.ZipInfo("/etc/evil.jpg")),
        ("drive", zipfile.ZipInfo("C:/evil.jpg")),
        ("symlink", link),
    ):
        zip_path = make_zip(tmp_path / f"{name}.zip", {"cat/a.jpg": jpeg(), member: jpeg()})
        assert refused(zip_path).code == "archive_path_traversal", name
    twice = tmp_path / "twice.zip"
    with zipfile.ZipFile(twice, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("a.jpg", jpeg())
        archive.writestr("a.jpg", jpeg(seed=1))
    assert "twice" in refused(twice).detail


def test_sizes_are_checked_before_inflating(tmp_path: Path) -> None:
    """A member that declares 300 MiB (a PNG signature, then zeros) weighing a few hundred KiB; one
    that declares fewer bytes than it holds; and bzip2, which zipfile inflates a whole read at once."""
    declared = tmp_path / "declared.zip"
    declared.write_bytes(zip_of({"cat/zeros.png": (b"\x89PNG\r\n\x1a\n", 300 * 1024 * 1024)}))
    assert refused(declared).code == "upload_too_large"
    error = refused(declared, max_unpacked_bytes=2 * LIMIT)
    assert (error.code, error.member) == ("image_too_large", "cat/zeros.png")

    honest = make_zip(tmp_path / "honest.zip", {"a.png": png(200, 200)})
    blob = bytearray(honest.read_bytes())
    entry = blob.index(b"PK\x01\x02")  # the central directory's entry: uncompressed size at +24
    blob[entry + 24 : entry + 28] = struct.pack("<I", 1000)
    (tmp_path / "lying.zip").write_bytes(blob)
    error = refused(tmp_path / "lying.zip")
    assert error.code == "invalid_dataset" and "'a.png' could not be read" in error.detail

    with zipfile.ZipFile(tmp_path / "bz2.zip", "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("a.png", png())
    assert "use stored or deflate" in refused(tmp_path / "bz2.zip").detail


def test_mixed_sizes_without_a_resize_are_refused(tmp_path: Path) -> None:
    zip_path = make_zip(
        tmp_path / "sizes.zip", {"a.png": png(64, 48), "b.png": png(64, 48), "c.png": png(50, 48)}
    )
    error = refused(zip_path, ImagePreprocessing(resize="none"))
    assert (error.code, error.member) == ("image_size_mismatch", "c.png")
    assert "50x48" in error.detail and "64x48" in error.detail
    fixed = refused(zip_path, ImagePreprocessing(resize="none", size=(48, 50)))
    assert (fixed.code, fixed.member) == ("image_size_mismatch", "a.png")
    resized = read(zip_path, ImagePreprocessing(size=32))  # any resize policy makes them one size
    assert resized.arrays["input"].shape == (3, 3, 32, 32)


def test_limits_and_not_a_dataset(tmp_path: Path) -> None:
    three = make_zip(tmp_path / "three.zip", {f"{i}.png": png(seed=i) for i in range(3)})
    assert refused(three, max_images=2).code == "too_many_images"
    declared = sum(info.file_size for info in zipfile.ZipFile(three).infolist())
    assert refused(three, max_unpacked_bytes=declared - 1).code == "upload_too_large"
    # the arrays the images make are held to the same limit, before they are allocated
    error = refused(three, max_unpacked_bytes=3 * 3 * 224 * 224 * 4 - 1)
    assert error.code == "dataset_too_large" and "float16" in error.detail
    assert read(three, ImagePreprocessing(dtype="uint8"), max_unpacked_bytes=3 * 3 * 224 * 224).samples == 3

    (tmp_path / "empty.zip").write_bytes(b"")
    assert refused(tmp_path / "empty.zip").code == "empty_file"
    (tmp_path / "text.zip").write_text("not a zip")
    assert refused(tmp_path / "text.zip").code == "invalid_dataset"
    only_junk = make_zip(tmp_path / "junk.zip", {"__MACOSX/._a.jpg": b"x", ".DS_Store": b"x"})
    assert "no images" in refused(only_junk).detail

    np.savez(tmp_path / "arrays.npz", input=np.zeros((2, 3), np.float32))
    assert not is_image_folder_archive(tmp_path / "arrays.npz")
    assert not is_image_folder_archive(tmp_path / "text.zip")


# ---------------------------------------------------------------------------------------- the spec


def test_spec_defaults_round_trip_and_json() -> None:
    spec = ImagePreprocessing()
    assert spec.to_dict() == {
        "size": [224, 224],
        "resize": "resize_shorter_then_center_crop",
        "resize_size": 256,
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "exif_orientation": True,
    }
    for candidate in (
        spec,
        ImagePreprocessing(
            size=(96, 128), resize="resize", channel_order="bgr", layout="nhwc", dtype="float16"
        ),
        ImagePreprocessing(resize="none", dtype="uint8", exif_orientation=False),
        ImagePreprocessing(channel_order="GRAY", size=28, resize_size=32, mean=0.1307, std=0.3081),
    ):
        stored = json.loads(json.dumps(candidate.to_dict()))
        assert ImagePreprocessing.from_dict(stored) == candidate
    assert (
        ImagePreprocessing.from_dict({"size": 299, "mean": [0.5], "std": [0.5]}).to_dict()["mean"]
        == [0.5] * 3
    )
    assert ImagePreprocessing(resize="none").size is None
    assert ImagePreprocessing(channel_order="GRAY").mean == (0.0,)
    assert ImagePreprocessing(layout="NHWC", size=(10, 20)).sample_shape() == (10, 20, 3)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"resize": "crop"}, "resize must be one of"),
        ({"layout": "CHW"}, "layout must be one of"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"channel_order": "RGBA"}, "channel_order must be one of"),
        ({"interpolation": "area"}, "interpolation must be one of"),
        ({"size": (0, 10)}, "size's height"),
        ({"size": [224, 224, 3]}, "[height, width]"),
        ({"size": "224"}, "[height, width]"),
        ({"size": 100_000}, "from 1 to"),
        ({"resize_size": 200}, "at least 224"),
        ({"resize": "resize", "resize_size": 256}, "resize_size applies"),
        ({"mean": [0.5, 0.5]}, "2 values"),
        ({"mean": [123.675, 116.28, 103.53]}, "divide them by 255"),
        ({"std": [0.2, 0.0, 0.2]}, "above 0"),
        ({"std": [float("nan")] * 3}, "finite"),
        ({"mean": "0.5"}, "list of numbers"),
        ({"dtype": "uint8", "mean": [0.5]}, "uint8"),
        ({"exif_orientation": "yes"}, "true or false"),
        ({"crop": 224}, "unknown preprocessing field"),
    ],
)
def test_bad_specs_say_why(fields: dict, words: str) -> None:
    with pytest.raises(InvalidDatasetError) as caught:
        ImagePreprocessing.from_dict(fields)
    assert caught.value.code == "invalid_preprocessing"
    assert words in caught.value.detail
