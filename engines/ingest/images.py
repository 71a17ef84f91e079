"""Image-folder datasets: a `.zip` of images becomes the arrays of an `.npz` dataset.

Layout (torchvision's `ImageFolder`): images in class folders (`cat/001.jpg`, `dog/002.png`) are
labelled, the classes in sorted order (`sorted()`, case-sensitive, as torchvision sorts them) and
each label the index of its folder; images all at the top (`001.jpg`) are unlabelled. Images in
subfolders of a class folder belong to that class (as in torchvision). A zip of the folder itself
(`val/cat/001.jpg`) is read as if zipped from inside it. One folder alone holding every image
(`images/001.jpg`) is read as a wrapper, unlabelled, unless a class list is given: one class of
labels all 0 is rarely what a model was trained on. A class list (the model's classes, in its
output order) maps folder names onto the model's indices; every folder must be in it. Anything
else (images at the top beside class folders) is refused, naming an example of each.

Ignored: `__MACOSX/`, every file or folder whose name starts with `.` (`.DS_Store`, `._x.jpg`,
`.ipynb_checkpoints/`, which torchvision would take for a class), `Thumbs.db` and `desktop.ini`.
Accepted: `.jpg`, `.jpeg`, `.png`, `.bmp`, `.webp`, `.ppm`, `.pgm` (torchvision's list without
TIFF, whose 16-bit, floating-point and multi-page variants have no one reading), decoded only by
Pillow's JPEG, PNG, BMP, WebP and PPM plugins whatever the extension says (a PNG named `.jpg`
is read as a PNG). An animated WebP or PNG gives its first frame. Any other member is refused.

Pixels, per image (what torchvision's `pil_loader` then `Resize`, `CenterCrop`, `ToTensor` and
`Normalize` do, for a PIL image): EXIF orientation applied (`ImageOps.exif_transpose`; torchvision's
loader does not: `exif_orientation: false` reproduces it), converted to RGB with Pillow's
`convert("RGB")` (alpha dropped, palette, grayscale and CMYK expanded; 16-bit grayscale scaled to
8 bits, where `convert` would clip it), or to one channel with `convert("L")` as torchvision's
`Grayscale` does; resized by Pillow (`Image.resize`: bilinear with antialiasing when shrinking, as
torchvision resizes PIL images), center-cropped, scaled to 0-1 and normalized in float32.

Safety: every member's path is checked (absolute, `..`, drive letters, symlinks: refused), the
archive's declared unpacked size is checked before anything is inflated, each image file's
declared size against a per-file limit, and each image's pixel count from its header before its
pixels are decoded (Pillow's decompression-bomb limit, `Image.MAX_IMAGE_PIXELS`). Images are
decoded one at a time into an array allocated once, after its size is checked against the
unpacked-size limit: memory is the output plus one image.

Refusals raise InvalidDatasetError, or InvalidImageError naming the `member`: `image_decode_failed`
(corrupt, truncated, not an image inside, 32-bit or floating-point pixels), `image_too_large`
(pixels over the limit, or a file over the per-file limit), `not_an_image` (an extension not
accepted), `image_size_mismatch` (sizes differ with resize `none`), `mixed_layout`,
`too_many_images`, `invalid_labels` (class folders against the class list, an empty class folder),
`invalid_preprocessing` (the spec), `archive_path_traversal`, `upload_too_large` (the declared
unpacked size, or the arrays the images would make), `empty_file`, `invalid_dataset`.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import stat
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, cast, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engines.errors import InvalidDatasetError, InvalidImageError
from engines.ingest.archives import is_zip_archive, open_dataset_zip
from engines.ingest.datasets import LABELS_KEY, ArraySpec, DatasetInfo
from engines.ingest.limits import DatasetLimits
from engines.ingest.spec_fields import spec_values

ResizePolicy = Literal["resize_shorter_then_center_crop", "resize", "none"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
ChannelOrder = Literal["RGB", "BGR", "GRAY"]
Layout = Literal["NCHW", "NHWC"]
PixelDType = Literal["float32", "float16", "uint8"]

RESIZE_POLICIES: tuple[str, ...] = get_args(ResizePolicy)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
CHANNEL_ORDERS: tuple[str, ...] = get_args(ChannelOrder)
LAYOUTS: tuple[str, ...] = get_args(Layout)
PIXEL_DTYPES: tuple[str, ...] = get_args(PixelDType)

#: torchvision's ImageNet statistics (per RGB channel, on pixels scaled to 0-1).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
#: The crop is this share of the resized shorter side when `resize_size` is not given: 224 from 256.
DEFAULT_CROP_FRACTION = 0.875
MAX_SIDE = 8192

#: Extensions accepted (lower-cased) and the only Pillow plugins that may decode a member.
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".webp")
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "PPM")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
IGNORED_FOLDERS = frozenset({"__MACOSX"})
#: An image file over this many bytes is refused before it is read (a 50-megapixel PNG is ~100 MB).
MAX_IMAGE_BYTES = 256 * 1024 * 1024
#: Deflate inflates at most what is asked of it per read; bzip2 and LZMA inflate a whole read's worth
#: of compressed bytes at once (zipfile), so a small chunk of them could fill memory: refused.
_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_READ_CHUNK = 1024 * 1024
_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
#: Modes Pillow's `convert("RGB")` turns into 8-bit colour faithfully (16-bit gray is scaled here).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ORIENTATION = 0x0112  # the EXIF tag
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # orientations that swap width and height


def _refuse(detail: str) -> InvalidDatasetError:
    return InvalidDatasetError(detail, code="invalid_preprocessing")


def _choice(value: Any, name: str, valid: tuple[str, ...], *, upper: bool = False) -> str:
    """`value` if it is one of `valid`, compared without case."""
    if isinstance(value, str):
        value = value.upper() if upper else value.lower()
    text = value
    if text not in valid:
        raise _refuse(f"{name} must be one of {', '.join(valid)}; got {value!r}")
    return cast(str, text)


def _positive_int(value: Any, name: str, *, at_most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= at_most:
        raise _refuse(f"{name} must be a whole number from 1 to {at_most}; got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _stats(value: Any, name: str, channels: int) -> tuple[float, ...]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    values = [value] if _is_number(value) else value
    if (
        isinstance(values, str | bytes)
        or not isinstance(values, Sequence)
        or not all(_is_number(v) for v in values)
    ):
        raise _refuse(f"{name} must be a list of numbers, one per channel; got {value!r}")
    if len(values) == 1:
        values = list(values) * channels  # one value for every channel, as torchvision broadcasts it
    if len(values) != channels:
        raise _refuse(f"{name} has {len(values)} values; the images have {channels} channel(s)")
    result = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in result):
        raise _refuse(f"{name} must be finite numbers; got {list(result)}")
    return result


@dataclass(frozen=True)
class ImagePreprocessing:
    """How each image becomes one row of the dataset (per sample: `[C, H, W]` or `[H, W, C]`).

    `size` is (height, width) of the output. `resize`:
    - `resize_shorter_then_center_crop`: the shorter side resized to `resize_size` (the aspect ratio
      kept), then the center `size` cropped: torchvision's `Resize(256)` + `CenterCrop(224)`.
      `resize_size` defaults to `size / 0.875`, rounded down (256 for 224), and may not be smaller
      than the crop;
    - `resize`: stretched to `size` (`Resize((h, w))`), the aspect ratio not kept;
    - `none`: used as they are; every image must be `size`, or, with `size` unset, all alike.
    `mean` and `std` (on pixels scaled to 0-1, as after `ToTensor`) are listed in the output's
    channel order (for `BGR`, blue first) and applied after it; one value applies to every channel.
    Unset, they are ImageNet's for RGB and BGR, and 0 and 1 (pixels 0-1) for GRAY; uint8 output
    holds raw 0-255 pixels (no scaling, no normalization: mean and std must stay unset).
    """

    size: tuple[int, int] | None = None
    resize: ResizePolicy = "resize_shorter_then_center_crop"
    resize_size: int | None = None
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: ChannelOrder = "RGB"
    layout: Layout = "NCHW"
    dtype: PixelDType = "float32"
    exif_orientation: bool = True

    def __post_init__(self) -> None:
        # Values are resolved here, so what is stored and shown is exactly what was applied.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        resize = _choice(self.resize, "resize", RESIZE_POLICIES)
        put("resize", resize)
        put("interpolation", _choice(self.interpolation, "interpolation", INTERPOLATIONS))
        put("channel_order", _choice(self.channel_order, "channel_order", CHANNEL_ORDERS, upper=True))
        put("layout", _choice(self.layout, "layout", LAYOUTS, upper=True))
        put("dtype", _choice(self.dtype, "dtype", PIXEL_DTYPES))
        if not isinstance(self.exif_orientation, bool):
            raise _refuse(f"exif_orientation must be true or false; got {self.exif_orientation!r}")

        size: Any = self.size
        if size is None and resize != "none":
            size = DEFAULT_SIZE
        if size is not None:
            if isinstance(size, int | np.integer) and not isinstance(size, bool):
                size = (size, size)
            if isinstance(size, str | bytes) or not isinstance(size, Sequence) or len(size) != 2:
                raise _refuse(f"size must be [height, width] (or one number for a square); got {size!r}")
            size = (
                _positive_int(size[0], "size's height", at_most=MAX_SIDE),
                _positive_int(size[1], "size's width", at_most=MAX_SIDE),
            )
        put("size", size)

        if resize == "resize_shorter_then_center_crop":
            crop = max(size)
            resize_size = (
                math.floor(crop / DEFAULT_CROP_FRACTION)
                if self.resize_size is None
                else _positive_int(self.resize_size, "resize_size", at_most=MAX_SIDE)
            )
            if resize_size < crop:
                raise _refuse(
                    f"resize_size {resize_size} is smaller than the crop {size[0]}x{size[1]} (height x "
                    "width): the shorter side is resized to resize_size, then the crop is cut from it, "
                    f"so resize_size must be at least {crop}"
                )
            put("resize_size", resize_size)
        elif self.resize_size is not None:
            raise _refuse(f"resize_size applies to resize_shorter_then_center_crop only, not to {resize!r}")

        channels = self.channels
        if self.dtype == "uint8":
            if self.mean is not None or self.std is not None:
                raise _refuse(
                    "uint8 output holds raw pixels 0-255: mean and std apply to float32 and float16 only"
                )
            return
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.0,), (1.0,))
        if self.channel_order == "BGR":
            default_mean, default_std = default_mean[::-1], default_std[::-1]
        mean = _stats(default_mean if self.mean is None else self.mean, "mean", channels)
        std = _stats(default_std if self.std is None else self.std, "std", channels)
        if not all(0.0 <= v <= 1.0 for v in mean):
            raise _refuse(
                f"mean {list(mean)} is out of 0-1: mean and std apply to pixels scaled to 0-1 (as after "
                "torchvision's ToTensor); for values on 0-255, such as 123.675, divide them by 255"
            )
        if not all(v > 0 for v in std):
            raise _refuse(f"std {list(std)} must be above 0 for every channel")
        put("mean", mean)
        put("std", std)

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "GRAY" else 3

    def sample_shape(self, size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """One row's shape; `size` (height, width) where the spec leaves it to the images."""
        height, width = self.size or size or (0, 0)
        if self.layout == "NCHW":
            return (self.channels, height, width)
        return (height, width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": None if self.size is None else list(self.size),
            "resize": self.resize,
            "resize_size": self.resize_size,
            "interpolation": self.interpolation,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
            "dtype": self.dtype,
            "exif_orientation": self.exif_orientation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImagePreprocessing:
        """From `to_dict`'s shape, or a user's (any field left out takes its default)."""
        values = spec_values(cls, data, "preprocessing", _refuse)
        for name in ("size", "mean", "std"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    def value_table(self) -> np.ndarray | None:
        """Pixel value (0-255) -> output value, per channel: `[channels, 256]` in the output dtype.
        The same float32 operations as `ToTensor` then `Normalize`, (v / 255 - mean) / std, done once
        for each of the 256 values."""
        if self.mean is None or self.std is None:
            return None
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return ((levels[None, :] - mean) / std).astype(self.dtype)


@dataclass(frozen=True)
class ImageFolder:
    """An image-folder dataset read into arrays, shaped like a read `.npz`."""

    arrays: dict[str, np.ndarray]  # {input name: [samples, ...]}
    labels: np.ndarray | None  # int64 class indices, one per sample; None when unlabelled
    classes: tuple[str, ...] | None  # class names, label i is classes[i]; None when unlabelled
    files: tuple[str, ...]  # each sample's member name, in row order
    spec: ImagePreprocessing

    @property
    def samples(self) -> int:
        return len(self.files)

    def npz_arrays(self) -> dict[str, np.ndarray]:
        """What `np.savez` stores and `engines.ingest.datasets.inspect_arrays` checks: the arrays
        plus `labels` when labelled."""
        if self.labels is None:
            return dict(self.arrays)
        return {**self.arrays, LABELS_KEY: self.labels}

    def describe(self) -> dict[str, Any]:
        """What to store with the dataset and show beside its DatasetInfo."""
        return {
            "format": "image_folder",
            "images": self.samples,
            "preprocessing": self.spec.to_dict(),
            "class_names": None if self.classes is None else list(self.classes),
        }


def is_image_folder_archive(path: Path) -> bool:
    """A zip with no `.npy` member: an image folder, not an `.npz` (what `np.savez` writes)."""
    if not is_zip_archive(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.lower().endswith(".npy") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]  # the path, split, with any wrapper folders removed


@dataclass(frozen=True)
class ImageFolderPlan:
    """What an image folder will become, known before any pixel is decoded: its members in row
    order, their labels, and the output's shape, checked against the limits. Decoding it is then
    work of a known size (inline for a small one, a worker job for a large one)."""

    members: tuple[str, ...]  # member names, in row order
    labels: np.ndarray | None
    classes: tuple[str, ...] | None
    spec: ImagePreprocessing
    size: tuple[int, int]  # each row's (height, width)
    input_name: str

    @property
    def samples(self) -> int:
        return len(self.members)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.samples, *self.spec.sample_shape(self.size))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.spec.dtype).itemsize

    def describe(self) -> dict[str, Any]:
        """What to store with the dataset and show beside its DatasetInfo."""
        return {
            "format": "image_folder",
            "images": self.samples,
            "preprocessing": self.spec.to_dict(),
            "class_names": None if self.classes is None else list(self.classes),
        }

    def info(self) -> DatasetInfo:
        """The dataset's description before it is decoded (what a `processing` dataset shows)."""
        return DatasetInfo(
            samples=self.samples,
            arrays={self.input_name: ArraySpec(self.shape, self.spec.dtype)},
            has_labels=self.labels is not None,
            classes=None if self.labels is None else len(np.unique(self.labels)),
        )


