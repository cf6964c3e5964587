"""Loss values as PyTorch's ``backward`` takes them: 0-dim or one-element tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_changed, assert_same_weights, mlp, regression_loader

from trainflow import Step, Trainer, add_loss
from trainflow.losses import parse_loss


def seed_001_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Seed 001's loss, verbatim: shape (1,) for one output column."""
    return torch.mean((label - output)**2, dim=0)


def test_seed_001_one_element_loss_trains_like_the_hand_loop():
    loader = regression_loader()
    torch.manual_seed(0)
    hand = mlp()
    model, start = copy.deepcopy(hand), copy.deepcopy(hand.state_dict())
    opt = torch.optim.SGD(hand.parameters(), lr=0.05)
    torch.manual_seed(1)  # the loader's shuffling
    for _ in range(2):
        last_epoch = []
        for x, y in loader:
            opt.zero_grad()
            loss = seed_001_loss(hand(x), y)
            assert loss.shape == (1,)
            loss.backward()  # PyTorch accepts a one-element tensor
            opt.step()
            last_epoch.append(loss.item())

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    trainer = Trainer(model, Step(lambda b: seed_001_loss(model(b[0]), b[1]), opt, name="mse"), device="cpu")
    trainer.fit(loader, epochs=2)
    assert_changed(start, model)
    assert_same_weights(hand, model)
    assert trainer.logs["mse/loss"] == pytest.approx(sum(last_epoch) / len(last_epoch), rel=1e-6)


def test_one_element_losses_are_read_as_scalars_in_dicts_and_add_loss():
    terms = parse_loss({"a": torch.ones(1), "b": torch.full((1, 1), 2.0)}, "s")
    assert [(t.name, t.value.shape, t.value.item()) for t in terms] == [("a", (), 1.0), ("b", (), 2.0)]
    added: list[torch.Tensor] = []
    from trainflow.losses import collect_added

    collect_added(add_loss, torch.full((1,), 3.0), into=added)
    assert [(v.shape, v.item()) for v in added] == [((), 3.0)]


def test_several_elements_are_still_an_error_that_says_how_to_reduce():
    with pytest.raises(ValueError, match=r"Step 's': loss 'loss' must be a scalar \(0-dim or one-element\) tensor.*"
                                         r"Received: a tensor of shape \(2,\).*loss.mean\(\)"):
        parse_loss(torch.ones(2), "s")
