"""Tests of smt_monai.networks.pretrained: ViT-S/16 checkpoints (timm, DeiT, DINO layouts; .pth and
.safetensors) loaded into the transformers of chosen SMT layers, position embeddings resampled, one-line
errors.

The tests without timm build a timm-named checkpoint by hand from a tiny SMT layer (CI installs no timm);
those with timm load a randomly initialised ``vit_small_patch16_224`` into the paper preset and compare the
transformer's output with timm's own blocks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smt_monai.networks import SMT, PretrainedWeightsError, SMTLayer, load_pretrained
from smt_monai.networks.pretrained import layer_position_embeddings, vit_to_layer_names

TRANSFORMER = ("cls_token", "pos_embed", "first_block.", "blocks.", "norm.")


def timm_named(layer: SMTLayer) -> dict[str, torch.Tensor]:
    """timm's names for ``layer``'s transformer, spelled out by hand, plus a patch embedding and an ImageNet
    head (which the loader must leave out)."""
    width = layer.norm.weight.shape[0]
    state = {
        "cls_token": layer.cls_token,
        "pos_embed": layer.pos_embed,
        "patch_embed.proj.weight": torch.randn(width, 3, 16, 16),
        "patch_embed.proj.bias": torch.randn(width),
        "norm.weight": layer.norm.weight,
        "norm.bias": layer.norm.bias,
        "head.weight": torch.randn(1000, width),
        "head.bias": torch.randn(1000),
    }
    for i, block in enumerate([layer.first_block, *layer.blocks]):
        timm_parts = {
            "norm1": block.norm1,
            "attn.qkv": block.attn.qkv,
            "attn.proj": block.attn.out_proj,
            "norm2": block.norm2,
            "mlp.fc1": block.mlp.linear1,
            "mlp.fc2": block.mlp.linear2,
        }
        for name, module in timm_parts.items():
            state[f"blocks.{i}.{name}.weight"] = module.weight
            state[f"blocks.{i}.{name}.bias"] = module.bias
    return {k: v.detach().clone() for k, v in state.items()}


def dino_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """DINO's full training checkpoint: teacher and (DDP-wrapped) student backbones with their projection
    heads, and the run's arguments as an ``argparse.Namespace``."""
    head = {"head.mlp.0.weight": torch.randn(8, 4), "head.last_layer.weight_g": torch.ones(16, 1)}
    return {
        "teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **head},
        "student": {f"module.backbone.{k}": v + 1 for k, v in state.items()},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }


def save(path: Path, content: dict) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(content, str(path))
    else:
        torch.save(content, path)
    return path


def transformer_state(layer: torch.nn.Module, transformer: bool) -> dict[str, torch.Tensor]:
    """The layer's transformer tensors (``transformer``) or all the others (stem, head, ``f_focus``)."""
    return {k: v for k, v in layer.state_dict().items() if k.startswith(TRANSFORMER) == transformer}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def source() -> SMTLayer:
    torch.manual_seed(0)
    return SMT(preset="tiny").layer1.eval()


@pytest.mark.parametrize("layout", ["timm.pth", "deit.pth", "dino.pth", "timm.safetensors"])
def test_timm_named_checkpoint_round_trips(source: SMTLayer, layout: str, tmp_path: Path) -> None:
    """Every transformer tensor of layers 1 and 3 comes from the file; stems, heads, f_focus and layer 2 keep
    their initialisation; given the source's stem and heads too, the loaded layer computes the source's
    outputs."""
    if layout.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    state = timm_named(source)
    content = {"deit.pth": {"model": state}, "dino.pth": dino_checkpoint(state)}.get(layout, state)
    path = save(tmp_path / layout, content)
    torch.manual_seed(1)
    reference = SMT(preset="tiny").eval()
    torch.manual_seed(1)
    loaded = SMT(preset="tiny", pretrained=str(path), pretrained_layers=(1, 3)).eval()

    for i in (1, 3):
        layer, fresh = getattr(loaded, f"layer{i}"), getattr(reference, f"layer{i}")
        assert_same(transformer_state(layer, True), transformer_state(source, True))
        assert_same(transformer_state(layer, False), transformer_state(fresh, False))
    assert_same(loaded.layer2.state_dict(), reference.layer2.state_dict())

    loaded.layer1.stem.load_state_dict(source.stem.state_dict())
    loaded.layer1.head.load_state_dict(source.head.state_dict())
    loaded.layer1.focus_head.load_state_dict(source.focus_head.state_dict())
    x = torch.randn(2, 3, source.read_size, source.read_size)
    with torch.no_grad():
        for name, a, b in zip(source(x)._fields, source(x), loaded.layer1(x), strict=True):
            assert torch.equal(a, b), name