def plan_image_folder(
    zip_path: Path,
    spec: ImagePreprocessing,
    *,
    max_unpacked_bytes: int,
    max_images: int,
    input_name: str = "input",
    classes: Sequence[str] | None = None,
    max_pixels: int | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    limits: DatasetLimits | None = None,
) -> ImageFolderPlan:
    """Everything `read_image_folder` checks before it decodes a pixel: the archive (paths, declared
    sizes, member types), the layout and labels, the number of images, and the bytes the arrays
    will take (images × size × channels × dtype, against `limits.max_bytes` and
    `max_unpacked_bytes`). With `resize: none` and no size, the first image's header gives it."""
    limits = limits or DatasetLimits(max_image_pixels=max_pixels or _pillow_limit())
    class_list = _class_list(classes)
    archive = open_dataset_zip(
        zip_path,
        max_unpacked_bytes,
        not_a_zip="the file is not a zip archive of images, nor an .npz",
        remedy="split the images into several smaller uploads",
    )
    with archive:
        members, folders = _members(archive, max_image_bytes)
        if not members:
            raise InvalidDatasetError(
                "the archive holds no images (accepted: " + ", ".join(IMAGE_EXTENSIONS) + ")"
            )
        if len(members) > max_images:
            raise InvalidDatasetError(
                f"the archive holds {len(members)} images, over the limit of {max_images}: "
                "split it into several datasets",
                code="too_many_images",
            )
        limits.check_samples(len(members))
        members, folders = _strip_wrappers(members, folders)
        ordered, labels, class_names = _label(members, folders, class_list)
        size = spec.size
        if size is None:  # resize 'none', no size: every image must be as large as the first
            first = ordered[0].info
            width, height = image_size(
                archive, first, limits.max_image_pixels, oriented=spec.exif_orientation
            )
            size = (height, width)
    plan = ImageFolderPlan(
        members=tuple(member.info.filename for member in ordered),
        labels=labels,
        classes=class_names,
        spec=spec,
        size=size,
        input_name=input_name,
    )
    bounded = replace(limits, max_bytes=min(limits.max_bytes, max_unpacked_bytes))
    bounded.check_bytes(
        plan.nbytes,
        f"{plan.samples} images of {size[0]}x{size[1]} (height x width) in {spec.dtype}",
        "upload fewer images per dataset, choose a smaller size, or use float16 or uint8",
    )
    return plan


