"""OpenUS schedules and gradient rules against plain transcriptions of the DINO / iBOT utilities they follow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from visionkit.methods.openus.schedules import clip_gradients_per_parameter, cosine_schedule_at, update_teacher


def _released_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """iBOT's ``utils.cosine_scheduler``, as an array over every step of the run."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


@pytest.mark.parametrize(
    ("base", "final", "epochs", "per_epoch", "warmup"),
    [(5e-4, 1e-6, 151, 7, 10), (0.04, 0.4, 12, 5, 0), (0.996, 1.0, 3, 11, 0), (1.0, 0.0, 4, 3, 1)],
)
def test_cosine_schedule_equals_the_released_array_at_every_step(base, final, epochs, per_epoch, warmup):
    expected = _released_cosine_scheduler(base, final, epochs, per_epoch, warmup)
    total = epochs * per_epoch
    ours = [cosine_schedule_at(step, total, base, final, warmup * per_epoch) for step in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-15)
    # past the end the last value stays
    assert cosine_schedule_at(total + 5, total, base, final, warmup * per_epoch) == pytest.approx(expected[-1])


def test_cosine_schedule_hand_worked_values():
    # 4 steps, no warm-up: final + (base - final)(1 + cos(pi i / 4)) / 2 at i = 0, 2
    assert cosine_schedule_at(0, 4, 1.0, 0.0) == 1.0
    assert cosine_schedule_at(2, 4, 1.0, 0.0) == pytest.approx(0.5)
    # 3 warm-up steps from 0: 0, 0.5, 1 (linspace includes both ends), then the cosine starts at the peak
    assert [cosine_schedule_at(i, 6, 1.0, 0.0, 3) for i in range(4)] == [0.0, 0.5, 1.0, 1.0]


def test_per_parameter_clipping_bounds_each_gradient_on_its_own():
    big, small = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    big.grad = torch.tensor([30.0, 40.0])  # norm 50
    small.grad = torch.tensor([1.0, 2.0, 2.0])  # norm 3: untouched with max_norm 3
    norms = clip_gradients_per_parameter([big, small], 3.0)
    torch.testing.assert_close(norms, torch.tensor([50.0, 3.0]))
    torch.testing.assert_close(big.grad, torch.tensor([30.0, 40.0]) * (3.0 / (50.0 + 1e-6)))
    torch.testing.assert_close(small.grad, torch.tensor([1.0, 2.0, 2.0]))
    # a global-norm clip would also have scaled the small gradient: this rule does not couple parameters
    assert math.isclose(float(big.grad.norm()), 3.0, rel_tol=1e-6)
    assert clip_gradients_per_parameter([nn.Parameter(torch.zeros(1))], 3.0) is None


def test_teacher_update_is_the_ema_over_shared_names():
    torch.manual_seed(0)
    student = nn.ModuleDict({"a": nn.Linear(3, 2), "decoder": nn.Linear(2, 2)})
    teacher = nn.ModuleDict({"a": nn.Linear(3, 2)})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(teacher, student, 0.9)
    for name, value in teacher.state_dict().items():
        expected = 0.9 * before[name] + 0.1 * student.state_dict()[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="share no parameter names"):
        update_teacher(nn.Linear(2, 2), nn.ModuleDict({"x": nn.Linear(2, 2)}), 0.9)
