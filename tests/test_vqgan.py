"""vqgan.py: shapes of the token interface, the quantisers' closed forms, checkpoints and the command line.

Parity with taming-transformers is in test_vqgan_oracle.py; the shapes world's tokenizers
(presets, trainer, the committed checkpoints) are in test_shapes_tokenizers.py.
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import files
import vqgan


def tiny_config(**changes) -> vqgan.VQGANConfig:
    """A fast model with every structural feature: 3 levels, attention at one level, a width change."""
    base = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                             z_channels=8, embed_dim=4, n_embed=32, quantizer="vector", norm_groups=4)
    return replace(base, **changes)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return vqgan.VQGAN(tiny_config()).eval()


@pytest.fixture
def taming_model():
    """Small, but a valid taming model: 32 GroupNorm groups, attention levels named at resolution 256."""
    torch.manual_seed(0)
    config = tiny_config(resolution=256, attn_resolutions=(128,), ch=32, z_channels=32, norm_groups=32)
    return vqgan.VQGAN(config).eval()


def test_encode_decode_shapes_and_grid(tiny_model):
    images = torch.rand(3, 3, 32, 48) * 2 - 1
    tokens = tiny_model.encode(images)
    assert tokens.dtype == torch.long and tokens.shape == (3, 8, 12)
    assert tiny_model.grid_size((32, 48)) == (8, 12) and tiny_model.grid_size(64) == (16, 16)
    assert 0 <= tokens.min() and tokens.max() < tiny_model.config.n_embed
    assert tiny_model.decode(tokens).shape == (3, 3, 32, 48)
    with pytest.raises(vqgan.VQGANError, match="multiple of"):
        tiny_model.encode(torch.zeros(1, 3, 30, 32))


def test_decode_code_accepts_any_batch_shape(tiny_model):
    tokens = torch.randint(0, 32, (2, 3, 16))  # (*batch, n) flat, as the generator returns them
    images = tiny_model.decode_code(tokens)
    assert images.shape == (2, 3, 3, 16, 16)
    assert torch.allclose(images[1, 2], tiny_model.decode(tokens[1, 2].reshape(1, 4, 4))[0], atol=1e-6)
    assert tiny_model.decode_code(torch.randint(0, 32, (5, 8)), grid=(2, 4)).shape == (5, 3, 8, 16)
    with pytest.raises(vqgan.VQGANError, match="square"):
        tiny_model.decode_code(torch.randint(0, 32, (2, 12)))


def test_vector_quantizer_is_brute_force_nearest_code():
    torch.manual_seed(1)
    quantizer = vqgan.VectorQuantizer(n_embed=50, embed_dim=6, beta=0.25)
    torch.nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(2, 6, 5, 7)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 6)
    want = torch.cdist(flat.double(), quantizer.embedding.weight.double()).argmin(1).reshape(2, 5, 7)
    assert torch.equal(quantizer.codes(z), want)
    # A code's own vector maps back to that code.
    codes = quantizer.embedding.weight.detach()[[3, 17, 42]].t().reshape(1, 6, 1, 3)
    assert quantizer.codes(codes).flatten().tolist() == [3, 17, 42]


def test_vector_quantizer_loss_and_straight_through_gradient():
    torch.manual_seed(2)
    quantizer = vqgan.VectorQuantizer(n_embed=16, embed_dim=4, beta=0.25)
    torch.nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, tokens = quantizer(z)
    nearest = quantizer.lookup(tokens)
    assert torch.allclose(z_q, nearest, atol=1e-6)  # the forward value is the code
    assert torch.allclose(loss, 1.25 * ((nearest - z) ** 2).mean(), atol=1e-6)  # (1 + beta) * mse at the forward
    upstream = torch.randn_like(z_q)
    (grad,) = torch.autograd.grad((z_q * upstream).sum(), z)
    assert torch.allclose(grad, upstream)  # straight-through: the decoder's gradient reaches z unchanged
    (code_grad,) = torch.autograd.grad(loss, quantizer.embedding.weight)
    assert code_grad[~torch.isin(torch.arange(16), tokens.unique())].abs().sum() == 0  # only chosen codes move


def test_restart_dead_codes_moves_only_dead_codes_onto_encodings():
    torch.manual_seed(3)
    quantizer = vqgan.VectorQuantizer(n_embed=8, embed_dim=3, beta=0.25)
    before = quantizer.embedding.weight.detach().clone()
    z = torch.randn(2, 3, 4, 4)
    dead = torch.tensor([True, False, True, False, False, False, False, True])
    assert quantizer.restart_dead_codes(z, dead, torch.Generator().manual_seed(0)) == 3
    after = quantizer.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    encodings = z.permute(0, 2, 3, 1).reshape(-1, 3)
    for row in after[dead]:
        assert (encodings == row).all(1).any()


def test_patch_encoder_token_depends_on_its_own_patch_only():
    torch.manual_seed(5)
    model = vqgan.VQGAN(tiny_config(encoder="patch")).eval()
    f = model.config.downsample_factor
    images = torch.full((1, 3, 4 * f, 4 * f), -1.0)  # black
    changed = images.clone()
    changed[:, :, f:2 * f, 2 * f:3 * f] = torch.rand(3, f, f) * 2 - 1  # new pixels in patch (1, 2) only
    with torch.no_grad():
        before, after = model.pre_quant(images), model.pre_quant(changed)
    moved = (before - after).abs().amax(1)[0] > 0  # (4, 4) which encodings changed
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(moved, expected)
    assert model.encode(images).unique().numel() == 1  # every black patch is one token
    with pytest.raises(vqgan.VQGANError, match="encoder"):
        tiny_config(encoder="conv")


def test_gumbel_quantizer_tokens_are_deterministic_argmax():
    torch.manual_seed(4)
    quantizer = vqgan.GumbelQuantizer(in_channels=5, n_embed=20, embed_dim=3, kl_weight=1e-3)
    z = torch.randn(2, 5, 4, 4)
    tokens = quantizer.codes(z)
    assert torch.equal(tokens, quantizer.proj(z).argmax(1))
    assert torch.equal(tokens, quantizer.codes(z))
    z_q, loss, sampled = quantizer(z, temperature=0.5)  # training: hard Gumbel-softmax sample
    assert torch.allclose(z_q, quantizer.lookup(sampled), atol=1e-6)
    assert loss.item() >= -1e-6  # KL to the uniform prior is non-negative


def test_palette_head_classifies_pixels_and_stays_out_of_the_weights(tmp_path):
    palette = ((0, 0, 0), (230, 40, 40), (40, 200, 60), (50, 90, 240))
    model = vqgan.VQGAN(tiny_config(out_channels=4, palette=palette)).eval()
    pixels = np.array([[[0, 0, 0], [230, 40, 40]], [[50, 90, 240], [45, 190, 70]]], dtype=np.uint8)  # (2, 2, 3)
    classes = model.palette_classes(vqgan.to_tensor([pixels]))
    assert classes.tolist() == [[[0, 1], [3, 2]]]  # nearest palette colour, as shapes.score classifies
    logits = 50 * torch.nn.functional.one_hot(classes, 4).permute(0, 3, 1, 2).float()  # (1, 4, 2, 2), confident
    rgb = files.to_uint8(model.to_image(logits))[0]
    assert rgb[1, 1].tolist() == [40, 200, 60] and rgb[0, 1].tolist() == [230, 40, 40]
    assert "palette_rgb" not in model.state_dict()  # a constant of the config, rebuilt on load
    vqgan.save_vqgan(model, tmp_path / "p")
    assert vqgan.load_vqgan(tmp_path / "p").config.palette == palette
    with pytest.raises(vqgan.VQGANError, match="palette"):
        tiny_config(palette=palette)  # 4 colours need out_channels=4


def test_config_validation():
    with pytest.raises(vqgan.VQGANError, match="quantizer"):
        tiny_config(quantizer="kmeans")
    with pytest.raises(vqgan.VQGANError, match="norm_groups"):
        tiny_config(norm_groups=3)
    with pytest.raises(vqgan.VQGANError, match="unknown VQGAN config fields"):
        vqgan.VQGANConfig.from_dict({"ch": 8, "colour": 1})


def test_save_load_roundtrip_is_exact(tiny_model, tmp_path):
    vqgan.save_vqgan(tiny_model, tmp_path / "ckpt", {"step": 7})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["model"] == "vqgan" and meta["step"] == 7 and meta["config"]["ch_mult"] == [1, 2, 2]
    loaded = vqgan.load_vqgan(tmp_path / "ckpt")
    assert loaded.config == tiny_model.config and not loaded.training
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = tiny_model.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    with torch.no_grad():
        assert torch.equal(loaded.decode(tokens), tiny_model.decode(tokens))


def test_load_errors_are_one_line(tiny_model, tmp_path):
    with pytest.raises(vqgan.VQGANError, match="does not exist"):
        vqgan.load_vqgan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(vqgan.VQGANError, match="config.json"):
        vqgan.load_vqgan(tmp_path / "empty")
    vqgan.save_vqgan(tiny_model, tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(vqgan.VQGANError, match="damaged"):
        vqgan.load_vqgan(tmp_path / "bad")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(vqgan.VQGANError) as error:
        vqgan.load_vqgan(tmp_path / "junk.ckpt")
    assert "\n" not in str(error.value)


def taming_layout(model: vqgan.VQGAN) -> dict:
    """Our keys are taming's; add the training-loss keys a released .ckpt carries."""
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    return state


