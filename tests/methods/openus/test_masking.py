"""OpenUS masking: adaptive mask, score, schedules, reconstruction-importance state and iBOT block masks.

References are the released code (XZheng0427/OpenUS at 6b9f6d2): utils.GlobalAttGuidedMask_2, the score and the
schedules of main_openus.train_one_epoch, and the block loop of dataset/datasets_us308k_flexible.py.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

import pytest
import torch

from visionkit.methods.openus import (
    ReconImportance,
    adaptive_mask,
    alpha_at,
    block_mask,
    block_masks,
    masking_score,
    top_fraction_at,
)

# ---------------------------------------------------------------------------------------------------- adaptive mask


@pytest.mark.parametrize("length", [1, 2, 5, 9, 10, 25, 49, 50, 100, 196])
def test_adaptive_mask_masks_exactly_ceil_ratio_tokens(length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    for ratio in (0.0, 0.1, 0.25, 0.28, 0.3, 0.5, 0.6, 0.7, 0.75, 1.0):
        expected = math.ceil(Fraction(str(ratio)) * length)  # exact decimal arithmetic
        for top_fraction in (0.0, 0.1, 0.29, 0.6, 0.9, 1.0):
            score = torch.rand(6, length, generator=generator)
            mask = adaptive_mask(score, ratio, top_fraction, generator=generator)
            assert mask.dtype == torch.bool and mask.shape == (6, length)
            assert mask.sum(dim=1).tolist() == [expected] * 6, (ratio, top_fraction)
            # The k = floor(L·m_t) best tokens are always masked (all of the top m once k >= m).
            top = min(math.floor(Fraction(str(top_fraction)) * length), expected)
            assert mask.gather(1, score.topk(top, dim=1).indices).all(), (ratio, top_fraction)


def test_mask_count_guards_float_products() -> None:
    assert math.ceil(0.6 * 49) == 30 and math.ceil(0.28 * 25) == 8  # 0.28·25 = 7.000000000000001
    assert adaptive_mask(torch.rand(3, 49), 0.6, 0.1).sum(1).tolist() == [30, 30, 30]
    assert adaptive_mask(torch.rand(3, 25), 0.28, 0.0).sum(1).tolist() == [7, 7, 7]
    # floor side: 0.29·100 = 28.999999999999996, the top fraction still takes 29 tokens (29 < m = 30)
    score = torch.arange(100.0).flip(0).unsqueeze(0)  # token i has rank i
    mask = adaptive_mask(score, 0.3, 0.29, generator=torch.Generator().manual_seed(0))
    assert mask[0, :29].all()


def test_adaptive_mask_hand_worked() -> None:
    score = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7], [0.0, 1.0, 0.2, 0.8, 0.4]])
    # m = ceil(0.6·5) = 3; k = int(5·0.6) = 3 >= m: the top 3, no randomness.
    mask = adaptive_mask(score, 0.6, 0.6)
    assert mask.tolist() == [[True, False, True, False, True], [False, True, False, True, True]]
    # k = int(5·0.2) = 1 < 3: the best token plus 2 of the other 4.
    for seed in range(20):
        mask = adaptive_mask(score, 0.6, 0.2, generator=torch.Generator().manual_seed(seed))
        assert mask[0, 0] and mask[1, 1] and mask.sum(1).tolist() == [3, 3]


def test_random_fill_is_uniform_over_the_other_tokens() -> None:
    rows = 4000
    score = torch.arange(10.0).flip(0).expand(rows, 10)  # token 0 best, token 1 second
    mask = adaptive_mask(score, 0.5, 0.2, generator=torch.Generator().manual_seed(1))  # m = 5, k = 2
    assert mask[:, :2].all()
    frequency = mask[:, 2:].float().mean(0)  # 3 of the 8 others: 0.375 each
    assert torch.allclose(frequency, torch.full((8,), 3 / 8), atol=0.03)


def test_adaptive_mask_is_reproducible_with_a_generator() -> None:
    score = torch.rand(8, 49)
    first = adaptive_mask(score, 0.6, 0.1, generator=torch.Generator().manual_seed(7))
    again = adaptive_mask(score, 0.6, 0.1, generator=torch.Generator().manual_seed(7))
    other = adaptive_mask(score, 0.6, 0.1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Saturated (k >= m): the top 30, whatever the generator.
    late = top_fraction_at(120, 151)
    a = adaptive_mask(score, 0.6, late, generator=torch.Generator().manual_seed(1))
    b = adaptive_mask(score, 0.6, late, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.gather(1, score.topk(30, dim=1).indices).all()


def test_adaptive_mask_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        adaptive_mask(torch.rand(49))
    with pytest.raises(ValueError, match="floating"):
        adaptive_mask(torch.ones(2, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_ratio"):
        adaptive_mask(torch.rand(2, 49), mask_ratio=1.5)
    with pytest.raises(ValueError, match="top_fraction"):
        adaptive_mask(torch.rand(2, 49), top_fraction=-0.1)


# ---------------------------------------------------------------------------------------------------- score


def released_score(attention: torch.Tensor, importance: torch.Tensor, alpha: float) -> torch.Tensor:
    """The lines of main_openus.train_one_epoch."""
    a_t = attention.mean(dim=1)
    l_s = importance.mean(dim=1)
    a_t = (a_t - a_t.min(dim=1, keepdim=True)[0]) / (
        a_t.max(dim=1, keepdim=True)[0] - a_t.min(dim=1, keepdim=True)[0] + 1e-8
    )
    l_s = (l_s - l_s.min(dim=1, keepdim=True)[0]) / (
        l_s.max(dim=1, keepdim=True)[0] - l_s.min(dim=1, keepdim=True)[0] + 1e-8
    )
    return alpha * a_t + (1 - alpha) * l_s


def test_masking_score_hand_worked() -> None:
    # Column means (how much each key token is attended): [1, 3, 2] -> min-max [0, 1, 0.5].
    attention = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 4.0, 1.0], [1.0, 3.0, 2.0]]])
    # Channel means: [4, 0, 2] -> [1, 0, 0.5].
    importance = torch.tensor([[[6.0, 0.0, 1.0], [2.0, 0.0, 3.0]]])
    eps = 1e-8
    attended = torch.tensor([[0.0, 2 / (2 + eps), 1 / (2 + eps)]])
    student = torch.tensor([[4 / (4 + eps), 0.0, 2 / (4 + eps)]])
    assert torch.allclose(masking_score(attention, None, 0.3), attended)
    code = masking_score(attention, importance, 0.3)
    paper = masking_score(attention, importance, 0.3, convention="paper")
    assert torch.allclose(code, 0.3 * attended + 0.7 * student)
    assert torch.allclose(paper, 0.7 * attended + 0.3 * student)


def test_masking_score_matches_the_release_and_ranks_like_raw_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(4, 49, 49, generator=generator)
    importance = torch.rand(4, 3, 49, generator=generator)
    for alpha in (0.0, 0.1, 0.55, 1.0):
        assert torch.allclose(masking_score(attention, importance, alpha), released_score(attention, importance, alpha))
    # First iteration: the release ranks the raw attention.mean(1); the normalised score has the same order.
    assert torch.equal(masking_score(attention, None, 0.5).argsort(1), attention.mean(1).argsort(1))


def test_masking_score_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, L, L\)"):
        masking_score(torch.rand(2, 49, 48), None, 0.5)
    with pytest.raises(ValueError, match="recon_importance"):
        masking_score(torch.rand(2, 49, 49), torch.rand(3, 3, 49), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        masking_score(torch.rand(2, 49, 49), None, 1.2)
    with pytest.raises(ValueError, match="convention"):
        masking_score(torch.rand(2, 49, 49), None, 0.5, convention="other")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- schedules


def test_top_fraction_schedule_at_epochs_0_97_150_of_151() -> None:
    assert top_fraction_at(0, 151) == 0.1
    assert int(49 * top_fraction_at(0, 151)) == 4
    assert top_fraction_at(97, 151) == 0.1 + (97 / 151) * 0.8
    assert int(49 * top_fraction_at(96, 151)) == 29 and int(49 * top_fraction_at(97, 151)) == 30
    first_saturated = next(e for e in range(151) if int(49 * top_fraction_at(e, 151)) >= 30)
    assert first_saturated == 97
    assert top_fraction_at(150, 151) == pytest.approx(0.1 + 0.8 * 150 / 151)
    assert int(49 * top_fraction_at(150, 151)) == 43
    assert top_fraction_at(151, 151) == pytest.approx(0.9)


def test_alpha_schedules() -> None:
    def cosine(e: int) -> float:
        return 0.1 + 0.8 * (1 - math.cos(math.pi * e / 151)) / 2

    for epoch in (0, 97, 150):
        assert alpha_at(epoch, 151) == pytest.approx(cosine(epoch), abs=1e-15)
        assert alpha_at(epoch, 151, schedule="linear") == pytest.approx(0.1 + 0.8 * epoch / 151, abs=1e-15)
        assert alpha_at(epoch, 151, schedule="constant") == 0.1
    assert alpha_at(0, 151) == 0.1 and alpha_at(151, 151) == pytest.approx(0.9)
    assert alpha_at(97, 151) == pytest.approx(0.6730177361450004)
    assert alpha_at(75, 150, 0.2, 0.5) == pytest.approx(0.35)  # argparse defaults, mid-way


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="epoch"):
        alpha_at(-1, 151)
    with pytest.raises(ValueError, match="epoch"):
        top_fraction_at(152, 151)
    with pytest.raises(ValueError, match="epochs"):
        top_fraction_at(0, 0)
    with pytest.raises(ValueError, match="schedule"):
        alpha_at(3, 151, schedule="step")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- importance


def test_recon_importance_hand_worked() -> None:
    state = ReconImportance()
    assert state.importance(2) is None and not state.has_importance
    first = torch.tensor([[[[1.0, 0.0]]], [[[3.0, 2.0]]]])  # (B=2, C=1, h=1, w=2)
    out = state.update(first)
    mean1 = torch.tensor([[[[2.0, 1.0]]]])
    assert torch.equal(state.ema_loss_map, mean1) and bool(state.ema_initialized)
    assert torch.allclose(out, (0.7 * first + 0.3 * mean1).flatten(2))
    second = torch.tensor([[[[0.0, 4.0]]], [[[2.0, 0.0]]]])
    out = state.update(second)
    ema = 0.7 * mean1 + 0.3 * torch.tensor([[[[1.0, 2.0]]]])
    assert torch.allclose(state.ema_loss_map, ema)
    assert torch.allclose(out, (0.7 * second + 0.3 * ema).flatten(2))
    assert torch.equal(state.importance(2), out)
    assert out.shape == (2, 1, 2)


def test_recon_importance_batch_size_rule() -> None:
    state = ReconImportance()
    state.update(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 7, 7))
    stored = state.importance(4)
    assert torch.equal(state.importance(3), stored[:3])
    assert torch.equal(state.importance(6), stored[[0, 1, 2, 3, 0, 1]])
    with pytest.raises(ValueError, match="batch"):
        state.importance(0)


def test_recon_importance_state_dict_round_trip() -> None:
    generator = torch.Generator().manual_seed(3)
    trained = ReconImportance()
    for _ in range(3):
        trained.update(torch.rand(4, 3, 7, 7, generator=generator))
    saved = trained.state_dict()
    assert set(saved) == {"ema_loss_map", "ema_initialized", "previous_importance"}

    fresh = ReconImportance()
    fresh.load_state_dict(saved)  # before any update: the buffers take the stored shapes
    assert torch.equal(fresh.importance(4), trained.importance(4)) and bool(fresh.ema_initialized)
    batch = torch.rand(4, 3, 7, 7, generator=generator)
    assert torch.equal(fresh.update(batch), trained.update(batch))  # resume is exact

    trained.load_state_dict(ReconImportance().state_dict())  # a fresh state loads into a trained module
    assert trained.importance(4) is None and not bool(trained.ema_initialized)
    trained.update(batch)
    assert torch.equal(trained.ema_loss_map, batch.mean(0, keepdim=True))


def test_recon_importance_accepts_a_released_flag_and_checks_its_grid() -> None:
    state = ReconImportance()
    state.load_state_dict(
        {
            "ema_loss_map": torch.ones(1, 3, 7, 7),
            "ema_initialized": torch.tensor([1.0]),  # another dtype and shape than ours
            "previous_importance": torch.zeros(0),
        }
    )
    assert bool(state.ema_initialized) and state.ema_initialized.shape == () and state.importance(2) is None
    state.update(torch.zeros(2, 3, 7, 7))
    assert torch.allclose(state.ema_loss_map, torch.full((1, 3, 7, 7), 0.7))
    with pytest.raises(ValueError, match="running map"):
        state.update(torch.zeros(2, 3, 3, 3))
    state.reset()
    assert state.importance(2) is None and state.update(torch.zeros(2, 3, 3, 3)).shape == (2, 3, 9)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        state.update(torch.zeros(3, 7, 7))
    with pytest.raises(ValueError, match="momentum"):
        ReconImportance(momentum=1.5)


# ---------------------------------------------------------------------------------------------------- block masks


def released_block_mask(height: int, width: int, ratio: float, rng: random.Random) -> int:
    """The released dataset loop (pred_shape 'block', pred_aspect_ratio (0.3, 1/0.3)); returns the masked count."""
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    mask = [[False] * width for _ in range(height)]
    high = ratio * height * width
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _ in range(10):
            low = (min(height, width) // 3) ** 2
            target_area = rng.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return mask_count


@pytest.mark.parametrize(("height", "width", "ratio"), [(7, 7, 0.3), (3, 3, 0.3), (6, 9, 0.5), (14, 14, 0.4)])
def test_block_mask_counts_follow_the_released_loop(height: int, width: int, ratio: float) -> None:
    draws = 600
    generator = torch.Generator().manual_seed(0)
    ours = Counter(int(block_mask(height, width, ratio, generator=generator).sum()) for _ in range(draws))
    rng = random.Random(0)
    released = Counter(released_block_mask(height, width, ratio, rng) for _ in range(draws))
    assert max(ours) <= math.floor(ratio * height * width) and max(released) <= math.floor(ratio * height * width)
    distance = sum(abs(ours[k] - released[k]) for k in set(ours) | set(released)) / (2 * draws)
    assert distance < 0.08, (sorted(ours.items()), sorted(released.items()))


def test_block_mask_is_a_union_of_blocks_and_reproducible() -> None:
    generator = torch.Generator().manual_seed(5)
    mask = block_mask(7, 7, 0.3, generator=generator)
    assert mask.dtype == torch.bool and mask.shape == (7, 7) and mask.device.type == "cpu"
    assert 0 < int(mask.sum()) <= 14
    again = block_mask(7, 7, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask, again)
    masks = block_masks(16, 7, 7, 0.3, generator=torch.Generator().manual_seed(5))
    assert masks.shape == (16, 7, 7) and torch.equal(masks[0], mask)
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1


def test_block_mask_edge_cases_and_errors() -> None:
    generator = torch.Generator().manual_seed(0)
    assert not block_mask(7, 7, 0.0, generator=generator).any()
    assert not block_mask(1, 9, 0.5, generator=generator).any()  # sides must be strictly smaller than the grid
    assert block_masks(0, 7, 7, 0.3).shape == (0, 7, 7)
    # On a 2×2 grid blocks must be 1×1 (sides strictly smaller than the grid); min area (2//3)² = 0.
    assert 0 < int(block_mask(2, 2, 1.0, generator=generator).sum()) <= 4
    # A minimum block area above the budget still gives blocks no larger than the remaining budget.
    assert int(block_mask(7, 7, 0.1, generator=generator, min_block_area=9).sum()) <= 4
    with pytest.raises(ValueError, match="grid"):
        block_mask(0, 7, 0.3)
    with pytest.raises(ValueError, match="ratio"):
        block_mask(7, 7, 1.3)
    with pytest.raises(ValueError, match="aspect"):
        block_mask(7, 7, 0.3, aspect=(0.0, 2.0))
    with pytest.raises(ValueError, match="max_tries"):
        block_mask(7, 7, 0.3, max_tries=0)
    with pytest.raises(ValueError, match="batch"):
        block_masks(-1, 7, 7, 0.3)
