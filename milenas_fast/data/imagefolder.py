"""Image folders in the ImageFolder layout: ROOT/<class>/<image>, classes sorted by name, index = position.

`scan` lists the images; `scan_pair` scans a train and a validation folder and insists on the same classes.
Every problem is a one-line DataError, raised before a run writes anything. The optional `check` opens each
file with PIL before the run starts:

- "verify": header and structure (PIL's verify: PNG chunk CRCs, a readable JPEG header); reads a few KB
  per file, fast enough for ImageNet's 1.28M files. A JPEG truncated after its header passes.
- "decode": decodes every file (JPEGs in PIL's draft mode, at 1/8 scale: the entropy-coded data is still
  read in full, so truncation is caught at a fraction of the cost). For small folders.

Files that fail later anyway (changed after the scan, or decodable by PIL's header check only) are the
loaders' business: see imagenet.py.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import DataError

# What the loaders can decode (PIL for torchvision, DALI's image decoder), by lowercase suffix.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CHECKS = (None, "verify", "decode")

Sample = tuple[str, int]  # (path, class index)


def scan(root: str | Path, check: str | None = None) -> tuple[list[str], list[Sample]]:
    """(classes, samples) of ROOT/<class>/*: every class folder must hold at least one image (searched
    recursively, symlinks followed); hidden files and folders are ignored; samples are sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected {root}/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class folders (expected {root}/<class>/<image>)")
    samples: list[Sample] = []
    for index, name in enumerate(classes):
        found = sorted(_images(root / name))
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((path, index) for path in found)
    if check is not None:
        check_files(samples, check)
    return classes, samples


def scan_pair(train_dir: str | Path, val_dir: str | Path,
              check: str | None = None) -> tuple[list[str], list[Sample], list[Sample]]:
    """(classes, train samples, validation samples): both folders must have the same class folders."""
    classes, train = scan(train_dir, check)
    val_classes, val = scan(val_dir, check)
    if classes != val_classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataError(f"{train_dir} and {val_dir} have different class folders: "
                        f"only in train {_some(only_train)}, only in val {_some(only_val)}")
    return classes, train, val


def check_files(samples: list[Sample], check: str = "verify") -> None:
    """Open every file with PIL (see the module docstring); the first failure is a DataError naming it
    and how many more failed."""
    if check not in CHECKS[1:]:
        raise ValueError(f"check must be one of {CHECKS[1:]}, got {check!r}")
    # threads: the check mostly waits on file reads (and PIL's decoder releases the GIL)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = pool.map(lambda path: corrupt(path, check), [path for path, _ in samples], chunksize=256)
        bad = [(path, why) for (path, _), why in zip(samples, reasons) if why is not None]
    if bad:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"corrupt image {path}: {why}{more}; remove or replace it")


def corrupt(path: str, check: str = "verify") -> str | None:
    """Why PIL cannot read `path` (one line), or None."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if check == "verify":
                img.verify()
            else:
                img.draft("RGB", (1, 1))  # JPEG only: decode at the smallest DCT scale
                img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:200] if text else 'unreadable'}"
    return None


def _images(folder: Path):
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(dirpath, f)


def _some(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