def _pillow_limit() -> int:
    return Image.MAX_IMAGE_PIXELS or 89_478_485


def image_size(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_pixels: int, *, oriented: bool = False
) -> tuple[int, int]:
    """(width, height) from the image's header, read lazily by Pillow (the pixels are not decoded,
    the member is inflated only as far as its header), refused over `max_pixels`; `oriented`: as
    its EXIF orientation turns it (a quarter turn swaps the sides)."""
    with archive.open(info) as stream, _opened(stream, info.filename, max_pixels) as image:
        width, height = image.size
        if oriented:
            with contextlib.suppress(Exception):  # a damaged EXIF block: used as stored, as _pixels does
                if image.getexif().get(_ORIENTATION, 1) in _QUARTER_TURNS:
                    return height, width
        return width, height


def header_pixels(zip_path: Path, plan: ImageFolderPlan, max_pixels: int) -> int:
    """The pixels of every image in all, from their headers (each refused over `max_pixels`): what
    decoding the folder will cost, known before it is done."""
    total = 0
    with zipfile.ZipFile(zip_path) as archive:
        for name in plan.members:
            width, height = image_size(archive, archive.getinfo(name), max_pixels)
            total += width * height
    return total


ProgressFn = Callable[[int, int], None]


def decode_image_folder(
    zip_path: Path,
    plan: ImageFolderPlan,
    out: np.ndarray,
    *,
    max_pixels: int,
    progress: ProgressFn | None = None,
) -> None:
    """Decode every image of the plan into `out` (`plan.shape`, in memory or a memory-mapped
    `.npy`), one at a time: memory is one image beside the output. `progress(done, total)` is
    called after each image (a job reports it and checks for cancellation there)."""
    writer = _Output(plan.spec, out, plan.size)
    with zipfile.ZipFile(zip_path) as archive:
        for index, name in enumerate(plan.members):
            pixels = _decode(archive, archive.getinfo(name), plan.spec, max_pixels)
            writer.put(index, pixels, name)
            if progress is not None:
                progress(index + 1, plan.samples)


