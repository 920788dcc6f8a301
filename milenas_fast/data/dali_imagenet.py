"""The DALI ImageNet pipeline: the DARTS ImageNet transforms with JPEG decoding on the GPU (`mixed`), or
on the CPU when `device_id` is None (how CI tests it).

    files in this epoch's order (imagenet.epoch_order), fn.readers.file with shard_id/num_shards
    train: decoders.image_random_crop (area 0.08–1, aspect 3/4–4/3, 10 attempts; the decoder decodes only
           the crop) → resize to S×S (linear, antialiased) → colour twist → flip (coin) → normalise
    val:   decoders.image → resize the shorter side to int(S·256/224), the longer to int(long·that/short)
           (torchvision's Resize, computed in the graph from the encoded image's shape) → centre S×S → normalise
    → float32 CHW, (x − 255·mean)/(255·std) with ImageNet's mean/std

What differs from torchvision (imagenet.TorchImageLoader), and why the tests compare validation outputs
numerically but training outputs by shape and statistics: the random draws are DALI's; the colour twist
applies brightness, contrast (around mid-grey, not the image's mean), saturation and hue (DALI's linear
RGB approximation of an HSV rotation) in one fixed order, where torchvision's ColorJitter(0.4, 0.4, 0.4,
0.2) applies its four steps in a random order. Factors are drawn as in torchvision: brightness, contrast,
saturation uniform on [0.6, 1.4], hue on ±0.2 of a turn (±72°).

Corrupt files: DALI's decoder fails the whole batch on one. The run's scan checks files before it starts
(imagefolder.scan check=...); a file that still fails mid-epoch is a DALI failure handled by dali_loader's
Guard: under `--loader auto` the torchvision loader takes over at that batch (it skips and counts the
file); an explicit `--loader dali` stops with a one-line error suggesting `--loader torch`.
"""
from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = 0.4        # brightness, contrast, saturation: factor uniform on [1 − 0.4, 1 + 0.4]
HUE = 0.2           # fraction of a turn
RESIZE_RATIO = 256 / 224


def val_resize(image_size: int) -> int:
    """The shorter side before the centre crop: 256 for 224, as in DARTS."""
    return int(image_size * RESIZE_RATIO)


def build_pipeline(files: list[str], labels: list[int], *, train: bool, batch_size: int, image_size: int,
                   device_id: int | None, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                   num_threads: int = 4):
    """A built DALI pipeline with outputs (images float32 [B, 3, S, S], labels int32 [B, 1]) over the
    `shard_id`-th of `num_shards` contiguous slices of `files` (in the given order, not reshuffled)."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    S = image_size
    decode_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=False, pad_last_batch=True, name="files")
        if train:
            images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.color_twist(images, brightness=fn.random.uniform(range=[1 - JITTER, 1 + JITTER]),
                                    contrast=fn.random.uniform(range=[1 - JITTER, 1 + JITTER]),
                                    saturation=fn.random.uniform(range=[1 - JITTER, 1 + JITTER]),
                                    hue=fn.random.uniform(range=[-360 * HUE, 360 * HUE]))
            mirror, crop = fn.random.coin_flip(probability=0.5), {}
        else:
            shape = fn.peek_image_shape(jpegs)
            h, w = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
            short, R = dmath.min(h, w), val_resize(S)
            # (long·R)/short in this order: exact integers stay exact, so floor() agrees with torchvision's int()
            h, w = dmath.floor(h * R / short), dmath.floor(w * R / short)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_x=w, resize_y=h, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror, crop = 0, {"crop": (S, S), "crop_pos_x": _centre(w, S, dmath), "crop_pos_y": _centre(h, S, dmath)}
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                          mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD], **crop)
        return images, (label if device_id is None else label.gpu())  # both outputs where the loader copies from

    p = pipe()
    p.build()
    return p


def _centre(size, S: int, dmath):
    """crop_pos for torchvision's centre crop of S from `size` (a DataNode): the offset is round((size − S)/2)
    with Python's round, halves to the even neighbour (DALI's own centre rounds 16.5 to 17, torchvision to
    16). DALI multiplies crop_pos by size − S; the +0.25 makes rounding or truncating that product agree."""
    d = size - S
    offset = dmath.floor(d / 2)
    half = d - 2 * offset  # 1 where (size − S)/2 ends in .5
    offset = offset + half * (offset - 2 * dmath.floor(offset / 2))  # odd offset → the even one above
    return (offset + 0.25) / dmath.max(d, 1.0)
