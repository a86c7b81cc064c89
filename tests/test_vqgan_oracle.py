"""Parity of vqgan.py with taming-transformers (the reference implementation).

taming's Encoder, Decoder and quantisers are built with random weights, saved in
the layout of its public Lightning checkpoints ({"state_dict": ...} including the
training loss's discriminator/LPIPS keys, and the Lightning callback state keyed
by its class), read back with `load_vqgan`, and compared token by token and pixel
by pixel. Only the module files are imported: taming's Lightning model files pull
in pytorch_lightning, which the oracle install leaves out.
"""
import sys
import types

import pytest
import torch
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

import vqgan

# The public Gumbel f8-8192 model's ddconfig (taming configs/..._gumbel_f8.yaml), and the f16 ImageNet one.
GUMBEL_F8 = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                 ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[32], dropout=0.0)
IMAGENET_F16 = dict(GUMBEL_F8, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16])
# Small configurations with the same structure (attention at one level plus the middle), fast on a CPU.
SMALL_GUMBEL = dict(GUMBEL_F8, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[128], z_channels=64)
SMALL_VECTOR = dict(GUMBEL_F8, ch=32, ch_mult=[1, 1, 2], num_res_blocks=2, attn_resolutions=[64], z_channels=32)


class Taming(torch.nn.Module):
    """taming's VQModel / GumbelVQ autoencoder, without the Lightning parts (same attribute names)."""

    def __init__(self, ddconfig, n_embed, embed_dim, gumbel):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if gumbel:
            self.quantize = GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed, kl_weight=1e-8)
        else:
            self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, sane_index_shape=True)
        self.gumbel = gumbel

    def tokens(self, x):
        h = self.quant_conv(self.encoder(x))
        if self.gumbel:  # taming adds Gumbel noise even in eval mode; the tokenizer uses the logits' argmax
            _, _, _, logits = self.quantize(h, return_logits=True)
            return logits.argmax(1)
        return self.quantize(h)[2][2]

    def decode_tokens(self, tokens):
        b, h, w = tokens.shape
        shape = (b, h, w, self.quantize.embed.weight.shape[1] if self.gumbel else self.quantize.e_dim)
        z_q = self.quantize.get_codebook_entry(tokens.reshape(-1), shape)
        return self.decoder(self.post_quant_conv(z_q))


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including GroupNorm affines (default 1/0 would hide a swapped key)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or name.endswith(("norm_out.weight", "norm_out.bias")):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=generator))


def write_lightning_ckpt(model: Taming, path, monkeypatch) -> None:
    """Save in the layout of taming's released last.ckpt files."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["loss.logvar"] = torch.zeros(())
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.discriminator.main.0.bias"] = torch.randn(64)
    # Lightning 1.x keys the callback state by the callback's class: pickle a class of that exact name.
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": fake.__name__})
    fake.ModelCheckpoint = model_checkpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.setitem(sys.modules, name, fake if name == fake.__name__ else types.ModuleType(name))
    torch.save({"epoch": 12, "global_step": 34567, "pytorch-lightning_version": "1.0.8",
                "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                "optimizer_states": [], "lr_schedulers": [], "state_dict": state}, path)
    monkeypatch.delitem(sys.modules, fake.__name__)


def check_parity(ddconfig, n_embed, embed_dim, gumbel, size, batch, tmp_path, monkeypatch, expected=None):
    torch.manual_seed(0)
    oracle = Taming(ddconfig, n_embed, embed_dim, gumbel)
    randomise(oracle, seed=1)
    oracle.eval()
    path = tmp_path / "last.ckpt"
    write_lightning_ckpt(oracle, path, monkeypatch)
    ours = vqgan.load_vqgan(path)
    if expected is not None:
        assert ours.config == expected
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want_tokens = oracle.tokens(images)
        got_tokens = ours.encode(images)
        assert got_tokens.shape == (batch, size // ours.config.downsample_factor, size // ours.config.downsample_factor)
        assert torch.equal(got_tokens, want_tokens)
        assert len(got_tokens.unique()) > 1  # a degenerate map would make the comparison vacuous
        want = oracle.decode_tokens(want_tokens)
        got = ours.decode(got_tokens)
    assert got.shape == want.shape == images.shape
    assert (got - want).abs().max().item() < 1e-4


def test_small_gumbel_ckpt_matches_taming(tmp_path, monkeypatch):
    check_parity(SMALL_GUMBEL, n_embed=512, embed_dim=64, gumbel=True, size=64, batch=2,
                 tmp_path=tmp_path, monkeypatch=monkeypatch)


def test_small_vector_ckpt_matches_taming(tmp_path, monkeypatch):
    check_parity(SMALL_VECTOR, n_embed=256, embed_dim=16, gumbel=False, size=64, batch=2,
                 tmp_path=tmp_path, monkeypatch=monkeypatch)


@pytest.mark.slow
def test_gumbel_f8_8192_matches_taming_at_256(tmp_path, monkeypatch):
    check_parity(GUMBEL_F8, n_embed=8192, embed_dim=256, gumbel=True, size=256, batch=1,
                 tmp_path=tmp_path, monkeypatch=monkeypatch, expected=vqgan.VQGANConfig.gumbel_f8_8192())


@pytest.mark.parametrize("preset, ddconfig, n_embed, gumbel", [
    ("gumbel_f8_8192", GUMBEL_F8, 8192, True),
    ("imagenet_f16_1024", IMAGENET_F16, 1024, False),
    ("imagenet_f16_16384", IMAGENET_F16, 16384, False),
])
def test_presets_have_taming_keys_and_shapes(preset, ddconfig, n_embed, gumbel):
    """Every preset builds exactly the parameter names and shapes of the public checkpoint (on the meta device)."""
    with torch.device("meta"):
        oracle = Taming(ddconfig, n_embed, 256, gumbel)
        ours = vqgan.VQGAN(getattr(vqgan.VQGANConfig, preset)())
    want = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert vqgan.config_from_state_dict(oracle.state_dict()) == ours.config


def test_ckpt_with_foreign_global_is_refused(tmp_path):
    """Only the Lightning callback class is tolerated; any other pickled global is refused, not executed."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hook": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(vqgan.VQGANError, match="weights-only"):
        vqgan.load_vqgan(path)