def read_image_folder(
    zip_path: Path,
    spec: ImagePreprocessing,
    *,
    max_unpacked_bytes: int,
    max_images: int,
    input_name: str = "input",
    classes: Sequence[str] | None = None,
    max_pixels: int | None = None,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    limits: DatasetLimits | None = None,
) -> ImageFolder:
    """Read a zip of images (see the module's docstring) into one array `[samples, ...]` keyed by
    `input_name`, with labels from class folders; raise InvalidDatasetError (InvalidImageError for
    one member) saying why not.

    `classes` is the model's class list, in the order of its outputs: folder names map onto it.
    `max_unpacked_bytes` bounds both what the archive declares it unpacks to (checked before
    anything is inflated) and the output array (checked before it is allocated, with
    `limits.max_bytes`); `max_images` the number of images; `max_pixels` each image's pixels
    (default: Pillow's `Image.MAX_IMAGE_PIXELS`), checked from its header before its pixels are
    decoded; `max_image_bytes` each image file.
    """
    limits = limits or DatasetLimits(max_image_pixels=max_pixels or _pillow_limit())
    plan = plan_image_folder(
        zip_path,
        spec,
        max_unpacked_bytes=max_unpacked_bytes,
        max_images=max_images,
        input_name=input_name,
        classes=classes,
        max_image_bytes=max_image_bytes,
        limits=limits,
    )
    array = np.empty(plan.shape, dtype=spec.dtype)
    decode_image_folder(zip_path, plan, array, max_pixels=limits.max_image_pixels)
    return ImageFolder(
        arrays={input_name: array}, labels=plan.labels, classes=plan.classes, files=plan.members, spec=spec
    )


