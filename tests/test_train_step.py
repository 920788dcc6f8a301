"""What one `train` step computes, pinned against a loss written out here: the auxiliary head's weight, label
smoothing (training loss only), the drop-path ramp and the learning-rate schedules. Each check compares
gradients or values that differ by far more than rounding when the rule is wrong."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from milenas_fast.meters import Progress
from milenas_fast.train import loop
from milenas_fast.train.config import TrainConfig

pytestmark = pytest.mark.numerics  # CI reruns them under 2 threads and each CPU kernel set

TINY = dict(dataset="synthetic", synthetic_images=16, init_channels=4, layers=3, batch_size=8, workers=0,
            device="cpu", report_freq=1, quiet=True, arch="DARTS_V2", loader="gpu")


class _Stop(Exception):
    pass


def trainer_for(cfg: TrainConfig) -> loop.Trainer:
    return loop.prepare(cfg.validate(), loop.resolve_genotype(cfg)[0], None)


def first_step(cfg: TrainConfig, epoch: int = 0):
    """Run the trainer's first step of `epoch`; returns the model before the step and what the step saw: its
    inputs and labels, the gradients the optimiser would apply, the model's drop_path_prob in the forward."""
    trainer = trainer_for(cfg)
    trainer.epoch = epoch
    before = copy.deepcopy(trainer.model)
    seen = {}
    forward = trainer.net.forward

    def record_forward(x):
        seen["x"], seen["drop"] = x.clone(), trainer.model.drop_path_prob
        return forward(x)

    def record_step(optimizer, params, clip):
        seen["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        raise _Stop

    criterion = trainer.criterion

    def record_criterion(logits, y):
        seen["y"] = y.clone()
        return criterion(logits, y)

    trainer.net.forward = record_forward
    trainer.precision.step = record_step
    trainer.criterion = record_criterion
    with pytest.raises(_Stop):
        trainer.train_epoch(Progress(False))
    return before, seen


def expected_grads(model, x, y, aux_weight: float, smooth: float):
    """The DARTS train.py loss, written out: CE(logits) + aux_weight · CE(aux logits), smoothing both."""
    model.train()
    model.drop_path_prob = 0.0
    logits, aux = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=smooth)
    if aux is not None:
        loss = loss + aux_weight * F.cross_entropy(aux, y, label_smoothing=smooth)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aux_weight,smooth", [(0.4, 0.0), (0.7, 0.1)])
def test_the_step_trains_on_main_plus_weighted_auxiliary_loss(aux_weight, smooth):
    cfg = TrainConfig(**TINY, auxiliary=True, auxiliary_weight=aux_weight, label_smooth=smooth, epochs=2)
    before, seen = first_step(cfg)
    assert seen["drop"] == 0.0  # epoch 0 of the ramp
    y = seen["y"]
    want = expected_grads(before, seen["x"], y, aux_weight, smooth)
    got = seen["grads"]
    assert got.keys() == want.keys() and any(n.startswith("auxiliary_head") for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # the check can fail: the auxiliary head's gradient is proportional to its weight
    wrong = expected_grads(copy.deepcopy(before), seen["x"], y, aux_weight / 2, smooth)
    head = [n for n in want if n.startswith("auxiliary_head")]
    assert all(not torch.allclose(wrong[n], want[n], rtol=1e-2, atol=1e-6) for n in head[:1])


def test_drop_path_ramps_with_the_epoch():
    cfg = TrainConfig(**TINY, drop_path_prob=0.3, epochs=4)
    _, seen = first_step(cfg, epoch=3)
    assert seen["drop"] == pytest.approx(0.3 * 3 / 4)


def test_test_loss_has_no_label_smoothing():
    trainer = trainer_for(TrainConfig(**TINY, label_smooth=0.2, epochs=1))
    assert trainer.criterion.label_smoothing == 0.2 and trainer.test_criterion.label_smoothing == 0.0


@pytest.mark.parametrize("schedule", ["exponential", "cosine"])
def test_learning_rate_schedule(schedule):
    cfg = TrainConfig(**TINY, learning_rate=0.1, lr_schedule=schedule, gamma=0.9, epochs=5)
    trainer = trainer_for(cfg)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    if schedule == "exponential":  # DARTS ImageNet: × gamma per epoch
        want = [0.1 * 0.9 ** e for e in range(5)]
    else:  # cosine from lr to 0 over the epochs
        want = [0.05 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert lrs == pytest.approx(want, rel=1e-9)
