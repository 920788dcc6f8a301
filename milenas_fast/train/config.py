"""Settings of `milenas-fast train` (DARTS train.py flag names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, Settings, opt


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
    dataset: str = opt("cifar10", "cifar10 (torchvision, downloaded into --data when missing) or synthetic",
                        ("cifar10", "synthetic"))
    data: str = opt("./data", "folder holding (or receiving) CIFAR-10")
    synthetic_images: int = opt(5000, "training images of the synthetic set (the test set gets a fifth)")
    batch_size: int = opt(96, "batch size")
    cutout: bool = opt(False, "cutout augmentation")
    cutout_length: int = opt(16, "side of the cutout square")
    workers: int = opt(2, "DataLoader worker processes (--loader torch)")
    loader: str = opt("auto", "auto | torch | gpu (dataset resident on the device) | dali", ("auto", "torch", "gpu", "dali"))
    # optimisation
    epochs: int = opt(600, "number of training epochs")
    learning_rate: float = opt(0.025, "initial learning rate (SGD, cosine to 0)")
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
    RUNTIME = ("device", "workers", "report_freq", "quiet", "resume", "save", "save_dir", "data", "loader")

    def validate(self) -> "TrainConfig":
        self.check(
            positive=("synthetic_images", "batch_size", "init_channels", "layers", "epochs", "report_freq",
                      "cutout_length"),
            nonneg=("learning_rate", "momentum", "weight_decay", "grad_clip", "auxiliary_weight", "workers"))
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise ConfigError(f"--drop_path_prob must lie in [0, 1), got {self.drop_path_prob}")
        if self.layers < 3:
            raise ConfigError(f"--layers must be at least 3 (two reduction cells and a normal one), got {self.layers}")
        if self.arch and self.genotype:
            raise ConfigError("give either --arch or --genotype, not both")
        return self
