"""Settings of `milenas-fast train` (DARTS train.py flag names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..config import TRACKING, Settings, check_image_size, opt

from ..errors import ConfigError

# The DARTS ImageNet protocol (mobile setting): what `--dataset imagenet` uses for every flag not typed.
DATASET_DEFAULTS = {
    "imagenet": dict(layers=14, init_channels=48, auxiliary=True, drop_path_prob=0.0, label_smooth=0.1,
                     learning_rate=0.1, lr_schedule="exponential", gamma=0.97, weight_decay=3e-5, batch_size=128,
                     epochs=250, grad_clip=5.0, image_size=224),
}


@dataclass
class TrainConfig(Settings):
    # what is trained
    arch: str = opt("", "a published cell: DARTS_V1, DARTS_V2 (alias DARTS), MILENAS; default DARTS_V2 "
                         "unless --genotype is given")
    genotype: str = opt("", "Genotype(...) text, a .txt/.json file, or a search run folder (its genotype.json)")
    init_channels: int = opt(36, "channels of the first cell")
    layers: int = opt(20, "number of cells")
    auxiliary: bool = opt(False, "auxiliary classifier head at 2/3 depth")
    auxiliary_weight: float = opt(0.4, "weight of the auxiliary loss")
    drop_path_prob: float = opt(0.2, "drop path probability, ramped linearly: epoch e uses it × e/epochs (DARTS)")
    # data
    dataset: str = opt("cifar10", "cifar10 or cifar100 (torchvision, downloaded into --data when missing), synthetic, "
                                  "imagefolder (--data DIR with DIR/train and DIR/val, in memory) or imagenet "
                                  "(DIR/train and DIR/val, streamed; the DARTS ImageNet protocol's defaults)",
                        ("cifar10", "cifar100", "synthetic", "imagefolder", "imagenet"))
    data: str = opt("./data", "folder holding (or receiving) CIFAR-10/100, or the image folder")
    image_size: int = opt(32, "side of the training images: imagefolder (resized once, a multiple of 4) and imagenet "
                              "(random-resized crops; default 224, a multiple of 32)")
    synthetic_images: int = opt(5000, "training images of the synthetic set (the test set gets a fifth)")
    batch_size: int = opt(96, "batch size")
    cutout: bool = opt(False, "cutout augmentation")
    cutout_length: int = opt(16, "side of the cutout square")
    workers: int = opt(2, "DataLoader worker processes (--loader torch)")
    loader: str = opt("auto", "auto | torch | gpu (dataset resident on the device) | dali", ("auto", "torch", "gpu", "dali"))
    # optimisation
    epochs: int = opt(600, "number of training epochs")
    learning_rate: float = opt(0.025, "initial learning rate (SGD)")
    lr_schedule: str = opt("cosine", "per-epoch learning rate: cosine (to 0 over --epochs) or exponential (× --gamma "
                                     "each epoch; imagenet's default)", ("cosine", "exponential"))
    gamma: float = opt(0.97, "decay per epoch of --lr_schedule exponential")
    label_smooth: float = opt(0.0, "label smoothing of the training loss (imagenet: 0.1)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(3e-4, "SGD weight decay")
    grad_clip: float = opt(5.0, "gradient norm clipping (0 disables)")
    # runtime
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto | cpu | cuda", ("auto", "cpu", "cuda"))
    amp: bool = opt(False, "mixed precision (bf16 autocast; fp16 + loss scaling where bf16 is unsupported)")
    deterministic: bool = opt(False, "deterministic algorithms (bit-exact reruns and resume on CPU)")
    report_freq: int = opt(50, "log a training line every N steps")
    quiet: bool = opt(False, "no per-step console lines (log.txt is unchanged)")
    save: str = opt("EXP", "experiment name: the run folder is eval-<save>-<YYYYmmdd-HHMMSS>")
    save_dir: str = opt("", "exact run folder (overrides --save)")
    resume: str = opt("", "continue the run in RUN_DIR (or from a checkpoint file)")

    # Flags that only change how a run executes, not what it computes: they may differ on --resume.
    RUNTIME = ("device", "workers", "report_freq", "quiet", "resume", "save", "save_dir", "data", "loader",
               "dist_timeout", *TRACKING)

    def validate(self) -> "TrainConfig":
        self.check(
            positive=("synthetic_images", "batch_size", "init_channels", "layers", "epochs", "report_freq",
                      "cutout_length", "dist_timeout", "learning_rate"),
            nonneg=("weight_decay", "grad_clip", "auxiliary_weight", "workers"),
            fractions=("momentum", "drop_path_prob", "label_smooth"))
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"--gamma must lie in (0, 1], got {self.gamma}")
        check_image_size(self.dataset, self.image_size, {"imagefolder": 4, "imagenet": 32})
        if self.layers < 3:
            raise ConfigError(f"--layers must be at least 3 (two reduction cells and a normal one), got {self.layers}")
        if self.arch and self.genotype:
            raise ConfigError("give either --arch or --genotype, not both")
        return self

    def with_dataset_defaults(self, explicit: dict | None = None) -> "TrainConfig":
        """The dataset's protocol values (DATASET_DEFAULTS) for every flag not typed. `explicit`: the flags
        typed on the command line; None (the Python API): every field still at its CIFAR default counts
        as not typed."""
        protocol = DATASET_DEFAULTS.get(self.dataset, {})
        if explicit is None:
            explicit = {f.name for f in fields(self) if getattr(self, f.name) != f.default}
        return replace(self, **{k: v for k, v in protocol.items() if k not in explicit})
