"""Where a run executes and how it repeats: device, seeding, determinism, the RNG state a checkpoint keeps."""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is visible to torch "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CUDA_DETERMINISM = (
    "--deterministic on CUDA: deterministic cuDNN algorithms (no autotuning), a fixed cuBLAS workspace, and "
    "torch's deterministic mode in warn-only form (an op without a deterministic CUDA kernel warns instead of "
    "stopping the run; the search and train steps use none: the global pool is a mean, the loss a 2-D "
    "nll_loss, the Triton and C++ kernels use no atomics). Not guaranteed: identical results on another GPU "
    "model, driver, or torch/cuDNN version; and cuBLAS if CUDA was initialised before CUBLAS_WORKSPACE_CONFIG "
    "was set")


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """--deterministic: bit-exact reruns and resume on CPU (strict: a nondeterministic op is an error). On
    CUDA the same settings, but warn-only, and one warning says what is and is not guaranteed."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            warnings.warn(f"milenas_fast: {CUDA_DETERMINISM}", RuntimeWarning, stacklevel=2)
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = device.type == "cuda"


def rng_state() -> dict:
    """Every generator's state as tensors and plain Python values, so a checkpoint loads with
    torch.load(weights_only=True): numpy's key array becomes a list of ints."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict) -> None:
    """`rng_state()`'s dict; numpy's keys may also be an array (checkpoint format 1)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
