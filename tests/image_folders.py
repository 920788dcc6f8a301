"""Tiny generated ImageFolder trees for the image-folder and ImageNet-loader tests (PIL; odd sizes, a
grayscale JPEG and a PNG among RGB JPEGs). Smooth content plus mild noise: JPEG-like photographs, not
white noise, so decoders and resamplers can be compared with meaningful tolerances."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIZES = [(37, 53), (64, 48), (41, 41), (80, 59), (33, 70), (50, 50)]  # (height, width)


def image_array(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    fy, fx = rng.uniform(0.05, 0.3, size=2)
    wave = 40 * np.sin(fy * yy + fx * xx + rng.uniform(0, 6.3))
    img = base + wave[..., None] * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 6, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, classes=("ant", "bee", "cat"), per_class: int = 4, seed: int = 0,
                png: bool = True, gray: bool = True) -> Path:
    """ROOT/<class>/img<k>.jpg; in the first class one grayscale JPEG and one PNG (when asked)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        (root / name).mkdir(exist_ok=True)
        for k in range(per_class):
            h, w = SIZES[(c * per_class + k) % len(SIZES)]
            img = Image.fromarray(image_array(h, w, seed * 1000 + c * 100 + k))
            if c == 0 and k == 1 and gray:
                img.convert("L").save(root / name / f"img{k}.jpg", quality=92)
            elif c == 0 and k == 2 and png:
                img.save(root / name / f"img{k}.png")
            else:
                img.save(root / name / f"img{k}.jpg", quality=92)
    return root


def corrupt_jpeg(path: Path, how: str = "garbage") -> None:
    """`garbage`: not an image at all (fails PIL's verify); `truncated`: a valid header, data cut short
    (passes verify, fails a full decode)."""
    if how == "garbage":
        path.write_bytes(b"this is not a JPEG" * 10)
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def jpeg_imagenet(root: Path) -> Path:
    """ROOT/train (3 classes × 4 JPEGs) and ROOT/val (3 × 2): the ImageNet layout."""
    make_folder(root / "train", per_class=4, png=False)
    make_folder(root / "val", per_class=2, seed=1, png=False)
    return root
