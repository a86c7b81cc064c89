"""VQGAN: the image tokenizer (encoder + quantiser) and de-tokenizer (decoder).

Emage does not generate pixels; it generates the discrete codes of a separately
trained VQGAN (paper, Section 3 and Table 2, which picks the taming-transformers
Gumbel VQGAN, f=8, 8192 codes: a 256x256 image becomes 32x32 = 1024 tokens).
This file holds that architecture, written to mirror taming's module names so
the public checkpoints load with a one-to-one key mapping:

    image [B, 3, H, W] in [-1, 1]
      -> Encoder -> quant_conv -> quantiser -> tokens [B, H/f, W/f]   (VQGAN.encode)
      -> codebook lookup -> post_quant_conv -> Decoder -> image       (VQGAN.decode)

Presets, trainers and evaluations of particular tokenizers live with the data they are
made for, not here.

Command line (an existing output is never replaced without --overwrite; convert replaces
only an earlier conversion):
    python vqgan.py convert SRC OUT_DIR                 taming .ckpt -> config.json + model.safetensors
    python vqgan.py reconstruct IMAGE --checkpoint DIR --out PATH
"""
from __future__ import annotations

import argparse
import math
import pickle
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from files import (FileError, atomic_write, check_choice, check_float, check_int, check_output, is_whole, meta_device,
                   one_line, open_image, read_json, safetensors_header, shown, to_uint8, write_json)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAIN_STATE_NAME = "train_state.pt"  # optimizer and step for --resume; not part of the checkpoint proper


class VQGANError(ValueError):
    """A user error around VQGAN checkpoints, images or options."""


# Bounds of every config field, checked before anything is built: far beyond the public taming
# models (ch 128, ch_mult up to (1, 1, 2, 2, 4), 16384 codes, ~100M parameters).
MAX_SIDE = 16384  # resolution and attention sides
MAX_CHANNELS = 8192  # ch, z_channels, embed_dim, norm_groups
MAX_LEVELS = 8  # entries of ch_mult: a downsampling factor up to 128
MAX_CODES = 2**20
MAX_PARAMETERS = 2**31  # ~2.1 billion; taming's f8-8192 VQGAN has ~100M
MAX_RECONSTRUCT_PIXELS = 1024 * 1024  # `reconstruct` encodes at most 1024 x 1024 pixels (after --resize)
MAX_SHEET_PIXELS = 64 * 1024 * 1024  # and writes a sheet of at most 64 MP