def test_position_embeddings_are_resampled_with_the_class_position_kept(source: SMTLayer) -> None:
    width = source.norm.weight.shape[0]
    class_row = torch.randn(1, 1, width)
    constant = torch.full((1, 9, width), 0.25)  # a 3 x 3 checkpoint grid, the tiny layer's is 4 x 4
    resampled = layer_position_embeddings(torch.cat([class_row, constant], dim=1), grid=4)
    assert resampled.shape == (1, 17, width)
    assert torch.equal(resampled[:, :1], class_row)
    torch.testing.assert_close(resampled[:, 1:], torch.full((1, 16, width), 0.25))
    ramp = torch.arange(9.0).reshape(1, 9, 1).expand(1, 9, width)
    bicubic = F.interpolate(ramp.reshape(1, 3, 3, width).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                            antialias=True)  # fmt: skip
    resampled = layer_position_embeddings(torch.cat([class_row, ramp], dim=1), grid=4)
    torch.testing.assert_close(resampled[:, 1:], bicubic.permute(0, 2, 3, 1).reshape(1, 16, width))
    same_grid = torch.randn(1, 17, width)
    assert torch.equal(layer_position_embeddings(same_grid, grid=4), same_grid)
    no_class = layer_position_embeddings(torch.randn(1, 16, width), grid=4)  # timm's no_embed_class
    assert torch.equal(no_class[:, :1], torch.zeros(1, 1, width))


class NotATensor:
    """A pickled object that a weights-only load must refuse."""


def expect_error(path: Path, *fragments: str, layers: tuple[int, ...] = (1,)) -> None:
    with pytest.raises(PretrainedWeightsError) as info:
        SMT(preset="tiny", pretrained=path, pretrained_layers=layers)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 400, message
    for fragment in fragments:
        assert fragment in message, message


def test_unusable_checkpoints_give_one_line(source: SMTLayer, tmp_path: Path) -> None:
    state = timm_named(source)
    expect_error(tmp_path / "absent.pth", "does not exist")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    expect_error(tmp_path / "garbage.pth", "cannot read")
    expect_error(
        save(tmp_path / "object.pth", {"model": state, "extra": NotATensor()}),
        "cannot read pretrained weights: refused: it holds Python objects",
        "(Unsupported global: GLOBAL test_pretrained.NotATensor was not an allowed global by default)",
    )
    expect_error(save(tmp_path / "optimizer.pth", {"optimizer": {"lr": 0.1}}), "no state dict")

    del state["blocks.1.mlp.fc2.bias"]
    expect_error(save(tmp_path / "missing.pth", state), "missing blocks.1.mlp.fc2.bias")

    deeper = {**timm_named(source), **{k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()}}
    expect_error(save(tmp_path / "deeper.pth", deeper), "depth-3 ViT", "no place", "blocks.2.attn.proj.bias")

    torch.manual_seed(0)
    wider = SMTLayer(
        4, 16, embed_dim=96, depth=2, num_heads=4, stem_pool=2, stem_channels=(8,), stem_strides=(4,)
    )
    expect_error(
        save(tmp_path / "wider.pth", timm_named(wider)),
        "width-96, depth-2 ViT does not fit the SMT layer (width 64, depth 2)",
        "tensors differ in shape: cls_token (1, 1, 96) vs (1, 1, 64)",
        layers=(2, 3),
    )
    with pytest.raises(ValueError, match="pretrained_layers"):
        SMT(preset="tiny", pretrained=save(tmp_path / "ok.pth", timm_named(source)), pretrained_layers=(4,))