def _class_list(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    if classes is None:
        return None
    if isinstance(classes, str | bytes) or not all(isinstance(name, str) and name for name in classes):
        raise InvalidDatasetError("classes must be a list of non-empty folder names", code="invalid_labels")
    names = tuple(classes)
    if not names:
        raise InvalidDatasetError("the class list is empty", code="invalid_labels")
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise InvalidDatasetError(f"the class list names {twice} more than once", code="invalid_labels")
    return names


def _split(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The member's path as parts, refusing any that could point outside the archive."""
    name = info.filename.replace("\\", "/")  # zips written on Windows by some tools
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or ":" in name:
        raise InvalidDatasetError(
            f"archive member '{info.filename}' points outside the archive", code="archive_path_traversal"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise InvalidDatasetError(
            f"archive member '{info.filename}' is a symlink", code="archive_path_traversal"
        )
    return tuple(part for part in path.parts if part not in ("", "."))


def _ignored(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part in IGNORED_FOLDERS for part in parts) or (
        bool(parts) and parts[-1].lower() in IGNORED_NAMES
    )


def _members(archive: zipfile.ZipFile, max_image_bytes: int) -> tuple[list[_Member], set[tuple[str, ...]]]:
    """The image members and the folder entries, every member checked before any is read."""
    images: list[_Member] = []
    folders: set[tuple[str, ...]] = set()
    names: set[tuple[str, ...]] = set()
    for info in archive.infolist():
        parts = _split(info)
        if not parts or _ignored(parts):
            continue
        if info.is_dir():
            folders.add(parts)
            continue
        if info.flag_bits & 0x1:
            raise InvalidDatasetError(f"archive member '{info.filename}' is encrypted")
        if info.compress_type not in _SUPPORTED_COMPRESSION:
            raise InvalidDatasetError(
                f"archive member '{info.filename}' uses compression method {info.compress_type}; "
                "use stored or deflate"
            )
        if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
            raise InvalidImageError(
                f"archive member '{info.filename}' is not an image: accepted are "
                + ", ".join(IMAGE_EXTENSIONS)
                + " (ignored: __MACOSX/, names starting with '.', Thumbs.db, desktop.ini)",
                member=info.filename,
                code="not_an_image",
            )
        if parts in names:
            raise InvalidDatasetError(f"archive member '{info.filename}' appears twice in the archive")
        if info.file_size > max_image_bytes:
            raise InvalidImageError(
                f"image '{info.filename}' is {info.file_size} bytes, over the limit of {max_image_bytes} "
                "for one image file",
                member=info.filename,
                code="image_too_large",
            )
        names.add(parts)
        folders.update(parts[:depth] for depth in range(1, len(parts)))
        images.append(_Member(info, parts))
    return images, folders


def _strip_wrappers(
    members: list[_Member], folders: set[tuple[str, ...]]
) -> tuple[list[_Member], set[tuple[str, ...]]]:
    """Remove folders that hold everything and have folders inside (`val/cat/001.jpg` ->
    `cat/001.jpg`): what zipping a folder rather than its contents adds."""
    while (
        all(len(m.parts) >= 2 for m in members)
        and len({m.parts[0] for m in members}) == 1
        and any(len(m.parts) >= 3 for m in members)
    ):
        top = members[0].parts[0]
        members = [_Member(m.info, m.parts[1:]) for m in members]
        folders = {f[1:] for f in folders if len(f) > 1 and f[0] == top}
    return members, folders


def _order(member: _Member) -> tuple[str, str, str]:
    """torchvision's order: by class, then by folder path (`os.walk`, sorted), then by file name."""
    parts = member.parts
    return (parts[0] if len(parts) > 1 else "", "/".join(parts[:-1]), parts[-1])


def _label(
    members: list[_Member], folders: set[tuple[str, ...]], class_list: tuple[str, ...] | None
) -> tuple[list[_Member], np.ndarray | None, tuple[str, ...] | None]:
    """The members in row order, their labels and the class names, from the layout."""
    ordered = sorted(members, key=_order)
    top = [m for m in ordered if len(m.parts) == 1]
    nested = [m for m in ordered if len(m.parts) > 1]
    if top and nested:
        raise InvalidDatasetError(
            f"images are both at the top of the archive ('{top[0].info.filename}') and in folders "
            f"('{nested[0].info.filename}'): put every image in a class folder (cat/001.jpg) for a "
            "labelled dataset, or every image at the top for an unlabelled one",
            code="mixed_layout",
        )
    found = sorted({m.parts[0] for m in nested})
    if class_list is None and len(found) <= 1:
        return ordered, None, None  # flat, or one folder holding everything (a wrapper)
    if not nested:
        raise InvalidDatasetError(
            "a class list was given, but the images are not in class folders (cat/001.jpg)",
            code="invalid_labels",
        )
    if class_list is None:
        empty = sorted("/".join(f) for f in folders if len(f) == 1 and f[0] not in found)
        if empty:
            raise InvalidDatasetError(
                f"class folder '{empty[0]}/' holds no images; an empty class would shift the label of "
                "every class after it (torchvision's ImageFolder refuses it too): remove it, or give "
                "the class list",
                code="invalid_labels",
            )
        class_list = tuple(found)
    index = {name: i for i, name in enumerate(class_list)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise InvalidDatasetError(
            f"folder '{unknown[0]}/' is not one of the {len(class_list)} classes given"
            + (f" (and {len(unknown) - 1} more folders)" if len(unknown) > 1 else ""),
            code="invalid_labels",
        )
    ordered = sorted(nested, key=lambda m: (index[m.parts[0]], *_order(m)[1:]))  # by label
    labels = np.fromiter((index[m.parts[0]] for m in ordered), dtype=np.int64, count=len(ordered))
    return ordered, labels, class_list


class _Output:
    """Writes each image's pixels into its row of the output, through the value table."""

    def __init__(self, spec: ImagePreprocessing, array: np.ndarray, size: tuple[int, int]):
        self.spec, self.size, self._array = spec, size, array
        self.lut = spec.value_table()

    def put(self, index: int, pixels: np.ndarray, member: str) -> None:
        """One image's pixels, `[H, W, C]` uint8 in the output's channel order."""
        height, width = pixels.shape[:2]
        if (height, width) != self.size:
            expected = self.size
            raise InvalidImageError(
                f"image '{member}' is {width}x{height} (width x height), but "
                + (
                    f"the first image is {expected[1]}x{expected[0]}"
                    if self.spec.size is None
                    else f"the preprocessing size is {expected[1]}x{expected[0]}"
                )
                + ": with resize 'none' every image must be that size; choose "
                "'resize_shorter_then_center_crop' or 'resize' to make them one size",
                member=member,
                code="image_size_mismatch",
            )
        nchw = self.spec.layout == "NCHW"
        if self.lut is None:  # uint8: the pixels themselves
            self._array[index] = pixels.transpose(2, 0, 1) if nchw else pixels
            return
        for channel in range(pixels.shape[2]):  # each value looked up, written in place
            target = self._array[index, channel] if nchw else self._array[index, :, :, channel]
            np.take(self.lut[channel], pixels[:, :, channel], out=target, mode="clip")


@contextlib.contextmanager
def _opened(data: IO[bytes], name: str, max_pixels: int) -> Iterator[Image.Image]:
    """The image Pillow opens lazily (its header only), refused over `max_pixels` or when its
    pixels are not 8 or 16 bits, before anything is decoded."""
    try:
        image: Image.Image = Image.open(data, formats=list(PILLOW_FORMATS))
    except Image.DecompressionBombError as exc:
        raise _too_large(name, exc) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"image '{name}' is not a JPEG, PNG, BMP, WebP or PPM image Pillow can read",
            member=name,
        ) from exc
    except Exception as exc:
        raise InvalidImageError(f"image '{name}' could not be decoded: {exc}", member=name) from exc
    with image:
        width, height = image.size
        if width * height > max_pixels:  # from the header: nothing decoded yet
            raise _too_large(name, f"{width}x{height} pixels, over the limit of {max_pixels}")
        if image.mode not in _EIGHT_BIT_MODES | _SIXTEEN_BIT_MODES:
            raise InvalidImageError(
                f"image '{name}' has pixels of mode {image.mode} (32-bit or floating-point): save it "
                "with 8-bit channels",
                member=name,
            )
        yield image


def _decode(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, spec: ImagePreprocessing, max_pixels: int
) -> np.ndarray:
    """One member as `[H, W, C]` uint8 after orientation, colour conversion, resizing and cropping,
    in the output's channel order."""
    name = info.filename
    try:
        data = _read_member(archive, info)
    except Exception as exc:  # bad CRC, truncated member, damaged compressed stream
        raise InvalidDatasetError(f"archive member '{name}' could not be read: {exc}") from exc
    with _opened(data, name, max_pixels) as image:
        try:
            return _pixels(image, spec)
        except Image.DecompressionBombError as exc:
            raise _too_large(name, exc) from exc
        except MemoryError:
            raise
        except Exception as exc:  # truncated data, corrupt chunks, bad EXIF: Pillow raises many kinds
            raise InvalidImageError(f"image '{name}' could not be decoded: {exc}", member=name) from exc


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> io.BytesIO:
    """The member's bytes, inflated a chunk at a time: never more than its declared size (zipfile
    stops there, and a lie ends in a CRC error) plus one chunk in memory."""
    data = io.BytesIO()
    with archive.open(info) as stream:
        while chunk := stream.read(_READ_CHUNK):
            data.write(chunk)
    data.seek(0)
    return data


def _too_large(name: str, why: object) -> InvalidImageError:
    return InvalidImageError(
        f"image '{name}' is too large to decode safely ({why}); a decompression bomb is refused",
        member=name,
        code="image_too_large",
    )


def _pixels(image: Image.Image, spec: ImagePreprocessing) -> np.ndarray:
    image.load()  # raises on truncated data (unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set)
    if spec.exif_orientation:
        with contextlib.suppress(Exception):  # a damaged EXIF block: the pixels, used as stored
            if image.getexif().get(_ORIENTATION, 1) != 1:  # (exif_transpose copies even when upright)
                image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:  # `convert` clips 16-bit values at 255: keep the high byte
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    if image.mode != "RGB":  # (convert copies even when it has nothing to do)
        image = image.convert("RGB")
    if spec.channel_order == "GRAY":
        image = image.convert("L")  # torchvision's Grayscale: ITU-R 601-2 luma
    image = _resize(image, spec)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    return pixels


def _resize(image: Image.Image, spec: ImagePreprocessing) -> Image.Image:
    """torchvision's `Resize` and `CenterCrop` on a PIL image (transforms.functional), step by step."""
    if spec.resize == "none" or spec.size is None:
        return image
    resample = _RESAMPLING[spec.interpolation]
    height, width = spec.size
    if spec.resize == "resize":
        return image if image.size == (width, height) else image.resize((width, height), resample)
    assert spec.resize_size is not None
    in_width, in_height = image.size
    short, long = (in_width, in_height) if in_width <= in_height else (in_height, in_width)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)
    new_width, new_height = (new_short, new_long) if in_width <= in_height else (new_long, new_short)
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), resample)
    top = round((new_height - height) / 2.0)  # int(round()): banker's rounding
    left = round((new_width - width) / 2.0)
    return image.crop((left, top, left + width, top + height))
