"""OpenUS losses: iBOTLoss against a loop-by-loop transcription of the released one, and the pixel losses by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionkit.methods.openus import IBOTLoss, masked_patch_error, masked_pixel_mse

REPO = Path(__file__).resolve().parents[3]


def released_ibot_loss(
    student_cls, student_patch, teacher_cls, teacher_patch, masks, epoch, center, center2, ngcrops, ncrops, temps
):
    """main_openus.iBOTLoss.forward with explicit loops over the (q, v) pairs; temps = (schedule, patch schedule)."""
    student_cls = (student_cls / 0.1).chunk(ncrops)
    student_patch = (student_patch / 0.1).chunk(ngcrops)
    temp, temp2 = temps[0][epoch], temps[1][epoch]
    teacher_cls_c = F.softmax((teacher_cls - center) / temp, dim=-1).detach().chunk(ngcrops)
    teacher_patch_c = F.softmax((teacher_patch - center2) / temp2, dim=-1).detach().chunk(ngcrops)
    total1, n1, total2, n2 = 0.0, 0, 0.0, 0
    for q in range(len(teacher_cls_c)):
        for v in range(len(student_cls)):
            if v == q:
                loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch[v], dim=-1), dim=-1)
                mask = masks[v].flatten(-2, -1)
                loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                total2 += loss2.mean()
                n2 += 1
            else:
                loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls[v], dim=-1), dim=-1)
                total1 += loss1.mean()
                n1 += 1
    return total1 / n1, total2 / n2


def released_schedules(warm, final, warm2, final2, warmup_epochs, epochs):
    return (
        np.concatenate((np.linspace(warm, final, warmup_epochs), np.ones(epochs - warmup_epochs) * final)),
        np.concatenate((np.linspace(warm2, final2, warmup_epochs), np.ones(epochs - warmup_epochs) * final2)),
    )


def random_inputs(num_global: int, num_local: int, batch: int, grid: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    tokens = grid * grid
    student_cls = torch.randn((num_global + num_local) * batch, dim, generator=generator) * 3
    student_patch = torch.randn(num_global * batch, tokens, dim, generator=generator) * 3
    teacher_cls = torch.randn(num_global * batch, dim, generator=generator)
    teacher_patch = torch.randn(num_global * batch, tokens, dim, generator=generator)
    masks = torch.rand(num_global * batch, grid, grid, generator=generator) < 0.4
    masks[0] = False  # an image without masked tokens: divided by max(0, 1)
    return student_cls, student_patch, teacher_cls, teacher_patch, masks


@pytest.mark.parametrize(("num_global", "num_local", "epoch"), [(2, 8, 0), (2, 3, 12), (2, 0, 40), (1, 3, 29)])
def test_ibot_loss_matches_the_released_loops(num_global: int, num_local: int, epoch: int) -> None:
    batch, dim, epochs = 3, 16, 50
    inputs = random_inputs(num_global, num_local, batch, 3, dim, seed=epoch)
    loss = IBOTLoss(dim, dim, num_global, num_local, 0.04, 0.05, 0.04, 0.07, 30, epochs)
    center = torch.randn(1, dim) * 0.1
    center2 = torch.randn(1, 1, dim) * 0.1
    loss.center.copy_(center)
    loss.center2.copy_(center2)
    schedules = released_schedules(0.04, 0.05, 0.04, 0.07, 30, epochs)
    out = loss(*inputs, epoch)
    masks_per_view = inputs[4].chunk(num_global)
    ref_cls, ref_patch = released_ibot_loss(
        *inputs[:4], masks_per_view, epoch, center, center2, num_global, num_global + num_local, schedules
    )
    assert set(out) == {"cls", "patch", "loss"}
    assert torch.allclose(out["cls"], ref_cls, rtol=1e-5) and torch.allclose(out["patch"], ref_patch, rtol=1e-5)
    assert torch.allclose(out["loss"], ref_cls + ref_patch, rtol=1e-5)


def test_number_of_student_views_is_read_from_the_input() -> None:
    inputs = random_inputs(2, 3, 4, 2, 8, seed=7)  # 2 global + 3 local views
    configured_for_8 = IBOTLoss(8, 8, 2, 8, epochs=10)(*inputs, 2)
    configured_for_3 = IBOTLoss(8, 8, 2, 3, epochs=10)(*inputs, 2)
    globals_only = IBOTLoss(8, 8, 2, 8, epochs=10)(inputs[0][:8], *inputs[1:], 2)  # 2 pairs: (0, 1) and (1, 0)
    for key in ("cls", "patch", "loss"):
        assert torch.equal(configured_for_8[key], configured_for_3[key])
    assert torch.equal(globals_only["patch"], configured_for_8["patch"])
    assert not torch.allclose(globals_only["cls"], configured_for_8["cls"])


def test_mask_layouts_and_loss_weights() -> None:
    inputs = random_inputs(2, 2, 4, 2, 8, seed=1)
    masks = inputs[4]
    results = []
    for layout in (masks, masks.flatten(1), list(masks.chunk(2)), tuple(masks.int().chunk(2))):
        loss = IBOTLoss(8, 8, 2, 2, epochs=10, lambda1=0.5, lambda2=2.0)
        results.append(loss(*inputs[:4], layout, 3))
    for result in results[1:]:
        for key in ("cls", "patch", "loss"):
            assert torch.equal(result[key], results[0][key])
    plain = IBOTLoss(8, 8, 2, 2, epochs=10)(*inputs, 3)
    assert torch.allclose(results[0]["cls"], 0.5 * plain["cls"])
    assert torch.allclose(results[0]["patch"], 2.0 * plain["patch"])


def test_teacher_temperature_schedules() -> None:
    loss = IBOTLoss(4, 4, epochs=151)
    cls_schedule, patch_schedule = released_schedules(0.04, 0.04, 0.04, 0.07, 30, 151)
    for epoch in (0, 1, 15, 28, 29, 30, 97, 150):
        assert loss.teacher_temperatures(epoch) == (cls_schedule[epoch], patch_schedule[epoch])
    assert loss.teacher_temperatures(0) == (0.04, 0.04) and loss.teacher_temperatures(29)[1] == 0.07
    delayed = IBOTLoss(4, 4, epochs=40, warmup_teacher_epochs=10, mim_start_epoch=5)
    expected = np.concatenate((np.ones(5) * 0.04, np.linspace(0.04, 0.07, 10), np.ones(25) * 0.07))
    assert [delayed.teacher_temperatures(e)[1] for e in range(40)] == expected.tolist()
    short = IBOTLoss(4, 4, epochs=2)  # warm-up longer than the run: its first entries
    assert short.teacher_temperatures(1)[1] == np.linspace(0.04, 0.07, 30)[1]
    short.epochs = 151  # set later, as a training loop does once it knows the run length
    assert short.teacher_temperatures(150) == (0.04, 0.07)
    with pytest.raises(ValueError, match="epoch"):
        short.teacher_temperatures(151)


def test_centres_update_without_a_process_group() -> None:
    assert not torch.distributed.is_initialized()
    inputs = random_inputs(2, 2, 3, 2, 6, seed=2)
    loss = IBOTLoss(6, 6, 2, 2, epochs=5, center_momentum=0.8, center_momentum2=0.6)
    assert set(loss.state_dict()) == {"center", "center2"}
    assert loss.center.shape == (1, 6) and loss.center2.shape == (1, 1, 6)
    first = loss(*inputs, 0)
    teacher_cls, teacher_patch = inputs[2], inputs[3]
    expected = 0.2 * teacher_cls.mean(0, keepdim=True)
    expected2 = 0.4 * teacher_patch.mean(1).mean(0).view(1, 1, 6)
    assert torch.allclose(loss.center, expected, atol=1e-6)
    assert torch.allclose(loss.center2, expected2, atol=1e-6)
    # The loss used the old (zero) centres; the next call uses the new ones.
    fresh = IBOTLoss(6, 6, 2, 2, epochs=5)
    assert torch.equal(fresh(*inputs, 0)["loss"], first["loss"])
    second = loss(*inputs, 0)
    assert not torch.allclose(second["cls"], first["cls"])
    assert torch.allclose(loss.center, 0.8 * expected + 0.2 * teacher_cls.mean(0, keepdim=True), atol=1e-6)


def test_gradients_reach_only_the_student() -> None:
    student_cls, student_patch, teacher_cls, teacher_patch, masks = random_inputs(2, 2, 3, 2, 6, seed=3)
    tensors = [t.requires_grad_() for t in (student_cls, student_patch, teacher_cls, teacher_patch)]
    IBOTLoss(6, 6, 2, 2, epochs=5)(*tensors, masks, 1)["loss"].backward()
    assert tensors[0].grad is not None and tensors[0].grad.abs().sum() > 0
    assert tensors[1].grad is not None and tensors[1].grad.abs().sum() > 0
    assert tensors[2].grad is None and tensors[3].grad is None
    # Unmasked tokens get no patch gradient.
    assert torch.all(tensors[1].grad[~masks.flatten(1)] == 0)


def test_ibot_loss_errors() -> None:
    inputs = random_inputs(2, 2, 3, 2, 6, seed=4)
    loss = IBOTLoss(6, 6, 2, 2, epochs=5)
    with pytest.raises(ValueError, match="student_cls"):
        loss(inputs[0][:-1], *inputs[1:], 0)  # not a whole number of views
    with pytest.raises(ValueError, match="teacher_cls"):
        loss(inputs[0], inputs[1], inputs[2][:-1], *inputs[3:], 0)
    with pytest.raises(ValueError, match="student_patch and teacher_patch"):
        loss(*inputs[:3], inputs[3][:, :-1], inputs[4], 0)
    with pytest.raises(ValueError, match="masks"):
        loss(*inputs[:4], inputs[4][:, :1], 0)
    with pytest.raises(ValueError, match="epoch"):
        loss(*inputs, 5)
    with pytest.raises(ValueError, match=r"V >= max\(G=1, 2\)"):
        IBOTLoss(6, 6, 1, 0)(inputs[0][:3], inputs[1][:3], inputs[2][:3], inputs[3][:3], inputs[4][:3], 0)
    with pytest.raises(ValueError, match="num_local"):
        IBOTLoss(6, 6, 2, -1)
    with pytest.raises(ValueError, match="epoch counts"):
        IBOTLoss(6, 6, warmup_teacher_epochs=0)


_WORKER = """
import sys, torch, torch.distributed as dist
from visionkit.methods.openus import IBOTLoss
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
data = torch.load(sys.argv[3])
rows = slice(rank * 3, rank * 3 + 3)  # each rank: its own 3 images of one global view
loss = IBOTLoss(5, 5, 1, 1, epochs=3)
loss(data["s_cls"][rank], data["s_patch"][rows], data["t_cls"][rows], data["t_patch"][rows], data["m"][rows], 0)
torch.save({"center": loss.center, "center2": loss.center2}, sys.argv[4])
dist.destroy_process_group()
"""


@pytest.mark.slow  # two fresh interpreters import torch
def test_centres_are_averaged_over_two_gloo_ranks(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    data = {
        "s_cls": [torch.randn(6, 5, generator=generator) for _ in range(2)],
        "s_patch": torch.randn(6, 4, 5, generator=generator),
        "t_cls": torch.randn(6, 5, generator=generator),
        "t_patch": torch.randn(6, 4, 5, generator=generator),
        "m": torch.rand(6, 2, 2, generator=generator) < 0.5,
    }
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(textwrap.dedent(_WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "worker.py", str(r), str(tmp_path / "store"), "data.pt", f"out{r}.pt"],
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    single = IBOTLoss(5, 5, 1, 1, epochs=3)
    single.update_center(data["t_cls"], data["t_patch"])  # all 6 rows in one process
    for rank in range(2):
        out = torch.load(tmp_path / f"out{rank}.pt")
        assert torch.allclose(out["center"], single.center, atol=1e-6)
        assert torch.allclose(out["center2"], single.center2, atol=1e-6)


def test_masked_pixel_mse_hand_worked() -> None:
    images = torch.zeros(1, 3, 4, 4)
    reconstruction = torch.zeros(1, 3, 4, 4)
    reconstruction[0, :, :2, 2:] = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)  # error in token (0, 1) only
    reconstruction[0, 0, 3, 3] = 10.0  # error in an unmasked token: ignored
    token_mask = torch.tensor([[[False, True], [True, False]]])
    # Σ(err²·M) = 4·(1 + 4 + 9) = 56 over ΣM = 8 masked pixels (one channel), divided by C = 3.
    expected = 56 / (8 + 1e-5) / 3
    assert masked_pixel_mse(images, reconstruction, token_mask).item() == pytest.approx(expected, rel=1e-6)
    assert masked_pixel_mse(images, reconstruction, torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 0.0
    errors = masked_patch_error(images, reconstruction, token_mask)
    assert errors.shape == (1, 3, 2, 2)
    assert errors[0, :, 0, 1].tolist() == [1.0, 4.0, 9.0]
    assert errors[0, :, 1, 0].tolist() == [0.0, 0.0, 0.0] and errors[0, 0, 1, 1] == 0.0  # unmasked: 0


def test_pixel_losses_agree_with_an_interpolated_mask_and_give_gradients() -> None:
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 12, 8, generator=generator)
    reconstruction = torch.randn(2, 3, 12, 8, generator=generator, requires_grad=True)
    token_mask = torch.rand(2, 3, 2, generator=generator) < 0.5
    pixel_mask = F.interpolate(token_mask[:, None].float(), size=(12, 8), mode="nearest")
    expected = ((reconstruction - images) ** 2 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
    loss = masked_pixel_mse(images, reconstruction, token_mask)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert reconstruction.grad is not None
    assert torch.all(reconstruction.grad * (1 - pixel_mask) == 0)
    errors = masked_patch_error(images, reconstruction.detach(), token_mask)
    # The patch means add back up to the masked sum (patch area 4·4).
    assert torch.allclose(errors.sum() * 16 / (pixel_mask.sum() + 1e-5) / 3, expected.detach())


def test_pixel_loss_errors() -> None:
    images = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="images and reconstruction"):
        masked_pixel_mse(images, torch.zeros(1, 3, 8, 4), torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        masked_pixel_mse(images, images, torch.zeros(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="divide"):
        masked_patch_error(images, images, torch.zeros(1, 3, 3, dtype=torch.bool))
