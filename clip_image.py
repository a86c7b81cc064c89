"""CLIP's image side, from scratch: the vision Transformer, a whole CLIP, and the re-ranker.

The paper draws 16 candidates per caption and keeps the one CLIP scores highest
(Section 4, the zero-shot COCO protocol). This file rebuilds CLIP's vision tower so
that public checkpoints load into it exactly, pairs it with the text tower of
`clip_text.py`, and turns the pair into that re-ranker:

    VisionEncoder(VisionConfig)    images[B, 3, S, S] (normalised) -> (states[B, 1 + g*g, width], pooled[B, embed_dim])
    CLIP(TextConfig, VisionConfig)   both towers and the contrastive temperature
    load_clip_image(path)          the vision tower of an OpenAI, Hugging Face or native checkpoint
    load_clip(path) -> (CLIP, Tokenizer),  save_clip(model, dir, tokenizer_path)
    load_reranker(path, device)    (candidates uint8 [C, H, W, 3], caption) -> cosine similarities [C]
    train_shapes(out, ...)         a small CLIP for the shapes world, trained contrastively here

Command line:
    python clip_image.py convert SRC OUT_DIR                    a full CLIP checkpoint -> native dir
    python clip_image.py score --clip DIR IMG... --caption TEXT  cosine similarity of images to a caption
    python clip_image.py train-shapes --out runs/shapes-clip     (the shipped one: checkpoints/shapes/clip)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_text
import shapes
from clip_text import LayerNorm, TextConfig, TextEncoder, Transformer
from files import (MAX_IMAGE_PIXELS, FileError, atomic_write, check_float, check_int, check_output, meta_device, one_line,
                   open_image, read_json, shown, write_json)
from shapes_tokenizers import SHAPES_BPE_PATH, SHAPES_VOCAB_SIZE, TokenizerError

ROOT = Path(__file__).resolve().parent
SHAPES_CLIP = ROOT / "checkpoints" / "shapes" / "clip"
VISION_FORMAT = "emage.clip_image"  # "format" of a native vision-tower config.json
CLIP_FORMAT = "emage.clip"  # "format" of a native whole-CLIP config.json (both towers + vocabulary)
# OpenAI's preprocessing (clip.py `_transform`): these per-channel statistics of its training images.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
HF_VISION_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")  # children of `vision_model`


class ClipImageError(clip_text.ClipTextError):
    """A user error in this module: an unreadable checkpoint, a wrong image size, ..."""


# ----------------------------------------------------------------------------------------
# The vision Transformer
# ----------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    image_size: int = 224  # input side S; the positional embedding has (S / patch)^2 + 1 rows
    patch_size: int = 32  # side of the square patches, the stride of the patch convolution
    width: int = 768  # model dimension D of every residual block
    heads: int = 12  # attention heads; width must be divisible by heads
    layers: int = 12  # residual blocks
    embed_dim: int = 512  # size P of the pooled output after the projection (shared with the text tower)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @classmethod
    def vit_b32(cls) -> "VisionConfig":
        """The image tower of OpenAI CLIP ViT-B/32."""
        return cls(image_size=224, patch_size=32, width=768, heads=12, layers=12, embed_dim=512)

    @classmethod
    def vit_l14(cls) -> "VisionConfig":
        """The image tower of OpenAI CLIP ViT-L/14, the model the paper re-ranks with."""
        return cls(image_size=224, patch_size=14, width=1024, heads=16, layers=24, embed_dim=768)

    @classmethod
    def shapes(cls) -> "VisionConfig":
        """A tiny tower for the 64x64 shapes world: 4 x 4 patches of 16 px, width 32, 2 layers, so
        that it trains in minutes on one shared CPU thread (8 px patches cost 4x more per step)."""
        return cls(image_size=64, patch_size=16, width=32, heads=2, layers=2, embed_dim=32)


def check_vision_config(config: VisionConfig) -> VisionConfig:
    """Every field's type and range before anything is built (OpenAI's largest tower: ViT-L/14 at
    336 px, 24 layers of width 1024), and the patches fitting the image."""
    E = ClipImageError
    check_int("vision image_size", config.image_size, 1, 4096, E)
    check_int("vision patch_size", config.patch_size, 1, config.image_size, E)
    check_int("vision width", config.width, 1, 65536, E)
    check_int("vision heads", config.heads, 1, config.width, E)
    if config.width % config.heads:
        raise E(f"vision width {config.width} is not divisible by vision heads {config.heads}")
    check_int("vision layers", config.layers, 1, 256, E)
    check_int("vision embed_dim", config.embed_dim, 1, 65536, E)
    count = config.layers * 12 * config.width**2 + (config.grid**2 + 1) * config.width \
        + 3 * config.patch_size**2 * config.width + config.width * config.embed_dim
    if count > 2**32:
        raise E(f"this vision config describes {count:,} parameters, over the limit of {2**32:,}")
    return config


def config_of(fields_: dict, cls, what: str):
    """VisionConfig / TextConfig from a config.json object, every field checked before use."""
    import emage

    if not isinstance(fields_, dict):
        raise ClipImageError(f"{what} must be an object of fields, got {shown(fields_)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise ClipImageError(f"{what} names unknown fields {shown(unknown, 80)}; was it written by save_clip?")
    config = cls(**fields_)
    if cls is VisionConfig:
        return check_vision_config(config)
    try:  # the text tower's fields: emage's checks of a text config (types, ranges, heads dividing width)
        emage._check_config(emage.EmageConfig(text=config))
    except emage.EmageError as e:
        raise ClipImageError(f"{what}: {e}") from None
    return config


def _read_meta(config_path: Path | None) -> dict:
    if config_path is None:
        return {}
    try:
        meta = read_json(config_path)
    except FileError as e:
        raise ClipImageError(str(e)) from None
    if not isinstance(meta, dict):
        raise ClipImageError(f"{config_path} is not an object of fields; is it a CLIP config.json?")
    return meta


def shapes_text_config() -> TextConfig:
    """The text tower paired with VisionConfig.shapes(): the shapes vocabulary, width 32, 1 layer,
    16 positions (a shapes caption is at most 12 words, one token each, plus start and end)."""
    return TextConfig(vocab_size=SHAPES_VOCAB_SIZE, context_length=16, width=32, heads=2, layers=1,
                      embed_dim=32)


class VisionEncoder(nn.Module):
    """CLIP's image tower (OpenAI `VisionTransformer`): patches -> pre-LN Transformer -> class token.

    The patch convolution (no bias) cuts the image into g x g patches; a learned class token
    is put in front, the positional embedding added, `ln_pre` applied, then the same residual
    blocks as the text tower (QuickGELU MLPs) without a mask. `pooled` = ln_post(class token)
    @ proj. `states` are the last block's outputs before ln_post, Hugging Face's
    `last_hidden_state`. Parameter names mirror OpenAI's `visual.*` keys one to one.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.width % config.heads:
            raise ClipImageError(f"width {config.width} is not divisible by heads {config.heads}; pick another pair")
        if config.image_size % config.patch_size:
            raise ClipImageError(f"image size {config.image_size} is not a multiple of the patch size {config.patch_size}")
        self.config = config
        c = config
        self.conv1 = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(c.width))
        self.positional_embedding = nn.Parameter(torch.empty(c.grid**2 + 1, c.width))
        self.ln_pre = LayerNorm(c.width)
        self.transformer = Transformer(c.width, c.heads, c.layers)
        self.ln_post = LayerNorm(c.width)
        self.proj = nn.Parameter(torch.empty(c.width, c.embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenAI's initialisation: embeddings and projection ~ N(0, width^-1/2); blocks as the text tower."""
        c = self.config
        scale = c.width**-0.5
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(p, std=scale)
        proj_std = scale * (2 * c.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=scale)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * c.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ClipImageError(f"the image tower takes [B, 3, {S}, {S}] images, got {tuple(images.shape)}; "
                                 "resize with preprocess()")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D), patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + g*g, D)
        states = self.transformer(self.ln_pre(x), None)  # (B, 1 + g*g, D): no mask, every patch sees all
        pooled = self.ln_post(states[:, 0]) @ self.proj  # (B, P)
        return states, pooled


