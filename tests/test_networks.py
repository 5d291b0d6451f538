"""Tests of smt_monai.networks: layer outputs, presets, stem, focusing-predictor detach, H&E normalisation,
and TorchScript export of every layer."""

import math

import pytest
import torch
from monai.networks.utils import convert_to_torchscript

from smt_monai.networks import (
    HE_OD_MEAN,
    HE_OD_STD,
    PRESETS,
    SMT,
    PatchStem,
    SMTConfig,
    SMTLayer,
    normalize_he,
    smt_paper,
    smt_tiny,
)

GRID, PATCH = 4, 16
SIDE = GRID * PATCH
READ = SIDE // 2  # the tiny preset's stem_pool


@pytest.fixture(scope="module")
def model() -> SMT:
    torch.manual_seed(0)
    return smt_tiny().eval()


def test_layer_outputs(model: SMT) -> None:
    x = torch.randn(2, 3, SIDE, SIDE)
    width, heads, tokens = 64, 4, 1 + GRID * GRID
    for layer in (1, 2, 3):
        out = model.layer_output(x, layer)
        assert out.logits.shape == out.probs.shape == (2, 2)
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(2))
        assert out.cls_embedding.shape == (2, width)
        assert out.patch_embeddings.shape == (2, GRID * GRID, width)
        assert out.attn.shape == (2, heads, tokens, tokens)
        torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, heads, tokens))
        if layer < 3:
            assert out.q is not None and out.q.shape == (2, GRID * GRID)
            assert bool(((out.q >= 0) & (out.q <= 1)).all())
        else:
            assert out.q is None
    with pytest.raises(ValueError, match="layer must be"):
        model.layer_output(x, 4)
    torch.testing.assert_close(model(x, 2), model.layer_output(x, 2).probs)  # the zoo's one-module view
    with pytest.raises(ValueError, match="expected 64 x 64 .* or 32 x 32"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected 64 x 64"):
        model(torch.randn(1, 3, 64, 32))


def test_pooled_inputs_match_full_resolution(model: SMT) -> None:
    """A ``read_size`` input, the ``input_size`` one average-pooled by ``stem_pool``, gives equal outputs."""
    assert (model.input_size, model.read_size) == (SIDE, READ)
    assert (model.layer1.input_size, model.layer1.read_size) == (SIDE, READ)
    x = torch.randn(2, 3, SIDE, SIDE)
    pooled = torch.nn.functional.avg_pool2d(x, model.config.stem_pool)
    with torch.no_grad():
        for layer in (1, 3):
            full, read = model.layer_output(x, layer), model.layer_output(pooled, layer)
            for name, a, b in zip(full._fields, full, read, strict=True):
                if a is None:
                    assert b is None, name
                else:
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_layers_have_separate_parameters(model: SMT) -> None:
    p1, p2, p3 = (dict(getattr(model, f"layer{i}").named_parameters()) for i in (1, 2, 3))
    assert not any(name.startswith("focus_head") for name in p3)
    shared = set(p1) & set(p2) & set(p3)
    assert "stem.layers.0.weight" in shared and "first_block.attn.qkv.weight" in shared
    for name in shared:
        assert p1[name].data_ptr() != p2[name].data_ptr() != p3[name].data_ptr()
    assert not torch.equal(p1["first_block.attn.qkv.weight"], p2["first_block.attn.qkv.weight"])


def test_presets_and_overrides() -> None:
    tiny = smt_tiny(num_classes=3)
    assert tiny.config == SMTConfig(**{**PRESETS["tiny"].__dict__, "num_classes": 3})
    assert tiny.layer1.head.out_features == 3
    assert SMT(preset="tiny").config == PRESETS["tiny"]
    assert SMT(config=PRESETS["tiny"], stem_channels=[8, 8]).config.stem_channels == (8, 8)
    p = PRESETS["paper"]
    assert (p.depth, p.num_heads, p.embed_dim, p.grid, p.patch_size) == (12, 6, 384, 8, 256)
    with pytest.raises(ValueError, match="unknown preset"):
        SMT(preset="huge")
    with pytest.raises(TypeError):
        smt_tiny(width=3)


def test_paper_layer_forward() -> None:
    layer = SMTLayer(grid=8, patch_size=256, focus=True).eval()
    assert len(layer.blocks) == 11
    with torch.no_grad():
        out = layer(torch.zeros(1, 3, 2048, 2048))
    assert out.q is not None and out.q.shape == (1, 64)
    assert out.attn.shape == (1, 6, 65, 65)
    assert (layer.input_size, layer.read_size) == (2048, 512)
    assert layer(torch.zeros(1, 3, 512, 512)).q.shape == (1, 64)
    assert callable(smt_paper)


@pytest.mark.parametrize(
    "grid, patch, pool, strides", [(4, 16, 2, (2, 2)), (4, 32, 4, (2,)), (2, 64, 4, (4, 4))]
)
def test_stem_patch_sizes_and_locality(grid: int, patch: int, pool: int, strides: tuple[int, ...]) -> None:
    stem = PatchStem(patch, 24, pool=pool, channels=(8,) * len(strides), strides=strides)
    x = torch.rand(1, 3, grid * patch, grid * patch)
    tokens = stem(x)
    assert tokens.shape == (1, grid * grid, 24)
    # Changing patch (row 1, col 0) changes only its token: no receptive field crosses a patch border.
    y = x.clone()
    y[..., patch : 2 * patch, :patch] = torch.rand(3, patch, patch)
    changed = (stem(y) - tokens).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [grid]


def test_stem_rejects_indivisible_patch() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        PatchStem(24, 16, pool=4, channels=(8, 8), strides=(2, 2))
    with pytest.raises(ValueError, match="differ in length"):
        PatchStem(16, 16, channels=(8,), strides=(2, 2))


@pytest.mark.parametrize("to_encoder", [False, True])
def test_focus_grad_to_encoder(to_encoder: bool) -> None:
    layer = SMTLayer(
        GRID,
        PATCH,
        embed_dim=32,
        depth=2,
        num_heads=2,
        stem_pool=2,
        stem_channels=(8, 8),
        stem_strides=(2, 2),
        focus_grad_to_encoder=to_encoder,
    )
    out = layer(torch.randn(2, 3, SIDE, SIDE))
    assert out.q is not None
    grads = torch.autograd.grad(
        out.q.sum(), [layer.stem.layers[0].weight, layer.focus_head.mlp[0].weight], allow_unused=True
    )
    assert grads[1] is not None
    assert (grads[0] is not None) == to_encoder


def test_attention_carries_graph(model: SMT) -> None:
    out = model.layer1(torch.randn(2, 3, SIDE, SIDE))
    assert out.attn.requires_grad
    (grad,) = torch.autograd.grad(out.probs[:, 1].sum(), out.attn)
    assert grad.abs().sum() > 0


def test_normalize_he() -> None:
    image = torch.tensor([255, 0, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = normalize_he(image)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    # white (R) is OD 0, black (G) OD ln 256, mid grey (B) OD ln(256 / 129); each then standardised
    assert out[0, 0, 0, 0].item() == pytest.approx(-HE_OD_MEAN[0] / HE_OD_STD, rel=1e-6)
    assert out[0, 1, 0, 0].item() == pytest.approx((math.log(256) - HE_OD_MEAN[1]) / HE_OD_STD, rel=1e-6)
    assert out[0, 2, 0, 0].item() == pytest.approx(
        (-math.log(129 / 256) - HE_OD_MEAN[2]) / HE_OD_STD, rel=1e-6
    )
    tissue = torch.tensor([223, 198, 220], dtype=torch.uint8).view(3, 1, 1)  # OD about HE_OD_MEAN
    assert normalize_he(tissue).abs().max().item() < 0.2
    with pytest.raises(ValueError, match="RGB"):
        normalize_he(torch.zeros(4, 8, 8, dtype=torch.uint8))


def test_torchscript_export_reproduces_every_layer(model: SMT, tmp_path) -> None:
    path = tmp_path / "smt.ts"
    convert_to_torchscript(model, filename_or_obj=str(path))  # what `monai.bundle ckpt_export` runs
    loaded = torch.jit.load(str(path))
    assert (loaded.grid, loaded.input_size, loaded.read_size) == (GRID, SIDE, READ)
    assert (loaded.layer1.input_size, loaded.layer1.read_size) == (SIDE, READ)
    with torch.no_grad():
        for layer, side in ((1, SIDE), (2, READ), (3, READ)):
            x = torch.randn(3, 3, side, side)
            eager = model.layer_output(x, layer)
            torch.testing.assert_close(loaded(x, layer), eager.probs, atol=1e-4, rtol=0)  # forward: probs
            for exported in (loaded.layer_output(x, layer), getattr(loaded, f"layer{layer}")(x)):
                assert exported._fields == eager._fields
                for name, a, b in zip(eager._fields, eager, exported, strict=True):
                    if a is None:
                        assert b is None, name
                    else:
                        assert (a - b).abs().max().item() < 1e-4, name


def test_bfloat16_autocast_keeps_the_layer_outputs(model: SMT) -> None:
    """Inference defaults to bfloat16 autocast where it is fast (``fast_bf16``): outputs stay close."""
    torch.manual_seed(1)
    x = normalize_he(torch.randint(0, 256, (3, 3, READ, READ), dtype=torch.uint8))
    with torch.inference_mode():
        full = model.layer_output(x, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.layer_output(x, 1)
    assert half.probs.dtype == torch.float32 and half.q is not None and half.q.dtype == torch.float32
    torch.testing.assert_close(half.probs.sum(-1), torch.ones(3))  # not to bfloat16's 3 digits
    torch.testing.assert_close(half.probs, full.probs, atol=0.02, rtol=0)
    assert full.q is not None
    torch.testing.assert_close(half.q, full.q, atol=0.02, rtol=0)
