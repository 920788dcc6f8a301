"""`--authors_code`: each of the authors' behaviours we deliberately differ from is reproduced and observable —
α's gradient clipped instead of the weights', a fresh validation iterator per step, λ_valid ignored, the
genotype logged before the epoch's training — and a tiny run writes a complete run folder."""
import copy
import json

import torch

from milenas_fast.cli import main
from milenas_fast.data import load_dataset, make_loader, split_train_val
from milenas_fast.data.loaders import BatchStream, Plan
from milenas_fast.precision import Precision
from milenas_fast.search.authors_code import FreshIteratorStream
from milenas_fast.search.step import StepRule, alpha_gradient, search_step
from tiny_supernet import Tiny

CPU = Precision(torch.device("cpu"), amp=False)


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


def optimisers(model):
    return (torch.optim.SGD(model.parameters(), 0.5, momentum=0.9, weight_decay=3e-4),
            torch.optim.Adam(model.arch_parameters(), lr=0.05, betas=(0.5, 0.999), weight_decay=1e-3))


def test_alpha_is_clipped_and_the_weights_are_not():
    torch.manual_seed(0)
    model = Tiny()
    ours = copy.deepcopy(model)
    tr, va = batches()
    search_step(model, tr, va, *optimisers(model), StepRule("milenas", grad_clip=1e-3, authors_code=True), CPU)
    alpha_norm = torch.linalg.vector_norm(torch.stack([a.grad.norm() for a in model.arch_parameters()]))
    w_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert abs(float(alpha_norm) - 1e-3) < 1e-7  # the weight pass's ∇α, clipped at --grad_clip (clip adds 1e-6)
    assert float(w_norm) > 1e-1  # the weights' gradient, unclipped
    # which is the whole effect: our step without clipping gives the same weights and α
    search_step(ours, tr, va, *optimisers(ours), StepRule("milenas", grad_clip=0.0), CPU)
    for x, y in zip([*model.parameters(), *model.arch_parameters()], [*ours.parameters(), *ours.arch_parameters()]):
        assert torch.equal(x, y)
    # ... and not ours with clipping (so the comparison above can tell them apart)
    torch.manual_seed(0)
    clipped = Tiny()
    search_step(clipped, tr, va, *optimisers(clipped), StepRule("milenas", grad_clip=1e-3), CPU)
    assert any(not torch.equal(x, y) for x, y in zip(clipped.parameters(), model.parameters()))


def test_lambda_valid_is_ignored_as_in_the_authors_code():
    torch.manual_seed(0)
    model = Tiny()
    tr, va = batches()
    b = {"train": tr, "valid": va}
    theirs, _ = alpha_gradient(model, b, StepRule("milenas", lambda_valid=3.0, authors_code=True), CPU)
    at_one, _ = alpha_gradient(model, b, StepRule("milenas", lambda_valid=1.0), CPU)
    ours, _ = alpha_gradient(model, b, StepRule("milenas", lambda_valid=3.0), CPU)
    assert all(torch.equal(x, y) for x, y in zip(theirs, at_one))
    assert any((x - y).abs().max() > 1e-4 for x, y in zip(theirs, ours))


def test_each_step_draws_the_first_batch_of_a_fresh_pass():
    data = load_dataset("synthetic", "", 40)
    _, valid = split_train_val(data, 0.5)  # 20 validation images, batches of 4
    loader = make_loader("gpu", valid, 4, torch.device("cpu"))
    fresh = FreshIteratorStream(loader, 7, "valid")
    got = [next(fresh) for _ in range(4)]
    for k, (x, y) in enumerate(got):  # next(iter(valid_queue)): the first batch of pass k's shuffle
        ex, ey = next(iter(loader.batches(Plan.draw(len(valid), 7, "valid", k))))
        assert torch.equal(x, ex) and torch.equal(y, ey)
    persistent = BatchStream(loader, 7, "valid")
    ours = [next(persistent) for _ in range(4)]
    assert torch.equal(ours[0][0], got[0][0]) and not torch.equal(ours[1][0], got[1][0])
    # resumable: the state after two draws continues the same sequence
    first = FreshIteratorStream(loader, 7, "valid")
    next(first), next(first)
    resumed = FreshIteratorStream(loader, 7, "valid")
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(next(resumed)[0], got[2][0])


TINY = ["search", "--dataset", "synthetic", "--synthetic_images", "32", "--layers", "3", "--init_channels", "2",
        "--batch_size", "16", "--device", "cpu", "--deterministic", "--quiet", "--report_freq", "1",
        "--epochs", "1", "--authors_code"]


def test_authors_code_run_logs_the_genotype_before_training_and_is_checked_on_resume(tmp_path, monkeypatch, capsys):
    from milenas_fast.search import loop

    monkeypatch.setattr(loop, "_plot", lambda run_dir: None)  # plots are tested elsewhere
    run = tmp_path / "run"
    assert main(TINY + ["--save_dir", str(run), "--lambda_valid_regularizer", "2"]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"log.txt", "args.json", "genotypes.jsonl", "model_sizes.json", "genotype.json", "genotype.txt",
            "checkpoint.pt"} <= names
    assert json.loads((run / "args.json").read_text())["authors_code"] is True
    lines = (run / "log.txt").read_text().splitlines()
    at = {key: [i for i, line in enumerate(lines) if key in line and "final genotype" not in line] for key in
          ("epoch 0 lr", "genotype = ", "train 000", "valid_acc", "ignores --lambda_valid_regularizer 2.0")}
    assert len(at["genotype = "]) == 1 and at["ignores --lambda_valid_regularizer 2.0"]
    assert at["epoch 0 lr"][0] < at["genotype = "][0] < at["train 000"][0] < at["valid_acc"][0]
    capsys.readouterr()
    assert main(["search", "--resume", str(run), "--no-authors_code"]) == 2
    assert "--authors_code False does not match the checkpoint's True" in capsys.readouterr().err


def test_authors_code_refuses_the_shared_train_pass(capsys):
    assert main(TINY + ["--shared_train_pass"]) == 2
    err = capsys.readouterr().err
    assert "--authors_code reproduces the authors' three-pass iteration" in err and "Traceback" not in err
