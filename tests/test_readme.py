"""The README documents every flag of `search` and `train` (the flags are generated from the settings)."""
from dataclasses import fields
from pathlib import Path

import pytest

from milenas_fast.config import SearchConfig
from milenas_fast.train.config import TrainConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("settings", [SearchConfig, TrainConfig])
def test_every_flag_is_in_the_readme(settings):
    missing = [f.name for f in fields(settings) if f"`--{f.name}`" not in README]
    assert not missing, f"README lacks {missing}"
