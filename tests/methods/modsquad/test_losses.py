"""Mod-Squad losses: MI loss on hand-worked tables (plain Python floats), switch / z losses, uncertainty weighting."""

from __future__ import annotations

import math

import pytest
import torch

from visionkit.methods.modsquad import UncertaintyWeighting, mutual_information_loss, switch_loss, z_loss

EPS = 1e-4


def released_mi_by_hand(table: list[list[float]], num_tokens: float) -> float:
    """The release's formula written out over Python floats (eps in all four places)."""
    joint = [[s / (num_tokens + EPS) for s in row] for row in table]
    p_task = [sum(row) + EPS for row in joint]
    p_expert = [sum(row[e] for row in joint) + EPS for e in range(len(joint[0]))]
    return -sum(
        joint[t][e] * math.log(joint[t][e] / p_task[t] / p_expert[e] + EPS)
        for t in range(len(joint))
        for e in range(len(joint[0]))
    )


def test_mi_loss_two_by_two_hand_worked() -> None:
    # 8 tokens, 4 per task; task 0 prefers expert 0, task 1 expert 1.
    # P = [[3, 1], [1, 3]] / 8.0001; P(t) = 0.49999... + 1e-4; P(e) likewise.
    n = 8.0 + EPS
    p_hi, p_lo = 3 / n, 1 / n
    marginal = p_hi + p_lo + EPS
    expected = -2 * (
        p_hi * math.log(p_hi / marginal / marginal + EPS) + p_lo * math.log(p_lo / marginal / marginal + EPS)
    )
    loss = mutual_information_loss(torch.tensor([[3.0, 1.0], [1.0, 3.0]], dtype=torch.float64), 8.0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # ≈ −MI = −(log 2 − H(3/4, 1/4)) = −0.1308 nats, shifted slightly by the epsilons
    assert loss.item() == pytest.approx(-(math.log(2) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=2e-3)


def test_mi_loss_two_by_three_hand_worked() -> None:
    table = [[2.5, 1.0, 0.5], [0.2, 0.3, 1.5]]  # task 0: 4 tokens, task 1: 2 tokens
    loss = mutual_information_loss(torch.tensor(table, dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(released_mi_by_hand(table, 6.0), rel=1e-12)
    assert loss.item() < 0


def test_one_task_table_gives_about_zero() -> None:
    loss = mutual_information_loss(torch.tensor([[5.0, 2.0, 1.0]]), 8.0)
    assert abs(loss.item()) < 1e-3
    # several tasks but only one present in the window (the released one-task-per-rank case): no signal either
    loss = mutual_information_loss(torch.tensor([[5.0, 2.0, 1.0], [0.0, 0.0, 0.0]]), 8.0)
    assert abs(loss.item()) < 1e-3


def test_concentrated_routing_has_lower_loss_and_gradient_descent_concentrates() -> None:
    uniform = mutual_information_loss(torch.tensor([[2.0, 2.0], [2.0, 2.0]]), 8.0)
    split = mutual_information_loss(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), 8.0)
    assert split.item() < uniform.item() - 0.6  # −log 2 vs 0
    logits = torch.tensor([[0.3, 0.0, -0.2], [0.1, 0.2, 0.0]], requires_grad=True)
    probs = torch.softmax(logits, dim=1) + EPS  # 1 token per task: S = probs
    loss = mutual_information_loss(probs, 2.0)
    loss.backward()
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
        after = mutual_information_loss(torch.softmax(stepped, dim=1) + EPS, 2.0)
    assert after.item() < loss.item()
    # each task moves towards the expert it already prefers most relative to the other task
    assert logits.grad[0, 0] < 0 and logits.grad[1, 1] < 0


def test_mi_loss_rejects_non_tables() -> None:
    with pytest.raises(ValueError, match=r"\(T, E\)"):
        mutual_information_loss(torch.ones(4), 4.0)


def test_switch_loss_hand_worked() -> None:
    # normalised probs (1/4, 3/4) · normalised counts (1/2, 1/2) = 1/2, times E = 2
    assert switch_loss(torch.tensor([1.0, 3.0]), torch.tensor([2, 2])).item() == pytest.approx(1.0)
    assert switch_loss(torch.tensor([1.0, 3.0]), torch.tensor([3, 1])).item() == pytest.approx(0.75)
    assert switch_loss(torch.zeros(3), torch.zeros(3)).item() == 0.0


def test_z_loss_hand_worked_and_stable() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2 + EPS) ** 2 + math.log(4 + EPS) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    assert z_loss(logits, reduction="sum").item() == pytest.approx(2 * expected, rel=1e-6)
    assert z_loss(logits, reduction="none").shape == (2,)
    assert z_loss(torch.tensor([[1000.0, 0.0]])).item() == pytest.approx(1000.0**2)
    with pytest.raises(ValueError, match="reduction"):
        z_loss(logits, reduction="max")


def test_uncertainty_weighting_matches_the_release() -> None:
    weighting = UncertaintyWeighting(2)
    losses = [torch.tensor(2.0), torch.tensor(0.5)]
    # s = 1: Σ 0.5·L + log 2
    assert weighting(losses).item() == pytest.approx(0.5 * 2.5 + 2 * math.log(2.0))
    weighting(torch.stack(losses)).backward()
    # d/ds (0.5 L / s² + log(1 + s²)) at s = 1 is −L + 1
    assert weighting.params.grad.tolist() == pytest.approx([-1.0, 0.5])
    with pytest.raises(ValueError, match="expected 2"):
        weighting([torch.tensor(1.0)])
