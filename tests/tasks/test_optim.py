import math

import pytest
import torch
from torch import nn

from visionkit.tasks.optim import build_adamw, param_groups_weight_decay, warmup_cosine_factor


def test_warmup_is_linear_from_start_ratio_to_one():
    # 4 warm-up steps from 0.001: 0.001, 0.25075, 0.5005, 0.75025, then 1.0 at the first decay step.
    values = [warmup_cosine_factor(s, total_steps=104, warmup_steps=4) for s in range(5)]
    assert values[:4] == pytest.approx([0.001 + 0.999 * s / 4 for s in range(4)])
    assert values[4] == pytest.approx(1.0)


def test_cosine_reaches_min_ratio_at_last_step_and_half_way_is_midpoint():
    total, warmup, floor = 110, 10, 0.1
    assert warmup_cosine_factor(total, total, warmup, floor) == pytest.approx(floor)
    mid = warmup + (total - warmup) // 2
    assert warmup_cosine_factor(mid, total, warmup, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    # hand-worked: a quarter of the way, 0.5 * (1 + cos(pi / 4)) of the range above the floor
    quarter = warmup + (total - warmup) // 4
    expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert warmup_cosine_factor(quarter, total, warmup, floor) == pytest.approx(expected)


def test_no_warmup_starts_at_one():
    assert warmup_cosine_factor(0, total_steps=10, warmup_steps=0) == pytest.approx(1.0)


def test_param_groups_exclude_biases_norms_and_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups_weight_decay(model.named_parameters(), weight_decay=0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    not_decayed = {id(p) for p in groups[1]["params"]}
    assert decayed == {id(model[0].weight)}
    assert not_decayed == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].bias)}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


def test_build_adamw_scales_lr_and_rejects_empty():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = build_adamw([{"params": [p], "weight_decay": 0.0, "lr_scale": 0.5}], lr=0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="No trainable parameters"):
        build_adamw([], lr=0.1)