def test_taming_ckpt_drops_loss_keys_and_is_strict_otherwise(taming_model, tmp_path):
    torch.save({"state_dict": taming_layout(taming_model), "global_step": 5}, tmp_path / "ok.ckpt")
    loaded = vqgan.load_vqgan(tmp_path / "ok.ckpt")
    assert loaded.config == taming_model.config
    assert all(torch.equal(v, taming_model.state_dict()[k]) for k, v in loaded.state_dict().items())
    extra = taming_layout(taming_model)
    extra["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(vqgan.VQGANError, match="unexpected keys"):
        vqgan.load_vqgan(tmp_path / "extra.ckpt")
    missing = taming_layout(taming_model)
    del missing["decoder.mid.attn_1.q.bias"]
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(vqgan.VQGANError, match="missing"):
        vqgan.load_vqgan(tmp_path / "missing.ckpt")


def test_config_is_derived_from_shapes(taming_model):
    assert vqgan.config_from_state_dict(taming_model.state_dict()) == taming_model.config
    gumbel = vqgan.VQGAN(replace(taming_model.config, quantizer="gumbel"))
    assert vqgan.config_from_state_dict(gumbel.state_dict()) == gumbel.config


def test_cli_convert_and_reconstruct(taming_model, tmp_path, capsys):
    torch.save({"state_dict": taming_layout(taming_model)}, tmp_path / "last.ckpt")
    assert vqgan.main(["convert", str(tmp_path / "last.ckpt"), str(tmp_path / "native")]) == 0
    converted = load_file(tmp_path / "native" / "model.safetensors")
    assert converted.keys() == taming_model.state_dict().keys()

    Image.new("L", (32, 32), 200).save(tmp_path / "gray.png")  # non-RGB input is converted
    assert vqgan.main(["reconstruct", str(tmp_path / "gray.png"), "--checkpoint", str(tmp_path / "native"),
                       "--out", str(tmp_path / "out.png")]) == 0
    sheet = Image.open(tmp_path / "out.png")
    assert sheet.mode == "RGB" and sheet.size == (2 * 32 + 2, 32 + 2)
    assert np.asarray(sheet)[:32, :32].min() == 200  # left half is the original

    Image.new("RGB", (30, 30)).save(tmp_path / "odd.png")
    capsys.readouterr()
    assert vqgan.main(["reconstruct", str(tmp_path / "odd.png"), "--checkpoint", str(tmp_path / "native"),
                       "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--resize" in err and err.count("\n") == 1
    assert vqgan.main(["reconstruct", str(tmp_path / "odd.png"), "--checkpoint", str(tmp_path / "native"),
                       "--resize", "32", "--out", str(tmp_path / "x.png")]) == 0

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert vqgan.main(["reconstruct", str(tmp_path / "corrupt.png"), "--checkpoint", str(tmp_path / "native"),
                       "--out", str(tmp_path / "y.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a readable image" in err and err.count("\n") == 1
    assert vqgan.main(["reconstruct", str(tmp_path / "absent.png"), "--checkpoint", str(tmp_path / "native"),
                       "--out", str(tmp_path / "z.png")]) == 1  # read with files.open_image
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "y.png").exists() and not (tmp_path / "z.png").exists()
