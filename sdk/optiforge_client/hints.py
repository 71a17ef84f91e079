"""What to do about a server error the server's sentence does not say how to fix.

A .zip of images is decoded to 224×224 unless a preprocessing spec says otherwise; against a
64×64 model the job is refused with "… dim 1 is 224, model expects 64 (shape … vs …)". The
sentence is right, but the fix (`preprocessing={"size": [64, 64]}`) is read off the model's
shape here, for the SDK's error (`OptiforgeError.hint`) and the CLI's (`--preprocessing`).
"""

from __future__ import annotations

import re

#: The server's sentence for an array whose size is not the model's, e.g. "input 'input': each row
#: has dim 1 is 224, model expects 64 (shape [3, 224, 224] vs [3, 64, 64])" (a row's shape, or
#: the whole input's with its batch dim first).
_SIZE_MISMATCH = re.compile(r"dim \d+ is \d+, model expects \d+ \(shape \[[^\]]*\] vs \[(?P<want>[^\]]*)\]\)")
#: Channel counts: where a row's first dim is one of these it is [C, H, W], its last: [H, W, C].
_CHANNELS = (1, 3, 4)


def image_size(detail: str) -> tuple[int, int] | None:
    """(height, width) an image input expects, when `detail` is the server's error for arrays
    of another size and does not already say what to send; None otherwise."""
    if "preprocessing" in detail:
        return None
    match = _SIZE_MISMATCH.search(detail)
    if match is None:
        return None
    dims = [item.strip().strip("'\"") for item in match.group("want").split(",")]
    if len(dims) == 4:  # the whole input, its batch dim first
        dims = dims[1:]
    if len(dims) != 3 or not all(dim.isdigit() for dim in dims):
        return None
    sizes = [int(dim) for dim in dims]
    if sizes[0] in _CHANNELS:  # [C, H, W]
        return sizes[1], sizes[2]
    if sizes[2] in _CHANNELS:  # [H, W, C]
        return sizes[0], sizes[1]
    return None


def sdk_hint(detail: str) -> str | None:
    """The SDK's advice for this error sentence, or None."""
    size = image_size(detail)
    if size is None:
        return None
    return (
        f"if that dataset is a .zip of images, upload it with "
        f'preprocessing={{"size": [{size[0]}, {size[1]}]}} (decoded to 224×224 by default)'
    )
