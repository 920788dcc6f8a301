"""A renamed flag keeps its old spelling: `--fused_train_step` is now `--shared_train_pass` ("fused" means
kernel fusion elsewhere), and old command lines, args.json files and checkpoints still mean the same."""
import pytest

from milenas_fast import runs
from milenas_fast.cli import build_parser
from milenas_fast.config import SearchConfig, explicit_flags


@pytest.mark.parametrize("flag, on", [("--shared_train_pass", True), ("--fused_train_step", True),
                                      ("--fused-train-step", True), ("--no-fused_train_step", False)])
def test_both_spellings_set_the_same_setting(flag, on):
    args = build_parser().parse_args(["search", flag])
    assert SearchConfig.from_args(args).shared_train_pass is on
    assert explicit_flags([flag], SearchConfig) == {"shared_train_pass": on}


def test_help_names_the_new_flag_and_the_old_one():
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["search"].format_help().split())
    assert "--shared_train_pass" in text and "formerly --fused_train_step" in text


def test_a_stored_configuration_with_the_old_name_resumes_as_saved():
    saved = {**SearchConfig().to_dict(), "fused_train_step": True}
    del saved["shared_train_pass"]
    assert SearchConfig.from_dict(saved).shared_train_pass
    runs.check_resume_flags(SearchConfig, saved, {"shared_train_pass": True}, "the checkpoint's")
    with pytest.raises(runs.CheckpointError, match="--shared_train_pass False does not match the checkpoint's True"):
        runs.check_resume_flags(SearchConfig, saved, {"shared_train_pass": False}, "the checkpoint's")