def test_loaded_model_exports_to_torchscript(source: SMTLayer, tmp_path: Path) -> None:
    model = SMT(preset="tiny", pretrained=save(tmp_path / "vit.pth", timm_named(source))).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, model.read_size, model.read_size)
    with torch.no_grad():
        torch.testing.assert_close(scripted.layer_output(x, 2).probs, model.layer_output(x, 2).probs)


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A randomly initialised timm ViT-S/16 saved in every layout (no weights can be downloaded here)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    folder = tmp_path_factory.mktemp("vit")
    files = {
        "timm.pth": save(folder / "timm.pth", state),
        "deit.pth": save(folder / "deit.pth", {"model": state}),
        "dino.pth": save(folder / "dino.pth", dino_checkpoint(state)),
    }
    files["timm.safetensors"] = folder / "timm.safetensors"
    return vit, files


@pytest.fixture(scope="module")
def paper() -> tuple[SMT, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The paper preset as initialised: the model, a copy of its state, an input and layer 1's probs on it."""
    torch.manual_seed(0)
    model = SMT(preset="paper").eval()
    x = torch.randn(1, 3, model.read_size, model.read_size)
    with torch.no_grad():
        probs = model.layer_output(x, 1).probs
    return model, {k: v.clone() for k, v in model.state_dict().items()}, x, probs


@pytest.mark.parametrize("layout", ["timm.pth", "deit.pth", "dino.pth", "timm.safetensors"])
def test_timm_vit_small_loads_into_the_paper_preset(timm_vit, paper, layout: str) -> None:
    from timm.layers import resample_abs_pos_embed

    vit, files = timm_vit
    model, initial, x, initial_probs = paper
    if layout.endswith(".safetensors"):
        pytest.importorskip("safetensors")
        save(files[layout], {k: v.detach().clone() for k, v in vit.state_dict().items()})
    try:
        load_pretrained(model, files[layout], layers=(1, 3))
        expected = vit.state_dict()
        for i in (1, 3):
            state = getattr(model, f"layer{i}").state_dict()
            for ours, theirs in vit_to_layer_names(12).items():
                if ours == "pos_embed":  # the 14 x 14 grid of 224 px resampled to the layer's 8 x 8
                    want = resample_abs_pos_embed(expected["pos_embed"], [8, 8], num_prefix_tokens=1)
                else:
                    want = expected[theirs]
                assert torch.equal(state[ours], want), (i, ours)
            untouched = {k: v for k, v in state.items() if not k.startswith(TRANSFORMER)}
            assert_same(untouched, {k: initial[f"layer{i}.{k}"] for k in untouched})
        assert_same(
            model.layer2.state_dict(), {k[7:]: v for k, v in initial.items() if k.startswith("layer2.")}
        )

        if layout != "timm.pth":
            return  # the same tensors as timm.pth (checked above): one forward comparison is enough
        tokens = torch.randn(2, 65, 384)  # the class token and an 8 x 8 grid of patch tokens
        with torch.no_grad():
            h, _ = model.layer1.first_block(tokens)
            ours = model.layer1.norm(model.layer1.blocks(h))
            theirs = vit.norm(vit.blocks(tokens))
            probs = model.layer_output(x, 1).probs
        # LayerNorm eps 1e-5 here against timm's 1e-6: equal to about 1e-5
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
        assert not torch.allclose(probs, initial_probs)
    finally:
        model.load_state_dict(initial)


def test_vit_tiny_is_refused_in_one_line(timm_vit, paper, tmp_path: Path) -> None:
    import timm

    model, initial, _, _ = paper
    path = save(
        tmp_path / "vit_tiny.pth", timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    )
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(model, path, layers=(2,))
    message = str(info.value)
    assert (
        "\n" not in message
        and "width-192, depth-12 ViT does not fit the SMT layer (width 384, depth 12)" in message
    )
    assert_same(model.state_dict(), initial)