@dataclass
class VQGANConfig:
    resolution: int = 256  # image side the model is built for; attention levels are named by their side at this size (taming's `resolution`)
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out (taming's `out_ch`)
    ch: int = 128  # channels of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)  # one entry per level; downsampling factor f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2  # ResNet blocks per encoder level; the decoder has one more per level, as in taming
    attn_resolutions: tuple[int, ...] = (32,)  # feature-map sides (at `resolution`) whose levels get self-attention
    z_channels: int = 256  # channels of the encoder output and of the decoder input
    embed_dim: int = 256  # dimension of a codebook vector (quant_conv maps z_channels -> embed_dim)
    n_embed: int = 8192  # codebook size: the number of distinct image tokens
    quantizer: str = "gumbel"  # "gumbel" (logits over codes, argmax at inference), "vector" (nearest code) or "pattern" (see PatternQuantizer)
    encoder: str = "taming"  # "taming" (convolutional, tokens see their neighbours) or "patch" (see PatchEncoder)
    norm_groups: int = 32  # GroupNorm groups (taming: always 32)
    beta: float = 0.25  # vector quantiser, training only: weight of the commitment term ||z - sg[e]||^2
    kl_weight: float = 1e-8  # Gumbel quantiser, training only: weight of the KL to the uniform prior (taming's f8 config)
    palette: tuple[tuple[int, int, int], ...] = ()  # non-empty: the decoder classifies each pixel over these RGB colours (see `to_image`)

    def __post_init__(self):
        E = VQGANError
        check_int("resolution", self.resolution, 1, MAX_SIDE, E)
        check_int("in_channels", self.in_channels, 1, 64, E)
        check_int("out_channels", self.out_channels, 1, 1024, E)
        check_int("ch", self.ch, 1, MAX_CHANNELS, E)
        if not isinstance(self.ch_mult, (list, tuple)) or not 1 <= len(self.ch_mult) <= MAX_LEVELS:
            raise E(f"ch_mult must be a list of 1 to {MAX_LEVELS} whole numbers, got {shown(self.ch_mult)}")
        for mult in self.ch_mult:
            check_int("each ch_mult entry", mult, 1, 64, E)
        check_int("num_res_blocks", self.num_res_blocks, 0, 64, E)
        if not isinstance(self.attn_resolutions, (list, tuple)) or len(self.attn_resolutions) > 16:
            raise E(f"attn_resolutions must be a list of at most 16 sides, got {shown(self.attn_resolutions)}")
        for side in self.attn_resolutions:
            check_int("each attn_resolutions entry", side, 1, MAX_SIDE, E)
        check_int("z_channels", self.z_channels, 1, MAX_CHANNELS, E)
        check_int("embed_dim", self.embed_dim, 1, MAX_CHANNELS, E)
        check_int("n_embed", self.n_embed, 1, MAX_CODES, E)
        check_choice("quantizer", self.quantizer, ("gumbel", "vector", "pattern"), E)
        check_choice("encoder", self.encoder, ("taming", "patch"), E)
        check_int("norm_groups", self.norm_groups, 1, MAX_CHANNELS, E)
        check_float("beta", self.beta, 0.0, 1e6, E)
        check_float("kl_weight", self.kl_weight, 0.0, 1e6, E)
        if not isinstance(self.palette, (list, tuple)) or len(self.palette) > 1024 or not all(
                isinstance(rgb, (list, tuple)) and len(rgb) == 3 and all(is_whole(v) and 0 <= v <= 255 for v in rgb)
                for rgb in self.palette):
            raise E(f"palette must be a list of at most 1024 [r, g, b] colours (0-255), got {shown(self.palette)}")
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.palette = tuple(tuple(int(v) for v in rgb) for rgb in self.palette)
        if self.palette and self.out_channels != len(self.palette):
            raise VQGANError(f"a palette of {len(self.palette)} colours needs out_channels={len(self.palette)}, got {self.out_channels}")
        if self.quantizer == "pattern" and (not self.palette or self.n_embed % len(self.palette)):
            raise VQGANError(f"the pattern quantizer needs a palette whose size divides n_embed={self.n_embed}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult] + [self.z_channels]
        if any(w % self.norm_groups for w in widths):
            raise VQGANError(f"every channel count {sorted(set(widths))} must be divisible by norm_groups={self.norm_groups}")
        count = self.parameter_count()
        if count > MAX_PARAMETERS:
            raise VQGANError(f"this config describes a VQGAN of {count:,} parameters, over the limit of {MAX_PARAMETERS:,}; "
                             "check ch, ch_mult, z_channels and n_embed")

    def parameter_count(self) -> int:
        """Parameters and buffers of VQGAN(self), counted without building it."""
        f, g = self.downsample_factor, 2  # every norm: weight and bias
        if self.quantizer == "pattern":
            return self.n_embed // len(self.palette) * f * f
        def resnet(i, o):
            return g * i + 9 * i * o + o + g * o + 9 * o * o + o + (i * o + o if i != o else 0)
        def attn(c):
            return g * c + 4 * (c * c + c)
        def level(i, o, blocks, attention):
            return resnet(i, o) + (blocks - 1) * resnet(o, o) + (blocks * attn(o) if attention else 0) if blocks else 0
        widths = [self.ch * m for m in self.ch_mult]
        deepest = widths[-1]
        middle = 2 * resnet(deepest, deepest) + attn(deepest)
        sides = [self.resolution // 2**i for i in range(len(widths))]
        if self.encoder == "patch":
            w = 4 * self.z_channels
            encoder = self.in_channels * w * f * f + w + (self.num_res_blocks + 1) * 2 * (w * w + w) + w * self.z_channels + self.z_channels
        else:
            encoder, width = 9 * self.in_channels * self.ch + self.ch, self.ch
            for i, (out, side) in enumerate(zip(widths, sides)):
                encoder += level(width, out, self.num_res_blocks, side in self.attn_resolutions)
                encoder += 9 * out * out + out if i != len(widths) - 1 else 0
                width = out
            encoder += middle + g * deepest + 9 * deepest * self.z_channels + self.z_channels
        decoder, width = 9 * self.z_channels * deepest + deepest + middle, deepest
        for i in reversed(range(len(widths))):
            decoder += level(width, widths[i], self.num_res_blocks + 1, sides[i] in self.attn_resolutions)
            decoder += 9 * widths[i] * widths[i] + widths[i] if i != 0 else 0
            width = widths[i]
        decoder += g * width + 9 * width * self.out_channels + self.out_channels
        convs = 2 * self.z_channels * self.embed_dim + self.embed_dim + self.z_channels
        if self.quantizer == "vector":
            codebook = self.n_embed * self.embed_dim
        else:
            codebook = self.embed_dim * self.n_embed + self.n_embed + self.n_embed * self.embed_dim
        return encoder + decoder + convs + codebook

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def gumbel_f8_8192(cls) -> "VQGANConfig":
        """taming's Gumbel VQGAN trained on OpenImages: the paper's tokenizer (256x256 -> 32x32 tokens)."""
        return cls(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), n_embed=8192, quantizer="gumbel")

    @classmethod
    def imagenet_f16_1024(cls) -> "VQGANConfig":
        """taming's ImageNet VQGAN, f=16, 1024 codes (256x256 -> 16x16 tokens)."""
        return cls(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), n_embed=1024, quantizer="vector")

    @classmethod
    def imagenet_f16_16384(cls) -> "VQGANConfig":
        """taming's ImageNet VQGAN, f=16, 16384 codes (256x256 -> 16x16 tokens)."""
        return cls(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), n_embed=16384, quantizer="vector")

    @property
    def patterns(self) -> int:
        """Patterns per colour of the pattern quantizer (n_embed = palette size * patterns)."""
        return self.n_embed // len(self.palette)

    @classmethod
    def from_dict(cls, data: dict) -> "VQGANConfig":
        """The config of a config.json, every field checked (__post_init__) before anything is built."""
        if not isinstance(data, dict):
            raise VQGANError(f"the VQGAN config must be an object of fields, got {shown(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VQGANError(f"unknown VQGAN config fields {shown(unknown, 80)}: was the checkpoint written by a newer version?")
        return cls(**data)


# ---------------------------------------------------------------------------
# Building blocks (names mirror taming.modules.diffusionmodules.model, so the
# state-dict keys of the public checkpoints map one-to-one onto ours)
# ---------------------------------------------------------------------------

def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))  # taming has dropout here; every public model uses 0.0
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map, 1x1 convs as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        q = self.q(h).reshape(b, c, height * width).permute(0, 2, 1)  # (B, hw, C)
        k = self.k(h).reshape(b, c, height * width)  # (B, C, hw)
        v = self.v(h).reshape(b, c, height * width)  # (B, C, hw)
        # Same op order as taming (bmm, then scale, then softmax), so token maps match it exactly.
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)  # (B, hw_query, hw_key)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)  # (B, C, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero column/row on the right/bottom only (taming's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResNet blocks, optional attention after each, a resampler."""

    def __init__(self, channels_in: int, channels_out: int, blocks: int, attention: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(channels_in if i == 0 else channels_out, channels_out, groups) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(channels_out, groups) for _ in range(blocks if attention else 0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, side = c.ch, c.resolution
        for i, mult in enumerate(c.ch_mult):
            level = Level(width, c.ch * mult, c.num_res_blocks, side in c.attn_resolutions, groups)
            width = c.ch * mult
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(width)
                side //= 2
            self.down.append(level)
        self.mid = Middle(width, groups)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class PatchEncoder(nn.Module):
    """An encoder whose token for a patch depends on that f x f patch of pixels and nothing else.

    Not in taming. taming's encoder gives every token a receptive
    field that spans its neighbours, so a black patch next to an object encodes that object's
    edge. Our first shapes tokenizer spent about 740 of its 1,024 codes on such black patches
    (token entropy 6.3 nats), and a generator must then guess among interchangeable background
    tokens: its loss stalled near 4.2 and its accuracy stayed near 0. Here every black patch is
    the same token, and the decoder (still convolutional, so it sees neighbours) draws edges.
    It is a per-patch MLP: a stride-f convolution, then 1x1 residual blocks.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        f, width = config.downsample_factor, 4 * config.z_channels
        self.conv_in = nn.Conv2d(config.in_channels, width, f, stride=f)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 1), nn.SiLU(), nn.Conv2d(width, width, 1))
                                    for _ in range(config.num_res_blocks + 1))
        self.conv_out = nn.Conv2d(width, config.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, 4 z_channels, H/f, W/f)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(swish(h))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        width = c.ch * c.ch_mult[-1]
        side = c.resolution // c.downsample_factor
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = Middle(width, groups)
        # self.up[i] is the level at the resolution of self.down[i]; it runs deepest first (taming's order).
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            level = Level(width, c.ch * c.ch_mult[i], c.num_res_blocks + 1, side in c.attn_resolutions, groups)
            width = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(width)
                side *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, groups)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_channels, H, W)


# ---------------------------------------------------------------------------
# Quantisers
# ---------------------------------------------------------------------------

class VectorQuantizer(nn.Module):
    """Nearest-code quantiser (VQ-VAE) with a straight-through gradient (taming's VectorQuantizer2)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for every position: z (B, D, h, w) -> (B, h, w)."""
        b, d, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        codebook = self.embedding.weight  # (n_embed, D)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, summed in taming's order so ties break the same way.
        distance = (flat ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * flat @ codebook.t()  # (B*h*w, n_embed)
        return distance.argmin(1).reshape(b, height, width)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codebook vectors of tokens (B, h, w) -> (B, D, h, w)."""
        return self.embedding(tokens).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor):
        """Training: (straight-through z_q, codebook + commitment loss, tokens)."""
        tokens = self.codes(z)
        z_q = self.lookup(tokens)
        # Patch: taming's default (legacy=True) puts beta on the codebook term by mistake; we use
        # the VQ-VAE paper's form: move codes to encodings, and commit encodings by beta.
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient flows into the encoder
        return z_q, loss, tokens

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, dead: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move every code marked in `dead` (n_embed,) onto a random encoding from z (B, D, h, w); returns how many."""
        index = dead.nonzero().flatten()
        if index.numel() == 0:
            return 0
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
        pick = torch.randint(0, flat.shape[0], (index.numel(),), generator=generator, device=flat.device)
        self.embedding.weight[index] = flat[pick].to(self.embedding.weight.dtype)
        return int(index.numel())


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantiser (taming's GumbelQuantize): a 1x1 conv gives logits over codes."""

    def __init__(self, in_channels: int, n_embed: int, embed_dim: int, kl_weight: float):
        super().__init__()
        self.n_embed = n_embed
        self.kl_weight = kl_weight
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        # Patch: taming samples Gumbel noise even in eval mode, so its tokens are random; a tokenizer
        # must be deterministic, so we take the argmax of the logits (as every downstream user does).
        return self.proj(z).argmax(1)  # (B, h, w)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens).permute(0, 3, 1, 2)  # (B, D, h, w)

    def forward(self, z: torch.Tensor, temperature: float = 1.0):
        """Training: (hard Gumbel-softmax mixture of codes, KL-to-uniform loss, tokens)."""
        logits = self.proj(z)  # (B, n_embed, h, w)
        one_hot = F.gumbel_softmax(logits, tau=temperature, dim=1, hard=True)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
        probs = logits.softmax(1)
        loss = self.kl_weight * (probs * torch.log(probs * self.n_embed + 1e-10)).sum(1).mean()
        return z_q, loss, one_hot.argmax(1)


class PatternQuantizer(nn.Module):
    """Colour-factored codes for palette images: token = colour * patterns + pattern.

    Not in taming. A learned codebook mixes colour and shape in
    every code, so the tokens of a purple triangle are codes no training image (which never
    holds one, SHAPES.md) ever produced: measured with the 1,024-code tokenizer, each of the
    160 novel evaluation images needs at least one code absent from 30,000 training images,
    and a generator cannot learn to emit a code it never saw. Here a token is two factors:
    the patch's colour (the most frequent non-background palette class, 0 for an empty
    patch) and its pattern, the nearest of `patterns` learned foreground masks (a k-means
    codebook over f x f binary masks, fitted by k-means outside this file; entry 0 is the
    empty mask). Every colour combines with every pattern, so a purple triangle is made of
    a colour seen on circles and patterns seen in other colours.
    """

    def __init__(self, colours: int, patterns: int, patch: int):
        super().__init__()
        self.colours, self.patterns, self.patch = colours, patterns, patch
        self.register_buffer("masks", torch.zeros(patterns, patch * patch))  # (P, f*f) in [0, 1]; row 0 empty

    def cells(self, classes: torch.Tensor) -> torch.Tensor:
        """Palette classes (B, H, W) -> per-patch pixels (B, H/f, W/f, f*f)."""
        B, H, W, f = *classes.shape, self.patch
        return classes.reshape(B, H // f, f, W // f, f).permute(0, 1, 3, 2, 4).reshape(B, H // f, W // f, f * f)

    def codes(self, classes: torch.Tensor) -> torch.Tensor:
        """Palette classes (B, H, W) -> tokens (B, H/f, W/f)."""
        cells = self.cells(classes)  # (B, h, w, f*f)
        counts = F.one_hot(cells, self.colours).sum(-2)  # (B, h, w, colours)
        colour = counts[..., 1:].argmax(-1) + 1  # the most frequent non-background colour
        colour = torch.where(counts[..., 1:].sum(-1) > 0, colour, torch.zeros_like(colour))  # (B, h, w)
        foreground = (cells > 0).to(self.masks.dtype)  # (B, h, w, f*f)
        distance = self.masks.square().sum(-1) - 2 * foreground @ self.masks.t()  # ||x - m||^2 - ||x||^2, (B, h, w, P)
        pattern = torch.where(colour > 0, distance.argmin(-1), torch.zeros_like(colour))
        return colour * self.patterns + pattern

    def classes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> palette classes (B, h*f, w*f): the pattern's mask painted in the colour."""
        B, h, w, f = *tokens.shape, self.patch
        colour, pattern = tokens // self.patterns, tokens % self.patterns  # (B, h, w) each
        inside = self.masks[pattern] > 0.5  # (B, h, w, f*f)
        cells = torch.where(inside, colour[..., None], torch.zeros_like(colour)[..., None])
        return cells.reshape(B, h, w, f, f).permute(0, 1, 3, 2, 4).reshape(B, h * f, w * f)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        if config.palette:  # a constant of the config, not a weight: kept out of the state dict
            # (K, 3) in [-1, 1], computed on the CPU also inside files.meta_device (a division of meta
            # tensors costs torch ~1.5 s of imports on first use)
            colours = torch.tensor(config.palette, dtype=torch.float32, device="cpu") / 127.5 - 1.0
            self.register_buffer("palette_rgb", colours, persistent=False)
        if config.quantizer == "pattern":  # no networks: palette classes in, palette classes out
            self.quantize = PatternQuantizer(len(config.palette), config.patterns, config.downsample_factor)
            return
        self.encoder = PatchEncoder(config) if config.encoder == "patch" else Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if config.quantizer == "vector":
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta)
        else:
            self.quantize = GumbelQuantizer(config.embed_dim, config.n_embed, config.embed_dim, config.kl_weight)

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [-1, 1].

        Without a palette the decoder predicts RGB directly (taming). With one, as in the
        shapes world whose images use a handful of exact colours, it predicts a class per
        pixel and the image is the softmax-weighted palette: trained with cross-entropy,
        edges come out sharp within a few thousand CPU steps, where an L1/L2 loss on RGB
        was still blurring them.
        """
        if not self.config.palette:
            return out
        return torch.einsum("bkhw,kc->bchw", out.softmax(1), self.palette_rgb)  # (B, 3, H, W)

    def palette_classes(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> index of the nearest palette colour per pixel (B, H, W)."""
        distance = (images[:, None] - self.palette_rgb[None, :, :, None, None]).square().sum(2)  # (B, K, H, W)
        return distance.argmin(1)

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) for an image side or (H, W); both must be multiples of the downsampling factor."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.config.downsample_factor
        if height % f or width % f:
            raise VQGANError(f"image size {height}x{width} is not a multiple of the downsampling factor {f}")
        return height // f, width // f

    def pre_quant(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> encodings (B, embed_dim, H/f, W/f) before quantisation."""
        self.grid_size(tuple(images.shape[-2:]))
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens LongTensor (B, H/f, W/f)."""
        if self.config.quantizer == "pattern":
            self.grid_size(tuple(images.shape[-2:]))
            return self.quantize.codes(self.palette_classes(images))
        return self.quantize.codes(self.pre_quant(images))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        if tokens.dim() != 3:
            raise VQGANError(f"decode expects tokens of shape (B, h, w), got {tuple(tokens.shape)}")
        if self.config.quantizer == "pattern":
            return self.palette_rgb[self.quantize.classes(tokens.long())].permute(0, 3, 1, 2)  # (B, 3, H, W)
        return self.to_image(self.decoder(self.post_quant_conv(self.quantize.lookup(tokens.long()))))

    def decode_code(self, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Flat tokens with any batch shape, (*batch, n) -> images (*batch, 3, H, W); grid (h, w), default square."""
        n = tokens.shape[-1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise VQGANError(f"{n} tokens do not form a square grid: pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != n:
            raise VQGANError(f"grid {grid[0]}x{grid[1]} does not hold {n} tokens")
        batch = tokens.shape[:-1]
        images = self.decode(tokens.reshape(-1, *grid))  # (prod(batch), 3, H, W)
        return images.reshape(*batch, *images.shape[1:])

    def forward(self, images: torch.Tensor):
        """Training: (decoder output (B, out_channels, H, W), quantiser loss, tokens (B, h, w))."""
        z_q, quant_loss, tokens = self.quantize(self.pre_quant(images))
        return self.decoder(self.post_quant_conv(z_q)), quant_loss, tokens


# ---------------------------------------------------------------------------
# Checkpoints: native (config.json + model.safetensors) and taming's .ckpt
# ---------------------------------------------------------------------------

TAMING_KEPT = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
TAMING_DROPPED = ("loss.",)  # discriminator, perceptual (LPIPS) network and logvar of the training loss


class _LightningPlaceholder:
    """Stands in for classes pickled into Lightning checkpoints next to the weights; never instantiated."""


# Non-tensor globals found in taming's Lightning checkpoints: PyTorch Lightning 1.x stores the callback
# state under its class as the dict key. We let the unpickler resolve that name to an inert placeholder
# instead of importing Lightning, and allow nothing else.
_CKPT_GLOBALS = [(_LightningPlaceholder, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def read_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a taming .ckpt (or a bare state-dict .pt), read with torch.load(weights_only=True)."""
    try:
        with torch.serialization.safe_globals(_CKPT_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unpickling failed"
        raise VQGANError(f"{path} cannot be read safely as a weights-only checkpoint ({first})") from None
    except FileNotFoundError:
        raise VQGANError(f"{path} does not exist") from None
    except Exception as error:  # a truncated or foreign file fails in many ways inside the unpickler
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VQGANError(f"{path} is not a readable PyTorch checkpoint ({detail})") from None
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VQGANError(f"{path} holds no state dict of tensors (expected taming's {{'state_dict': ...}})")
    return state


def config_from_state_dict(state: dict[str, torch.Tensor], resolution: int = 256) -> VQGANConfig:
    """Rebuild the configuration from tensor shapes (all public taming VQGANs were trained at 256x256)."""
    def shape(key):
        if key not in state:
            raise VQGANError(f"the checkpoint lacks {key!r}: it is not a taming VQGAN")
        return tuple(state[key].shape)

    try:
        ch, in_channels = shape("encoder.conv_in.weight")[:2]
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
        if not 1 <= levels <= MAX_LEVELS:
            raise VQGANError(f"the checkpoint has {levels} encoder levels; a taming VQGAN has 1 to {MAX_LEVELS}")
        num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
        ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
        attn = tuple(resolution // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
        gumbel = "quantize.proj.weight" in state
        n_embed, embed_dim = shape("quantize.embed.weight" if gumbel else "quantize.embedding.weight")
        return VQGANConfig(
            resolution=resolution, in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0],
            ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn,
            z_channels=shape("decoder.conv_in.weight")[1], embed_dim=embed_dim, n_embed=n_embed,
            quantizer="gumbel" if gumbel else "vector")
    except (ValueError, IndexError, ZeroDivisionError) as error:  # VQGANError is a ValueError: keep its words
        if isinstance(error, VQGANError):
            raise
        raise VQGANError(f"the checkpoint's tensors do not describe a taming VQGAN ({one_line(error)})") from None


def taming_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the autoencoder's keys (names are identical to ours), drop the training loss's, refuse the rest."""
    kept, unknown = {}, []
    for key, value in state.items():
        if key.startswith(TAMING_KEPT):
            kept[key] = value
        elif not key.startswith(TAMING_DROPPED):
            unknown.append(key)
    if unknown:
        raise VQGANError(f"unexpected keys in the taming checkpoint: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return kept


def load_state_strict(model: VQGAN, state: dict[str, torch.Tensor], source: str) -> None:
    """Check every key and shape with a readable message, then load with strict=True."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VQGANError(f"{source} does not fit the configured VQGAN: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise VQGANError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def save_vqgan(model: VQGAN, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write config.json (the VQGANConfig plus `extra`) and model.safetensors into out_dir, atomically."""
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(out_dir / CONFIG_NAME, {"model": "vqgan", "config": asdict(model.config), **(extra or {})})


def load_vqgan(path: str | Path) -> VQGAN:
    """A VQGAN in eval mode from a native checkpoint directory, a taming .ckpt, or a taming-layout .safetensors.

    A native directory is checked before anything is allocated: config.json is read bounded
    and every field checked (VQGANConfig), the model is built on the meta device and its
    tensor names and shapes compared with the safetensors header; only then are weights read.
    """
    path = Path(path)
    if path.is_dir():
        config, source = check_folder(path), str(path)
        try:
            state = load_file(path / WEIGHTS_NAME)
        except (SafetensorError, OSError) as error:
            raise VQGANError(f"{path} is a damaged checkpoint: {one_line(error)}") from None
    elif path.is_file():
        if path.suffix == ".safetensors":
            try:
                state = load_file(path)
            except SafetensorError as error:
                raise VQGANError(f"{path} is not a readable safetensors file: {error}") from None
        else:
            state = read_torch_checkpoint(path)
        state = taming_to_native(state)
        config, source = config_from_state_dict(state), str(path)
    else:
        raise VQGANError(f"{path} does not exist: pass a checkpoint directory or a taming .ckpt file")
    model = VQGAN(config)
    load_state_strict(model, state, source)
    return model.eval()


def check_folder(path: str | Path) -> VQGANConfig:
    """The config of a native VQGAN folder, checked without reading a weight: config.json read
    bounded with every field checked (VQGANConfig), then a meta-device model's tensor names and
    shapes compared with the safetensors header."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise VQGANError(f"{path} is not a VQGAN checkpoint: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        meta = read_json(path / CONFIG_NAME)
    except FileError as error:
        raise VQGANError(f"{path} is a damaged checkpoint: {error}") from None
    if not isinstance(meta, dict) or meta.get("model") != "vqgan" or "config" not in meta:
        model_name = meta.get("model") if isinstance(meta, dict) else meta
        raise VQGANError(f"{path / CONFIG_NAME} does not describe a VQGAN (model={shown(model_name)})")
    try:
        config = VQGANConfig.from_dict(meta["config"])
    except VQGANError as error:
        raise VQGANError(f"{path / CONFIG_NAME}: {error}") from None
    with meta_device():  # shapes only: nothing allocated
        expected = VQGAN(config).state_dict()
    try:
        stored = safetensors_header(path / WEIGHTS_NAME)
    except FileError as error:
        raise VQGANError(f"{path} is a damaged checkpoint: {error}") from None
    check_shapes(stored, expected, str(path))
    return config


def check_shapes(stored: dict, expected: dict, source: str) -> None:
    """safetensors_header's {name: (dtype, shape)} against a (meta) model's state dict."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise VQGANError(f"{source} does not fit the configured VQGAN: missing {missing[:3]}, "
                         f"unexpected {shown(unexpected[:3], 120)}")
    for key, tensor in expected.items():
        if stored[key][1] != tuple(tensor.shape):
            raise VQGANError(f"{source}: {key} has shape {stored[key][1]}, the model expects {tuple(tensor.shape)}")
        if not stored[key][0].startswith(("F", "BF")):
            raise VQGANError(f"{source}: {key} holds {stored[key][0]}, not floating-point weights")


# ---------------------------------------------------------------------------
# Images <-> tensors
# ---------------------------------------------------------------------------

def to_tensor(images) -> torch.Tensor:
    """PIL images or uint8 arrays (H, W, 3) -> float tensor (B, 3, H, W) in [-1, 1]."""
    arrays = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def side_by_side(originals: np.ndarray, reconstructions: np.ndarray, scale: int = 1, columns: int = 8) -> Image.Image:
    """A sheet of (original | reconstruction) pairs, `columns` pairs per row."""
    b, h, w, _ = originals.shape
    rows = math.ceil(b / columns)
    pad = 2
    sheet = Image.new("RGB", (columns * (2 * w + pad) * scale, rows * (h + pad) * scale), (128, 128, 128))
    for i in range(b):
        x, y = (i % columns) * (2 * w + pad), (i // columns) * (h + pad)
        pair = np.concatenate([originals[i], reconstructions[i]], axis=1)  # (h, 2w, 3)
        tile = Image.fromarray(pair).resize((2 * w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (x * scale, y * scale))
    return sheet


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def is_vqgan_folder(path: Path) -> bool:
    """Whether `path` holds a native VQGAN checkpoint (what `convert` may replace with --overwrite)."""
    try:
        meta = read_json(path / CONFIG_NAME)
    except FileError:
        return False
    names = {p.name for p in path.iterdir()}
    return isinstance(meta, dict) and meta.get("model") == "vqgan" and names <= {CONFIG_NAME, WEIGHTS_NAME}


def torch_device(name: str) -> torch.device:
    """--device checked: a name torch knows, and a GPU that is there."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise VQGANError(f"unknown device {shown(name)}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VQGANError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise VQGANError(f"unknown device {shown(name)}: use cpu, cuda or cuda:N")
    return device


def cmd_convert(args) -> None:
    check_output(args.out_dir, args.overwrite, "folder", "OUT_DIR", ours=is_vqgan_folder)  # before any reading
    model = load_vqgan(args.src)
    save_vqgan(model, args.out_dir, {"converted_from": Path(args.src).name})
    c = model.config
    print(f"wrote {args.out_dir}: {c.quantizer} VQGAN, f={c.downsample_factor}, {c.n_embed} codes")


def cmd_reconstruct(args) -> None:
    if args.resize is not None:
        check_int("--resize", args.resize, 1, math.isqrt(MAX_RECONSTRUCT_PIXELS), VQGANError)
    check_int("--scale", args.scale, 1, 16, VQGANError)
    check_output(args.out, args.overwrite, "file")
    device = torch_device(args.device)
    model = load_vqgan(args.checkpoint).to(device)
    image = open_image(args.image)
    if args.resize:
        image = image.resize((args.resize, args.resize), Image.BICUBIC)
    if image.width * image.height > MAX_RECONSTRUCT_PIXELS:
        raise VQGANError(f"{args.image} is {image.width}x{image.height}; reconstruct encodes at most "
                         f"{MAX_RECONSTRUCT_PIXELS:,} pixels: pass --resize {model.config.resolution}")
    f = model.config.downsample_factor
    if image.width % f or image.height % f:
        raise VQGANError(f"{args.image} is {image.width}x{image.height}, not a multiple of {f}: "
                         f"pass --resize {model.config.resolution}")
    sheet_pixels = (2 * image.width + 2) * (image.height + 2) * args.scale**2
    if sheet_pixels > MAX_SHEET_PIXELS:
        raise VQGANError(f"the sheet would have {sheet_pixels:,} pixels, over the limit of {MAX_SHEET_PIXELS:,}; "
                         "pass a smaller --scale or --resize")
    batch = to_tensor([image]).to(device)  # (1, 3, H, W)
    with torch.no_grad():
        tokens = model.encode(batch)
        reconstruction = to_uint8(model.decode(tokens))
    sheet = side_by_side(to_uint8(batch), reconstruction, scale=args.scale, columns=1)
    out = atomic_write(args.out, lambda tmp: sheet.save(tmp, format="PNG"))
    print(f"wrote {out}: original | reconstruction from {tokens.shape[1]}x{tokens.shape[2]} tokens")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter

    convert = sub.add_parser("convert", help="convert a taming .ckpt to the native format", formatter_class=formatter)
    convert.add_argument("src", help="taming Lightning .ckpt (or a taming-layout .safetensors)")
    convert.add_argument("out_dir", help="output directory for config.json + model.safetensors (new or empty)")
    convert.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR")
    convert.set_defaults(run=cmd_convert)

    rec = sub.add_parser("reconstruct", help="write original | reconstruction side by side", formatter_class=formatter)
    rec.add_argument("image", help="input image (any mode; converted to RGB)")
    rec.add_argument("--checkpoint", default="checkpoints/shapes/vqgan", help="VQGAN directory or taming .ckpt")
    rec.add_argument("--out", default="reconstruction.png", help="PNG to write (never replaced without --overwrite)")
    rec.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    rec.add_argument("--resize", type=int, default=None,
                     help=f"resize the image to this square side first (at most {math.isqrt(MAX_RECONSTRUCT_PIXELS)})")
    rec.add_argument("--scale", type=int, default=1, help="pixel upscaling of the written sheet (1-16)")
    rec.add_argument("--device", default="cpu", help="torch device")
    rec.set_defaults(run=cmd_reconstruct)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (VQGANError, FileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
