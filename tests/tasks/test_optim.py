import copy
import math

import pytest
import torch
from torch import nn

from visionkit.tasks.optim import build_adamw, no_weight_decay_ids, param_groups_weight_decay, warmup_cosine_factor


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


class _Declaring(nn.Module):
    """A block that declares its exempt parameters in the three ways models do."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(3, 4))  # by name
        self.rel_bias_a = nn.Parameter(torch.zeros(2, 2))  # by pattern
        self.rel_bias_b = nn.Parameter(torch.zeros(2, 2))
        self.inner = nn.Linear(4, 4)
        self.inner.register_parameter("relative_position_bias_table", nn.Parameter(torch.zeros(5, 2)))  # keyword
        self.a_log = nn.Parameter(torch.zeros(4, 2))
        self.a_log._no_weight_decay = True  # on the parameter itself
        self.proj = nn.Linear(4, 4)  # a 2-d weight that must stay decayed

    def no_weight_decay(self) -> set[str]:
        return {"table", "rel_bias_?", "not_a_parameter"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}


def test_no_weight_decay_ids_reads_every_declaration_relative_to_the_declaring_module():
    block = _Declaring()
    outer = nn.Sequential(nn.Linear(4, 4), nn.Sequential(block))  # the declarer sits at "1.0.", its names do not
    exempt = no_weight_decay_ids(outer)
    expected = {block.table, block.rel_bias_a, block.rel_bias_b, block.inner.relative_position_bias_table, block.a_log}
    assert exempt == {id(p) for p in expected}
    groups = param_groups_weight_decay(outer.named_parameters(), weight_decay=0.1, no_decay_ids=exempt)
    decayed, not_decayed = ({id(p) for p in g["params"]} for g in groups)
    assert decayed == {id(outer[0].weight), id(block.inner.weight), id(block.proj.weight)}
    assert {id(p) for p in expected} <= not_decayed
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


@pytest.mark.gpu
def test_adamw_over_the_groups_steps_the_same_on_cuda_as_on_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    gpu = copy.deepcopy(cpu).cuda()
    for model in (cpu, gpu):
        optimizer = build_adamw(param_groups_weight_decay(model.named_parameters(), weight_decay=0.1), lr=0.1)
        inputs = torch.linspace(-1, 1, 8, device=next(model.parameters()).device).reshape(2, 4)
        model(inputs).square().sum().backward()
        optimizer.step()
    for (name, expected), actual in zip(cpu.state_dict().items(), gpu.state_dict().values(), strict=True):
        assert actual.is_cuda
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-5, atol=1e-6, msg=name)
