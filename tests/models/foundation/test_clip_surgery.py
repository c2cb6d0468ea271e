"""CLIP Surgery tokens, text ensemble, feature surgery and similarity maps against independent references."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from tests.models.foundation.tiny_models import TINY_VIT
from visionkit.models.foundation import (
    SURGERY_TEMPLATES,
    ClipSurgery,
    build_clip,
    encode_text_ensemble,
    feature_surgery,
    image_level_scores,
    resize_pos_embed,
    similarity_maps,
    surgery_encode_image,
)


def _reference_surgery(visual: torch.nn.Module, images: torch.Tensor, n_surgery: int) -> torch.Tensor:
    """CLIP Surgery's forward (clip_surgery_model.py) written out with explicit attention math on open_clip weights."""
    x = visual.conv1(images)
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    side = int((visual.positional_embedding.shape[0] - 1) ** 0.5)
    pos = visual.positional_embedding[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, grid, mode="bilinear").reshape(1, x.shape[-1], -1).transpose(1, 2)[0]
    x = visual.ln_pre(x + torch.cat([visual.positional_embedding[:1], pos]))

    def paths(block: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = h.shape
        heads = block.attn.num_heads
        qkv = h @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias
        q, k, v = qkv.reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        scale = (dim // heads) ** -0.5
        outputs = []
        for attention in ((v @ v.transpose(-2, -1)) * scale, (q @ k.transpose(-2, -1)) * scale):
            out = (attention.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
            outputs.append(block.attn.out_proj(out))
        return outputs[0], outputs[1]

    blocks = visual.transformer.resblocks
    first = len(blocks) - n_surgery
    x_ori = None
    for index, block in enumerate(blocks):
        if index < first:
            x = x + paths(block, block.ln_1(x))[1]
            x = x + block.mlp(block.ln_2(x))
        else:
            source = x if index == first else x_ori
            x_res, x_ori_res = paths(block, block.ln_1(source))
            x_ori = source + x_ori_res
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
            x = x + x_res  # the feed-forward is skipped on the new path
    if n_surgery:
        x = torch.cat([x_ori[:, :1], x[:, 1:]], dim=1)
    return visual.ln_post(x) @ visual.proj


@pytest.mark.parametrize("n_surgery", [1, 2, 4])
@pytest.mark.parametrize("size", [(32, 32), (48, 48)])
def test_surgery_matches_written_out_reference(tiny_clip_vit, n_surgery: int, size: tuple[int, int]) -> None:
    visual = tiny_clip_vit[0].visual
    images = torch.randn(2, 3, *size)
    before = visual.positional_embedding.detach().clone()
    with torch.no_grad():
        tokens = surgery_encode_image(visual, images, n_surgery)
        expected = _reference_surgery(visual, images, n_surgery)
    grid = (size[0] // 8) * (size[1] // 8)
    assert tokens.shape == (2, 1 + grid, 16)
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(visual.positional_embedding, before)  # the model is not modified


def test_surgery_differs_from_plain_path_and_keeps_cls(tiny_clip_vit) -> None:
    visual = tiny_clip_vit[0].visual
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = surgery_encode_image(visual, images, 0)
        surgery = surgery_encode_image(visual, images, 2)
    torch.testing.assert_close(surgery[:, 0], plain[:, 0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(surgery[:, 1:], plain[:, 1:], atol=1e-3)


def test_zero_surgery_blocks_equal_open_clip_tokens(tiny_clip_vit) -> None:
    model = tiny_clip_vit[0]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ClipSurgery(model.visual, n_surgery=0)(images)
        model.visual.output_tokens = True
        try:
            pooled, patch_tokens = model.visual(images)
        finally:
            model.visual.output_tokens = False
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens[:, 1:], patch_tokens @ model.visual.proj, rtol=1e-5, atol=1e-6)


def test_surgery_rejects_bad_arguments(tiny_clip_vit) -> None:
    visual = tiny_clip_vit[0].visual
    with pytest.raises(ValueError, match="n_surgery"):
        surgery_encode_image(visual, torch.zeros(1, 3, 32, 32), 5)
    resnet, _ = build_clip({**TINY_VIT, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}})
    with pytest.raises(TypeError, match="VisionTransformer"):
        ClipSurgery(resnet.visual)


def test_resize_pos_embed_hand_example() -> None:
    # 1×2 grid [a, b] -> 1×4 with align_corners=False: [a, 0.75a + 0.25b, 0.25a + 0.75b, b].
    pos = torch.tensor([[9.0], [1.0], [5.0]])
    out = resize_pos_embed(pos, (1, 4), old_grid_hw=(1, 2))
    assert torch.equal(out, torch.tensor([[9.0], [1.0], [2.0], [4.0], [5.0]]))
    assert resize_pos_embed(pos, (1, 2), old_grid_hw=(1, 2)) is pos
    square = torch.randn(1 + 14 * 14, 8)
    assert resize_pos_embed(square, (32, 32)).shape == (1 + 32 * 32, 8)


def test_templates_are_clip_surgery_list() -> None:
    assert len(SURGERY_TEMPLATES) == 85 and len(set(SURGERY_TEMPLATES)) == 85
    assert all(template.count("{}") == 1 for template in SURGERY_TEMPLATES)
    assert SURGERY_TEMPLATES[0] == "a bad photo of a {}."
    assert SURGERY_TEMPLATES[80:] == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )
    # sha256 of CLIP_Surgery clip/clip.py's list joined by newlines (computed from the released source).
    digest = hashlib.sha256("\n".join(SURGERY_TEMPLATES).encode()).hexdigest()
    assert digest == "f87d863dc7a96d46812438cf13a8a071e340f7be26222d17a0b61d41d28c0984"


def test_text_ensemble_matches_per_class_loop(tiny_clip_vit) -> None:
    model, tokenizer = tiny_clip_vit
    templates = SURGERY_TEMPLATES[:5]
    names = ["cat", "traffic light", ""]
    embeddings = encode_text_ensemble(model, tokenizer, names, templates, batch_size=4)
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        for row, name in enumerate(names):  # CLIP Surgery's encode_text_with_prompt_ensemble, one class at a time
            features = model.encode_text(tokenizer([t.format(name) for t in templates]))
            features = features / features.norm(dim=-1, keepdim=True)
            mean = features.mean(dim=0)
            torch.testing.assert_close(embeddings[row], mean / mean.norm(), rtol=1e-5, atol=1e-6)


def test_feature_surgery_hand_example_and_norm_axis() -> None:
    tokens = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])  # [B=1, T=2, D=2]
    text = torch.tensor([[1.0, 0.0]])
    redundant = torch.tensor([[0.5, 0.5]])  # text - redundant = [0.5, -0.5]
    # dim=1 (Zip): columns normalised over tokens -> [[.4472, .4472], [.8944, .8944]] -> similarity 0 for both.
    torch.testing.assert_close(feature_surgery(tokens, text, redundant), torch.zeros(1, 2, 1))
    # dim=-1 (CLIP Surgery demo): each token normalised -> [.6, .8] -> 0.3 - 0.4 = -0.1.
    torch.testing.assert_close(feature_surgery(tokens, text, redundant, norm_dim=-1), torch.full((1, 2, 1), -0.1))
    # Subtracting a class's own embedding as redundancy leaves nothing for that class.
    tokens = torch.randn(2, 5, 8)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    assert torch.allclose(feature_surgery(tokens, text, text[1])[..., 1], torch.zeros(2, 5), atol=1e-6)
    without = feature_surgery(tokens, text, torch.zeros(8))
    torch.testing.assert_close(without, F.normalize(tokens, dim=1) @ text.t())


def test_feature_surgery_class_mean_matches_elementwise_reference() -> None:
    tokens = torch.randn(2, 7, 8)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    image = F.normalize(tokens, dim=-1)
    # CLIP Surgery's clip_feature_surgery without redundant_feats, element-wise.
    prob = (image @ text.t() * 2).softmax(-1)
    weights = prob / prob.mean(-1, keepdim=True)
    feats = image.reshape(2, 7, 1, 8) * text.reshape(1, 1, 4, 8) * weights.reshape(2, 7, 4, 1)
    expected = (feats - feats.mean(2, keepdim=True)).sum(-1)
    torch.testing.assert_close(feature_surgery(tokens, text, None, norm_dim=-1), expected, rtol=1e-5, atol=1e-6)


def test_similarity_maps_min_max_shapes_and_degenerate_class() -> None:
    similarity = torch.randn(2, 1 + 12, 3)
    similarity[:, :, 2] = 0.7  # constant class
    maps = similarity_maps(similarity, (3, 4), grid_hw=(3, 4))  # same size: no interpolation
    assert maps.shape == (2, 3, 3, 4)
    for b in range(2):
        for c in range(2):
            patches = similarity[b, 1:, c]
            expected = ((patches - patches.min()) / (patches.max() - patches.min())).reshape(3, 4)
            torch.testing.assert_close(maps[b, c], expected)
    assert torch.equal(maps[:, 2], torch.zeros(2, 3, 4))
    upsampled = similarity_maps(similarity, (30, 50), grid_hw=(3, 4))
    assert upsampled.shape == (2, 3, 30, 50)
    assert upsampled.min() >= 0 and upsampled.max() <= 1
    square = similarity_maps(torch.randn(1, 1 + 16, 2), (8, 8))
    assert square.shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="square"):
        similarity_maps(torch.randn(1, 1 + 12, 2), (8, 8))


def test_image_level_scores_are_softmax_over_classes(tiny_clip_vit) -> None:
    model = tiny_clip_vit[0]
    images = torch.randn(3, 3, 32, 32)
    text = F.normalize(torch.randn(5, 16), dim=-1)
    with torch.no_grad():
        scores = image_level_scores(model, images, text)
        features = F.normalize(model.encode_image(images), dim=-1)
    assert scores.shape == (3, 5)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(scores, (100.0 * features @ text.t()).softmax(-1))
