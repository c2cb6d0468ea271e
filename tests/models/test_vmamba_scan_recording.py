"""VMamba: recording one SS2D's selective-scan inputs (outputs unchanged, shapes, selection, clean-up, use with
mamba_attention_map) and loading an ImageNet checkpoint without ``masked_embed`` into a model with a mask token."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import visionkit.models.backbones  # noqa: F401  (registers the VMamba sizes)
from visionkit import create_model
from visionkit.models.backbones import SS2DScanRecord, record_scan_inputs
from visionkit.models.backbones.vmamba import VSSM
from visionkit.ops import mamba_attention_map
from visionkit.weights import CheckpointMismatchError

BACKEND = "torch"


def _test_model(**kwargs) -> VSSM:
    return create_model("vmamba_test", scan_backend=BACKEND, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------------------------------------
def test_recording_leaves_outputs_bit_identical():
    torch.manual_seed(0)
    model = _test_model(mask_token=True).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = True
    with torch.no_grad():
        plain = model.forward_intermediates(x, mask=mask)
        with record_scan_inputs(model) as records:
            recorded = model.forward_intermediates(x, mask=mask)
    assert len(records) == 1
    assert torch.equal(recorded[0], plain[0])
    for got, want in zip(recorded[1], plain[1], strict=True):
        assert torch.equal(got, want)


def test_record_shapes_and_values():
    torch.manual_seed(0)
    model = _test_model().eval()
    ss2d = model.layers[-1].blocks[-1].op  # stage 4 of vmamba_test: dim 128, d_inner 256, N = 1, dt_rank 8
    with torch.no_grad(), record_scan_inputs(model) as records:
        model(torch.randn(2, 3, 64, 96))  # stage-4 grid 2 x 3
    (r,) = records
    assert isinstance(r, SS2DScanRecord)
    assert (r.height, r.width) == (2, 3)
    assert r.delta.shape == (2, 1024, 6)
    assert r.A.shape == (1024, 1) and r.delta_bias.shape == (1024,)
    assert r.B.shape == (2, 4, 1, 6) and r.C.shape == (2, 4, 1, 6)
    assert r.A.dtype == torch.float32 and r.delta_bias.dtype == torch.float32
    assert torch.equal(r.A, -torch.exp(ss2d.A_logs))
    assert torch.equal(r.delta_bias, ss2d.dt_projs_bias.reshape(-1))


def test_record_feeds_mamba_attention_map():
    torch.manual_seed(0)
    model = _test_model().eval()
    with torch.no_grad(), record_scan_inputs(model, stage=-1, block=-1) as records:
        model(torch.randn(3, 3, 64, 64))
    r = records[0]
    attention = mamba_attention_map(r.delta, r.A, r.B, r.C, height=r.height, width=r.width, delta_bias=r.delta_bias)
    assert attention.shape == (3, 4, 4)
    assert attention.min() == 0 and attention.max() == 1 and torch.isfinite(attention).all()


def test_one_record_per_forward_and_clean_exit():
    model = _test_model().eval()
    ss2d = model.layers[-1].blocks[-1].op
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with record_scan_inputs(model) as records:
            model(x)
            model(x)
        model(x)  # after the block: nothing more is recorded
    assert len(records) == 2 and ss2d._scan_observers == []
    with pytest.raises(RuntimeError, match="boom"), record_scan_inputs(model) as records:
        raise RuntimeError("boom")
    assert ss2d._scan_observers == []


def test_nested_recorders_on_the_same_block_both_record():
    model = _test_model().eval()
    with torch.no_grad(), record_scan_inputs(model) as outer:
        with record_scan_inputs(model, stage=3, block=0) as inner:
            model(torch.randn(1, 3, 64, 64))
        model(torch.randn(1, 3, 64, 64))
    assert len(inner) == 1 and len(outer) == 2


def test_detach_flag():
    model = _test_model().train()
    x = torch.randn(2, 3, 64, 64)
    with record_scan_inputs(model) as detached:
        model(x)
    with record_scan_inputs(model, detach=False) as attached:
        model(x)
    assert not detached[0].delta.requires_grad and not detached[0].B.requires_grad
    assert attached[0].delta.requires_grad and attached[0].A.requires_grad


def test_stage_and_block_selection_with_negative_indices():
    torch.manual_seed(0)
    model = _test_model(depths=(1, 1, 1, 2)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with record_scan_inputs(model, stage=0, block=0) as first:
            model(x)
        with record_scan_inputs(model, stage=3, block=1) as second, record_scan_inputs(model) as default:
            model(x)
        with record_scan_inputs(model, stage=-1, block=-2) as other:
            model(x)
    assert (first[0].height, first[0].width) == (16, 16) and first[0].delta.shape == (1, 4 * 32, 256)
    assert torch.equal(second[0].delta, default[0].delta)  # block 1 of the last stage is block -1
    assert not torch.equal(other[0].delta, default[0].delta)


def test_selection_errors():
    model = _test_model()
    stage_error = r"stage 4 is out of range; the model has 4 stages \(0\.\.3, or -4\.\.-1\)"
    with pytest.raises(IndexError, match=stage_error), record_scan_inputs(model, stage=4):
        pass
    block_error = r"block -2 is out of range; stage -1 has 1 blocks .*\[1, 1, 1, 1\]"
    with pytest.raises(IndexError, match=block_error), record_scan_inputs(model, block=-2):
        pass
    with pytest.raises(TypeError, match="Linear holds no VMamba stages"), record_scan_inputs(nn.Linear(2, 2)):
        pass


def test_records_through_a_features_only_wrapper():
    model = _test_model(features_only=True).eval()
    with torch.no_grad(), record_scan_inputs(model, stage=2) as records:
        model(torch.randn(1, 3, 64, 64))
    assert (records[0].height, records[0].width) == (4, 4)


# ---------------------------------------------------------------------------------------------------------------------
# mask token + ImageNet checkpoint (no masked_embed)
# ---------------------------------------------------------------------------------------------------------------------
def test_imagenet_checkpoint_loads_into_a_model_with_a_mask_token(tmp_path, caplog):
    torch.manual_seed(0)
    source = _test_model().eval()
    path = tmp_path / "imagenet.pth"
    torch.save({"model": source.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="visionkit.models.backbones.vmamba"):
        model = create_model("vmamba_test", checkpoint_path=path, mask_token=True, scan_backend=BACKEND).eval()
    assert "no masked_embed" in caplog.text
    assert torch.equal(model.masked_embed, torch.zeros(1, 16))
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_a_checkpoint_with_masked_embed_keeps_its_value(tmp_path):
    source = _test_model(mask_token=True)
    with torch.no_grad():
        source.masked_embed.normal_()
    path = tmp_path / "openus.pth"
    torch.save({"model": source.state_dict()}, path)
    model = create_model("vmamba_test", checkpoint_path=path, mask_token=True, scan_backend=BACKEND)
    assert torch.equal(model.masked_embed, source.masked_embed)


def test_other_missing_or_unexpected_keys_still_fail_with_a_mask_token(tmp_path):
    state = _test_model().state_dict()
    del state["layers.1.blocks.0.op.Ds"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.blocks\.0\.op\.Ds") as error:
        create_model("vmamba_test", checkpoint_path=path, mask_token=True, scan_backend=BACKEND)
    assert "masked_embed" not in str(error.value)
    torch.save({"model": {**_test_model().state_dict(), "stray.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"stray\.weight"):
        create_model("vmamba_test", checkpoint_path=path, mask_token=True, scan_backend=BACKEND)