def preprocess(images, image_size: int) -> torch.Tensor:
    """uint8 images [B, H, W, 3] (numpy or tensor) -> normalised floats [B, 3, S, S].

    OpenAI resizes the shorter side to S (bicubic), crops the centre, and normalises with
    MEAN/STD. Patch: the resize is torch's antialiased bicubic, not PIL's, so resized
    pixels differ slightly from OpenAI's; images already S x S are not resampled at all.
    """
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
    H, W = x.shape[-2:]
    if (H, W) != (image_size, image_size):
        scale = image_size / min(H, W)
        size = (max(image_size, round(H * scale)), max(image_size, round(W * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        x = x[:, :, top : top + image_size, left : left + image_size]  # (B, 3, S, S)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIP(nn.Module):
    """Both towers and the learned temperature; embeddings are compared by cosine similarity."""

    def __init__(self, text: TextConfig, vision: VisionConfig):
        super().__init__()
        if text.embed_dim != vision.embed_dim:
            raise ClipImageError(f"the towers embed into {text.embed_dim} and {vision.embed_dim} dimensions; they must agree")
        self.text = TextEncoder(text)
        self.visual = VisionEncoder(vision)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, S, S] -> unit embeddings [B, P]."""
        return F.normalize(self.visual(images)[1].float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L] -> unit embeddings [B, P]."""
        return F.normalize(self.text(tokens)[1].float(), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B_images, B_texts] = exp(logit_scale) * cosine similarity, as CLIP trains on."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP clips the scale at 100
        return scale * self.encode_image(images) @ self.encode_text(tokens).t()


# ----------------------------------------------------------------------------------------
# Checkpoints: native, OpenAI, Hugging Face
# ----------------------------------------------------------------------------------------


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def save_clip_image(encoder: VisionEncoder, out_dir: str | os.PathLike) -> None:
    """Native vision tower: config.json (the VisionConfig) + model.safetensors, each atomically."""
    out = Path(out_dir)
    _write_weights(out / "model.safetensors", encoder.state_dict())
    write_json(out / "config.json", {"format": VISION_FORMAT, "config": asdict(encoder.config)})


def save_clip(model: CLIP, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike) -> None:
    """Native whole CLIP: config.json (both configs, the vocabulary's file name) + model.safetensors
    (keys `text.*`, `visual.*`, `logit_scale`), with the vocabulary copied beside them."""
    out = Path(out_dir)
    vocab = Path(tokenizer_path)
    if vocab.resolve() != (out / vocab.name).resolve():
        atomic_write(out / vocab.name, lambda tmp: shutil.copyfile(vocab, tmp))
    _write_weights(out / "model.safetensors", model.state_dict())
    write_json(out / "config.json", {"format": CLIP_FORMAT, "text": asdict(model.text.config),
                                     "vision": asdict(model.visual.config), "tokenizer": vocab.name})


def openai_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI (and open_clip) `visual.*` keys are ours without the prefix; everything else is the text side."""
    return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}


def hf_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP vision keys -> native keys; every vision key is consumed or it is an error.

    q, k, v are separate Linear layers there, one fused `in_proj` here (stacked in that
    order); `visual_projection` is a bias-free Linear there, a (width, embed_dim) matrix
    here; `pre_layrnorm` is Hugging Face's spelling. A CLIPVisionModel has no projection:
    the identity stands in, so `pooled` is its pooler output.
    """
    if "embeddings.patch_embedding.weight" in state:  # transformers 5 saves CLIPVisionModel without the prefix
        state = {("vision_model." + k if k.startswith(HF_VISION_PARTS) else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    state.pop("vision_model.embeddings.position_ids", None)  # a buffer older transformers saved
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ClipImageError(f"Hugging Face checkpoint lacks {key}; is it a CLIP vision model?")
        used.add(key)
        return state[key]

    v = "vision_model."
    out = {
        "conv1.weight": take(v + "embeddings.patch_embedding.weight"),
        "class_embedding": take(v + "embeddings.class_embedding"),
        "positional_embedding": take(v + "embeddings.position_embedding.weight"),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for part in ("weight", "bias"):
            out[f"{ours}.{part}"] = take(f"{v}{theirs}.{part}")
    out.update(clip_text.hf_encoder_layers(state, v, take))
    if "visual_projection.weight" in state:
        out["proj"] = take("visual_projection.weight").t()  # (P, D) -> (D, P)
    else:
        out["proj"] = torch.eye(out["ln_post.weight"].shape[0], dtype=out["ln_post.weight"].dtype)
    unused = sorted(set(state) - used)
    if unused:
        raise ClipImageError(f"{len(unused)} Hugging Face keys have no place in the vision tower, e.g. {unused[:3]}")
    return out


def _config_from_shapes(weights: dict[str, torch.Tensor], heads: int | None) -> VisionConfig:
    """Rebuild the VisionConfig from tensor shapes (native key names), as CLIP's `build_model` does."""
    try:
        width, _, patch, _ = weights["conv1.weight"].shape
        grid = math.isqrt(weights["positional_embedding"].shape[0] - 1)
        layers = len({k.split(".")[2] for k in weights if k.startswith("transformer.resblocks.")})
        config = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                              heads=heads or max(1, width // 64),  # OpenAI's vision towers use 64-dimensional heads
                              layers=layers, embed_dim=weights["proj"].shape[1])
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise ClipImageError(f"the weights do not describe a CLIP vision tower ({type(e).__name__}: {one_line(e)})") from None
    return check_vision_config(config)


def _hf_vision_heads(config_path: Path) -> int:
    """Attention heads from a Hugging Face config.json (CLIPModel nests the vision part)."""
    config = _read_meta(config_path)
    vision = config.get("vision_config") or config
    if not isinstance(vision, dict):
        raise ClipImageError(f"{config_path}: vision_config must be an object of fields")
    act, eps = vision.get("hidden_act", "quick_gelu"), vision.get("layer_norm_eps", 1e-5)
    if act != "quick_gelu" or eps != 1e-5:
        raise ClipImageError(f"{config_path}: hidden_act={shown(act)}, layer_norm_eps={shown(eps)}; "
                             "only CLIP's quick_gelu and 1e-5 are built here")
    return check_int(f"{config_path}: num_attention_heads", vision.get("num_attention_heads", 12), 1, 65536,
                     ClipImageError)  # 12: CLIPVisionConfig's default


def _build(weights: dict[str, torch.Tensor], config: VisionConfig, source: Path) -> VisionEncoder:
    """Assert every key and shape against a freshly built tower, then load strictly (in fp32)."""
    with meta_device():  # shapes only: no time spent on a random initialisation
        encoder = VisionEncoder(config)
    expected = encoder.state_dict()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ClipImageError(f"{source}: missing keys {missing[:3]}, unexpected keys {extra[:3]}; not a CLIP vision tower?")
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise ClipImageError(f"{source}: {key} has shape {tuple(weights[key].shape)}, expected {tuple(value.shape)}")
    encoder.load_state_dict({k: v.float().contiguous() for k, v in weights.items()}, strict=True, assign=True)
    return encoder.eval()


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of a checkpoint directory or file."""
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None or not (path / "config.json").is_file():
            raise ClipImageError(f"{path} needs config.json and model.safetensors; is it a CLIP checkpoint directory?")
        return weights, path / "config.json"
    if path.is_file():
        return path, path.with_name("config.json") if path.with_name("config.json").is_file() else None
    raise ClipImageError(f"checkpoint {path} does not exist")


def _vision_from_state(state: dict[str, torch.Tensor], config_path: Path | None, source: Path) -> VisionEncoder:
    """The vision tower of a foreign (OpenAI or Hugging Face) state dict."""
    heads = None
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding.")) for k in state):
        weights = hf_to_native(state)
        if config_path is not None:
            heads = _hf_vision_heads(config_path)
    elif "visual.conv1.weight" in state:
        weights = openai_to_native(state)
    else:
        raise ClipImageError(f"{source} has neither OpenAI nor Hugging Face CLIP vision keys")
    return _build(weights, _config_from_shapes(weights, heads), source)


def load_clip_image(path: str | os.PathLike, *, trust_torchscript: bool = False) -> VisionEncoder:
    """A VisionEncoder (fp32, eval mode) from any checkpoint `clip_text.load_clip_text` reads the
    text tower of: a native dir, a Hugging Face CLIPModel / CLIPVisionModel(WithProjection)
    dir or weights file, or an OpenAI state dict or TorchScript archive (`trust_torchscript`)."""
    path = Path(path)
    weights_path, config_path = _locate(path)
    meta = _read_meta(config_path)  # checked before the weights are read
    if meta.get("format") == VISION_FORMAT:
        config = config_of(meta.get("config"), VisionConfig, f"{config_path}: config")
        return _build(clip_text.read_tensors(weights_path, trust_torchscript), config, path)
    if meta.get("format") == CLIP_FORMAT:
        config = config_of(meta.get("vision"), VisionConfig, f"{config_path}: vision")
        state = clip_text.read_tensors(weights_path, trust_torchscript)
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        return _build(visual, config, path)
    state = clip_text.read_tensors(weights_path, trust_torchscript)
    return _vision_from_state(state, config_path, path)


def load_clip(path: str | os.PathLike, *, bpe: str | os.PathLike | None = None,
              trust_torchscript: bool = False) -> tuple[CLIP, clip_text.Tokenizer]:
    """(CLIP in fp32 eval mode, its tokenizer) from a native dir (`save_clip`), a Hugging Face
    CLIPModel, or an OpenAI checkpoint. Foreign checkpoints use `bpe` (default: CLIP's own
    vocabulary beside the weights, else
    CLIP's own, found as clip_text.Tokenizer() finds it)."""
    path = Path(path)
    weights_path, config_path = _locate(path)
    meta = _read_meta(config_path)  # checked before the weights are read
    if meta.get("format") == CLIP_FORMAT:
        text_config = config_of(meta.get("text"), TextConfig, f"{config_path}: text")
        vision_config = config_of(meta.get("vision"), VisionConfig, f"{config_path}: vision")
        tokenizer_name = meta.get("tokenizer")
        if not isinstance(tokenizer_name, str) or not tokenizer_name or "/" in tokenizer_name or "\\" in tokenizer_name \
                or tokenizer_name in (".", ".."):
            raise ClipImageError(f"{config_path}: tokenizer must be the file name of the vocabulary beside it, "
                                 f"got {shown(tokenizer_name)}")
        with meta_device():
            model = CLIP(text_config, vision_config)
        state = clip_text.read_tensors(weights_path, trust_torchscript)
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ClipImageError(f"{path}: model.safetensors does not match config.json; was it written by save_clip?")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        return model.eval(), clip_text.Tokenizer(path / tokenizer_name)
    if meta.get("format") in (VISION_FORMAT, clip_text.NATIVE_FORMAT):
        raise ClipImageError(f"{path} holds one tower only; re-ranking needs a whole CLIP (OpenAI, Hugging Face CLIPModel, or `convert`)")
    state = clip_text.read_tensors(weights_path, trust_torchscript)
    visual = _vision_from_state(state, config_path, path)
    text = clip_text.load_clip_text(path, trust_torchscript=trust_torchscript)
    with meta_device():
        model = CLIP(text.config, visual.config)
    model.text, model.visual = text, visual
    scale = state.get("logit_scale", torch.tensor(math.log(1 / 0.07)))
    model.logit_scale = nn.Parameter(scale.float().reshape(()).clone())
    tokenizer = clip_text.Tokenizer(bpe or clip_text.vocabulary_beside(path))  # a Hugging Face folder's own merges.txt
    if tokenizer.vocab_size != text.config.vocab_size:
        raise ClipImageError(f"the vocabulary {tokenizer.path} has {tokenizer.vocab_size} ids but the text tower "
                             f"{text.config.vocab_size}; pass the matching vocabulary (--bpe)")
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------
# Re-ranking
# ----------------------------------------------------------------------------------------


class Reranker:
    """Scores candidate images against a caption by CLIP's image-text cosine similarity.

    `reranker(candidates uint8 [C, H, W, 3], caption) -> float32 scores [C]`; the paper's
    protocol keeps `argmax(scores)` (the signature eval_fid.generate_folder calls).
    """

    def __init__(self, model: CLIP, tokenizer: clip_text.Tokenizer, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def similarity(self, images, captions: list[str]) -> torch.Tensor:
        """Cosine similarities [B_images, B_captions] of uint8 images [B, H, W, 3] and captions."""
        pixels = preprocess(images, self.model.visual.config.image_size).to(self.device)  # (B, 3, S, S)
        tokens = self.tokenizer(captions, context_length=self.model.text.config.context_length).to(self.device)
        return (self.model.encode_image(pixels) @ self.model.encode_text(tokens).t()).cpu()  # (B, T)

    def __call__(self, candidates, caption: str) -> np.ndarray:
        return self.similarity(candidates, [caption])[:, 0].numpy()  # (C,)


def load_reranker(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                  bpe: str | os.PathLike | None = None, trust_torchscript: bool = False) -> Reranker:
    """The re-ranker of a whole CLIP checkpoint (see load_clip for the formats)."""
    model, tokenizer = load_clip(path, bpe=bpe, trust_torchscript=trust_torchscript)
    return Reranker(model, tokenizer, device)


# ----------------------------------------------------------------------------------------
# A small CLIP for the shapes world
# ----------------------------------------------------------------------------------------


def mutate_caption(caption: str, rng: random.Random, split: str = "train") -> str:
    """A caption one detail away from `caption`: another colour, shape or size of one object,
    or the opposite relation. Used as a hard negative in training; it stays in `split`
    (for "train": no held-out pair) and within the grammar."""
    parsed = shapes.parse(caption)
    while True:
        objects = list(parsed.objects)
        relation = parsed.relation
        change = rng.choice(["color", "shape", "size"] + (["relation"] if relation else []))
        i = rng.randrange(len(objects))
        o = objects[i]
        if change == "color":
            objects[i] = shapes.Obj(rng.choice([c for c in shapes.COLORS if c != o.color]), o.shape, o.size)
        elif change == "shape":
            objects[i] = shapes.Obj(o.color, rng.choice([s for s in shapes.SHAPES if s != o.shape]), o.size)
        elif change == "size":
            if o.size is None:
                continue  # no size named: any size fits the caption, so nothing to contradict
            objects[i] = shapes.Obj(o.color, o.shape, "small" if o.size == "large" else "large")
        else:
            relation = shapes.OPPOSITE[relation]
        new = shapes.Caption(tuple(objects), relation)
        if len(objects) == 2 and (objects[0].color, objects[0].shape) == (objects[1].color, objects[1].shape):
            continue
        if split == "train" and new.is_novel:
            continue
        return str(new)


def shapes_batch(rng: random.Random, size: int) -> tuple[np.ndarray, list[str]]:
    """size // 2 training captions and a hard negative of each, rendered: (uint8 [size, 64, 64, 3], captions)."""
    captions = []
    for _ in range(size // 2):
        caption = shapes.sample_caption(rng, "train")
        captions += [caption, mutate_caption(caption, rng)]
    images = np.stack([np.asarray(shapes.render(c, rng.randrange(2**31))) for c in captions])
    return images, captions


def contrastive_loss(logits: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a batch [B, B], except that rows sharing a caption
    are all positives (the one-object grammar is small, so a batch repeats captions):
    the target of a row is uniform over the columns with the same caption."""
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    target = (ids[:, None] == ids[None, :]).float()  # (B, B)
    target = target / target.sum(1, keepdim=True)
    image_to_text = -(target * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(target * logits.t().log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def retrieval_accuracy(model: CLIP, tokenizer: clip_text.Tokenizer, seed: int = 0) -> dict[str, float]:
    """Image -> caption retrieval among the shapes evaluation captions (one render each), and the
    rate at which an image scores its caption above a hard negative (mutate_caption, any split)."""
    captions = shapes.eval_captions()
    rng = random.Random(seed)
    images = np.stack([np.asarray(shapes.render(c, seed)) for c in captions])
    negatives = [mutate_caption(c, rng, split="any") for c in captions]
    reranker = Reranker(model, tokenizer, next(model.parameters()).device)
    sim = reranker.similarity(images, captions + negatives)  # (N, 2N)
    n = len(captions)
    top1 = (sim[:, :n].argmax(1) == torch.arange(n)).float().mean().item()
    pairwise = (sim[:, :n].diagonal() > sim[:, n:].diagonal()).float().mean().item()
    return {"retrieval_top1": top1, "beats_hard_negative": pairwise}


def train_shapes(out: str | os.PathLike, *, steps: int = 1000, batch_size: int = 64, lr: float = 3e-3,
                 seed: int = 0, threads: int = 1, max_minutes: float = 8.0, log_every: int = 25,
                 text_config: TextConfig | None = None) -> dict:
    """Train VisionConfig.shapes() + shapes_text_config() contrastively on rendered shapes images
    (half of every batch hard negatives, see shapes_batch) with AdamW and a cosine learning
    rate after 5 % warm-up; save with save_clip. Training stops early after `max_minutes`
    (the schedule is then cut short; the steps done are recorded). Returns the evaluation
    numbers it stored in config.json under "training"."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = clip_text.Tokenizer(SHAPES_BPE_PATH)
    model = CLIP(text_config or shapes_text_config(), VisionConfig.shapes())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    started = time.perf_counter()
    model.train()
    done = 0
    for step in range(steps):
        if time.perf_counter() - started > 60 * max_minutes:
            print(f"stopping after {step} steps: --max-minutes {max_minutes} reached", flush=True)
            break
        images, captions = shapes_batch(rng, batch_size)
        pixels = preprocess(images, 64)  # (B, 3, 64, 64)
        tokens = tokenizer(captions, context_length=model.text.config.context_length)  # (B, L)
        loss = contrastive_loss(model(pixels, tokens), captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    model.eval()
    report = retrieval_accuracy(model, tokenizer)
    report.update(steps=done, batch_size=batch_size, lr=lr, seed=seed, seconds=round(time.perf_counter() - started))
    save_clip(model, out, tokenizer.path)
    meta = json.loads((Path(out) / "config.json").read_text())
    meta["training"] = report
    write_json(Path(out) / "config.json", meta)
    return report


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def is_clip_folder(path: Path) -> bool:
    """Whether `path` holds an earlier `convert` (a native whole CLIP): what --overwrite may replace."""
    try:
        meta = read_json(path / "config.json")
    except FileError:
        return False
    return isinstance(meta, dict) and meta.get("format") == CLIP_FORMAT


def _convert(args: argparse.Namespace) -> None:
    check_output(args.out_dir, args.overwrite, "folder", "OUT_DIR", ours=is_clip_folder)  # before any reading
    model, tokenizer = load_clip(args.src, bpe=args.bpe, trust_torchscript=args.trust_torchscript)
    save_clip(model, args.out_dir, tokenizer.path)
    print(f"wrote {args.out_dir}: {model.visual.config}, {model.text.config}")


MAX_SCORED_IMAGES = 256


def _score(args: argparse.Namespace) -> None:
    if len(args.images) > MAX_SCORED_IMAGES:
        raise ClipImageError(f"score at most {MAX_SCORED_IMAGES} images at a time, got {len(args.images)}")
    reranker = load_reranker(args.clip, bpe=args.bpe, trust_torchscript=args.trust_torchscript)
    images, pixels = [], 0
    for path in args.images:
        image = open_image(path)  # bounded: at most 64 MP each
        pixels += image.width * image.height
        if pixels > MAX_IMAGE_PIXELS:
            raise ClipImageError(f"the images hold more than {MAX_IMAGE_PIXELS:,} pixels together; score fewer or "
                                 "smaller images at a time")
        images.append(np.asarray(image))
    if len({a.shape for a in images}) != 1:
        raise ClipImageError("the images differ in size; score images of one size at a time")
    for path, value in zip(args.images, reranker(np.stack(images), args.caption)):
        print(f"{value:+.4f}  {path}")


def _train_shapes(args: argparse.Namespace) -> None:
    E = ClipImageError
    check_int("--steps", args.steps, 1, 10**7, E)
    check_int("--batch-size", args.batch_size, 2, 4096, E)
    check_float("--lr", args.lr, 0.0, 10.0, E, low_open=True)
    check_float("--max-minutes", args.max_minutes, 0.0, 10**7, E, low_open=True)
    check_int("--seed", args.seed, 0, 2**63 - 1, E)
    check_int("--threads", args.threads, 1, 1024, E)
    check_output(args.out, args.overwrite, "folder")
    text = shapes_text_config()
    if args.text_size == "emage":  # the shapes generator's own tower (emage.SMALL_TEXT), for Table 5's CLIP row
        text = TextConfig(vocab_size=text.vocab_size, context_length=24, width=128, heads=4, layers=3,
                          embed_dim=VisionConfig.shapes().embed_dim)  # the contrastive space both towers project into
    report = train_shapes(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          threads=args.threads, max_minutes=args.max_minutes, text_config=text)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in report.items()))


def main(argv: list[str] | None = None) -> int:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="a whole CLIP checkpoint -> native dir (both towers + vocabulary)", formatter_class=fmt)
    p.add_argument("src", help="OpenAI .pt / state dict, Hugging Face CLIPModel dir or file, or a native dir")
    p.add_argument("out_dir", help="where to write config.json + model.safetensors + the vocabulary (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR")
    p.add_argument("--bpe", default=None, help=f"vocabulary file (default: ${clip_text.BPE_ENV}, else the one open_clip ships)")
    p.add_argument("--trust-torchscript", action="store_true", help="allow OpenAI's TorchScript archive (it can run code)")
    p.set_defaults(run=_convert)

    p = commands.add_parser("score", help="cosine similarity of images to a caption", formatter_class=fmt)
    p.add_argument("images", nargs="+", help="image files (one size)")
    p.add_argument("--caption", required=True, help="the caption to compare with")
    p.add_argument("--clip", default=str(SHAPES_CLIP), help="whole CLIP checkpoint")
    p.add_argument("--bpe", default=None, help="vocabulary file for foreign checkpoints")
    p.add_argument("--trust-torchscript", action="store_true", help="allow OpenAI's TorchScript archive (it can run code)")
    p.set_defaults(run=_score)

    p = commands.add_parser("train-shapes", help="train the small shapes-world CLIP", formatter_class=fmt)
    p.add_argument("--out", default="runs/shapes-clip",
                   help=f"output checkpoint folder (the shipped one is {SHAPES_CLIP.relative_to(ROOT)})")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out if there is one")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step (half of them hard negatives)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop early after this much wall time")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption stream and the initialisation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--text-size", default="small", choices=("small", "emage"),
                   help="the text tower: small (width 32, 1 layer: the shipped re-ranker) or emage (3 layers of width "
                        "128, 24 positions: the shapes generator's own tower, so that train.py --text-init can load it)")
    p.set_defaults(run=_train_shapes)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (clip_text.ClipTextError, TokenizerError, FileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
