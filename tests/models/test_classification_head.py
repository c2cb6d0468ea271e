"""ClassificationHead: linear and MLP heads on pooled features, hand-worked logits, input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionkit.models.heads.classification import ClassificationHead


def test_linear_head_computes_w_x_plus_b():
    head = ClassificationHead(2, 3)
    assert isinstance(head.hidden, nn.Identity)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
        head.fc.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    logits = head(torch.tensor([[3.0, 4.0]]))
    # [3 + 0.5, 8 + 0, 3 - 4 - 1]
    torch.testing.assert_close(logits, torch.tensor([[3.5, 8.0, -2.0]]))


def test_feature_maps_are_average_pooled():
    head = ClassificationHead(2, 1)
    with torch.no_grad():
        head.fc.weight.fill_(1.0)
        head.fc.bias.zero_()
    maps = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]]]])  # (1, 2, 1, 2): channel means 2 and 4
    torch.testing.assert_close(head(maps), torch.tensor([[6.0]]))


def test_mlp_head_has_a_gelu_hidden_layer():
    head = ClassificationHead(4, 3, hidden_dim=8, dropout=0.5).eval()
    assert [type(m) for m in head.hidden] == [nn.Linear, nn.GELU]
    assert head.hidden[0].weight.shape == (8, 4) and head.fc.weight.shape == (3, 8)
    x = torch.randn(5, 4)
    expected = head.fc(nn.functional.gelu(head.hidden[0](x)))  # dropout is off in eval mode
    torch.testing.assert_close(head(x), expected)
    assert head.train()(x).shape == (5, 3)


def test_init_follows_timm_classifiers():
    torch.manual_seed(0)
    head = ClassificationHead(256, 100, hidden_dim=64)
    for linear in (head.hidden[0], head.fc):
        assert torch.count_nonzero(linear.bias) == 0
        assert abs(linear.weight.mean().item()) < 0.005
        assert 0.018 < linear.weight.std().item() < 0.022  # N(0, 0.02): 6400+ samples give the std within 10 %


def test_bad_arguments_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="in_features and num_classes must be >= 1"):
        ClassificationHead(0, 3)
    with pytest.raises(ValueError, match="hidden_dim must be >= 1"):
        ClassificationHead(4, 3, hidden_dim=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ClassificationHead(4, 3, dropout=1.0)
    with pytest.raises(ValueError, match=r"expects features \(B, 4\) or \(B, 4, H, W\), got \(2, 5\)"):
        ClassificationHead(4, 3)(torch.zeros(2, 5))
