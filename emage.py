"""Emage: the non-autoregressive text-to-image generator and every algorithm of Section 3.

Read this file beside Section 3 of the paper ("Emage: Non-Autoregressive Text-to-Image
Generation", Feng et al.). A caption X is read once by a CLIP text Transformer; a
Transformer decoder over the n image tokens Y of a VQGAN (with an extra [mask] id)
cross-attends to it and predicts a distribution over the codebook at every position.

    Emage(config).loss(text_tokens, image_tokens, variant)   training, Fig. 2 (a)-(d) and Algorithm 2
    Emage(config).generate(text_tokens, steps=16, ...)       inference, Algorithms 1 and 3
    save_checkpoint(model, dir, ...), load_checkpoint(dir)  config.json + model.safetensors

The variants (Fig. 2) and the inference algorithm each is decoded with:

    variant   training (one method each)                            inference
    "full"    every position masked, one pass (Section 3.1)         one pass ("full")
    1         mask k ~ U(0, n] positions, predict them (3.2)        Algorithm 1
    2         pass 1 fills the masked positions -> Y_mix, then #1   Algorithm 1
              on Y_mix (3.3)
    3         Algorithm 2: pass 1 predicts all -> Y_pred, re-mask   Algorithm 3
              -> Y_obs, pass 2 predicts all, loss on all (3.4)
    "ar"      causal decoder, next-token cross-entropy (baseline)   token by token ("ar")

The file holds the paper and nothing else. What goes beyond it (colour-factored codes,
object masking, the mirror loss, self-score re-ranking) lives in extensions.py and plugs
in through one seam, the `beyond` argument of Emage: an object that may supply the token
embedding and output head, add to the training masks and add a loss term. This file never
imports it; a checkpoint that needs it is loaded by extensions.load_checkpoint.

The decoding loop is built from pure tensor functions (`mask_schedule`, `commit_counts`,
`sample_tokens`, `gumbel_confidence`, `guided_logits`, `commit_algorithm1`,
`commit_algorithm3`) around two model calls, `encode_text` (once per caption) and
`round_logits` (once per round), so that another runtime (ONNX Runtime, `export_onnx.py`)
can replay it exactly. No random op runs inside the model: every random number is drawn
on the host from one `torch.Generator` in this fixed order, B' = rows of the output batch:

    generate, rounds t = 1..T:  u_token[B', n], then u_confidence[B', n]        (per round)
    generate, "ar":             u_token[B', n] once; column i samples token i
    loss:                       caption dropout u[B] (training with p > 0 only); mask 1:
                                u_ratio[B], u_position[B, n] (then what beyond.training_mask
                                draws); pass-1 sampling u[B, n] (#2/#3 with pass1="sample"
                                only); mask 2: as mask 1
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert_text import VOCAB_FILE_NAME, BertConfig, BertEncoder, WordPiece
from clip_text import TextConfig, TextEncoder, Tokenizer
from files import (FileError, atomic_write, check_bool, check_choice, check_float, check_int, is_whole, meta_device,
                   read_json, safetensors_header, shown, write_json)


class EmageError(ValueError):
    """A user error in this module: an unknown variant, a bad argument, an unreadable checkpoint."""


VARIANTS = ("full", 1, 2, 3, "ar")  # the models of Fig. 2 (a)-(d) and the autoregressive baseline
ALGORITHMS = ("full", 1, 3, "ar")  # inference procedures
DEFAULT_ALGORITHM = {"full": "full", 1: 1, 2: 1, 3: 3, "ar": "ar"}  # Section 3.3: #2 decodes like #1
SCHEDULES = ("linear", "cosine")
# The small text tower of the shapes preset: 3 layers of width 128 over a 573-id vocabulary
# (checkpoints/shapes/bpe_shapes.txt.gz, learnt by `python shapes_tokenizers.py learn-bpe`).
SMALL_TEXT = TextConfig(vocab_size=573, context_length=24, width=128, heads=4, layers=3, embed_dim=128)


def parse_variant(value) -> str | int:
    """'1' / 1 -> 1, 'full' -> 'full', ...: the form command lines and config.json give."""
    v = int(value) if isinstance(value, str) and value.isdigit() else value
    if v not in VARIANTS:
        raise EmageError(f"unknown variant {value!r}; choose one of full, 1, 2, 3, ar")
    return v


def parse_algorithm(value) -> str | int:
    v = int(value) if isinstance(value, str) and value.isdigit() else value
    if v not in ALGORITHMS:
        raise EmageError(f"unknown algorithm {value!r}; choose one of full, 1, 3, ar")
    return v


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclass
class EmageConfig:
    text: TextConfig | BertConfig = field(default_factory=lambda: replace(SMALL_TEXT))  # the text encoder (X -> states): CLIP, or BERT (Table 5)
    codebook_size: int = 512  # VQGAN codes K; the [mask] id is K (one extra input embedding)
    grid: tuple[int, int] = (8, 8)  # image token grid (h, w); n = h * w tokens (paper: 32 x 32 = 1024)
    width: int = 256  # decoder hidden size (paper: 768)
    layers: int = 4  # decoder blocks (paper: 12)
    heads: int = 4  # decoder attention heads; width must be divisible by heads
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * width
    train_schedule: str = "linear"  # tau() used to draw training mask ratios; Section 4.7: linear trains best
    pass1: str = "argmax"  # how passes 1 of #2 / #3 turn logits into tokens: "argmax" or "sample" (see loss)
    pass1_grad: bool = False  # let gradients reach pass 1 (straight-through); default off (see loss)
    pass1_keep_seen: bool = True  # #3: positions pass 1 saw unmasked keep their true token in Y_pred (see loss)
    caption_dropout: float = 0.0  # probability of training on the empty caption (for guidance, as Muse does); paper: 0

    @property
    def n(self) -> int:
        """Number of image tokens per image."""
        return self.grid[0] * self.grid[1]

    @property
    def mask_id(self) -> int:
        """The [mask] token: one past the last VQGAN code."""
        return self.codebook_size

    @classmethod
    def paper(cls) -> "EmageConfig":
        """Section 4: CLIP ViT-L/14 text tower (12 layers, 768), 12-layer decoder of width 768,
        32 x 32 = 1024 tokens of the Gumbel VQGAN's 8192 codes.

        Parameters: 250.5M (text encoder 123.7M, decoder 126.8M), counted with
        `sum(p.numel() for p in Emage(EmageConfig.paper()).parameters())` (build it under
        `torch.device("meta")` to count without allocating). The paper reports 346M
        (Tables 3, 4) without a breakdown; we follow its text (12 + 12 layers, hidden 768,
        1024 tokens, 8192 codes) and leave the ~96M gap unexplained rather than guess.
        """
        return cls(
            text=TextConfig.vit_l14(),
            codebook_size=8192,
            grid=(32, 32),
            width=768,
            layers=12,
            heads=12,
        )

    @classmethod
    def shapes(cls, codebook_size: int = 512, grid: tuple[int, int] = (8, 8), **overrides) -> "EmageConfig":
        """The shapes world (SHAPES.md): 8 x 8 tokens of the shapes VQGAN, a 4-layer decoder of
        width 256 (4.2M parameters) over the small text tower (0.7M).

        Cost of one #3 training step at batch 64: 132 GFLOP (a #1 step: 101 GFLOP, by
        torch.utils.flop_counter), 2.4 CPU-seconds on one core of the development machine.
        Cheaper decoders for a tight CPU budget: width=128 (1.2 CPU-s), or width=128,
        layers=3, mlp_ratio=2.0 (0.54 CPU-s); pass them as keyword overrides.
        """
        return cls(text=replace(SMALL_TEXT), codebook_size=codebook_size, grid=tuple(grid), **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        if isinstance(self.text, BertConfig):
            d["text"]["kind"] = "bert"  # Table 5's BERT tower; CLIP's needs no tag (older checkpoints have none)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EmageConfig":
        """The config of a config.json, every field checked (type, range, choice) before any
        use: a hostile file is one EmageError, never an allocation (see _check_config)."""
        if not isinstance(d, dict):
            raise EmageError(f"config.json does not describe an EmageConfig (got {shown(d)}); was it written by save_checkpoint?")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EmageError(f"config.json does not describe an EmageConfig (unknown fields {shown(unknown, 80)}); "
                             "was it written by save_checkpoint?")
        if "text" not in d or "grid" not in d:
            raise EmageError("config.json does not describe an EmageConfig (no 'text' or 'grid'); was it written by save_checkpoint?")
        text = d["text"]
        if not isinstance(text, dict):
            raise EmageError(f"config.json's text is not an object of fields, got {shown(text)}")
        text_class = BertConfig if text.get("kind") == "bert" else TextConfig
        text = {k: v for k, v in text.items() if k != "kind"}
        unknown = sorted(set(text) - {f.name for f in fields(text_class)})
        if unknown:
            raise EmageError(f"config.json does not describe an EmageConfig (unknown text fields {shown(unknown, 80)}); "
                             "was it written by save_checkpoint?")
        grid = d["grid"]
        if not isinstance(grid, (list, tuple)) or len(grid) != 2:
            raise EmageError(f"grid must be two whole numbers [rows, columns], got {shown(grid)}")
        config = cls(**{**d, "text": text_class(**text), "grid": tuple(grid)})
        _check_config(config)
        return config


# Bounds of every config field, checked before anything is allocated: far beyond any model
# this code trains or loads (the paper's: 12 + 12 layers of width 768, 32 x 32 tokens, 8192
# codes, 77 caption positions), yet small enough that a hostile config.json is refused
# before it costs memory or time.
MAX_LAYERS = 256
MAX_WIDTH = 65536
MAX_GRID_SIDE = 1024
MAX_CODEBOOK = 2**20
MAX_VOCAB = 2**20
MAX_CONTEXT = 4096
MAX_MLP_RATIO = 64.0
MAX_PARAMETERS = 2**32  # ~4.3 billion (17 GB of fp32 weights); the paper's model has 250.5M


def _parameter_count(c: EmageConfig) -> int:
    """Parameters of Emage(c) without building it (the paper's model: 250.5M), for _check_config."""
    t, w, K = c.text, c.width, c.codebook_size
    if isinstance(t, BertConfig):
        D, inner = t.hidden_size, t.intermediate_size
        text = (t.vocab_size + t.max_position_embeddings + t.type_vocab_size + 2) * D \
            + t.num_hidden_layers * (4 * D * D + 4 * D + 2 * D * inner + inner + D + 4 * D)
    else:
        text = t.vocab_size * t.width + t.context_length * t.width + 2 * t.width + t.width * t.embed_dim \
            + t.layers * (12 * t.width**2 + 13 * t.width)
    hidden = int(c.mlp_ratio * w)
    block = 6 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * w + w) + (2 * w * t.width + 2 * w) + (w * w + w) \
        + (w * hidden + hidden) + (hidden * w + w)
    return text + (K + 1) * w + c.n * w + c.layers * block + 2 * w + w * K + K


def _check_config(c: EmageConfig) -> None:
    """Every field's type and range (ints are ints, floats finite, bools bools, strings in
    their choice sets), the divisibility the attention needs, and the model's size."""
    E = EmageError
    check_int("codebook_size", c.codebook_size, 1, MAX_CODEBOOK, E)
    if not isinstance(c.grid, (tuple, list)) or len(c.grid) != 2:
        raise E(f"grid must be two whole numbers (rows, columns), got {shown(c.grid)}")
    for side in c.grid:
        check_int("each grid side", side, 1, MAX_GRID_SIDE, E)
    check_int("width", c.width, 1, MAX_WIDTH, E)
    check_int("layers", c.layers, 1, MAX_LAYERS, E)
    check_int("heads", c.heads, 1, MAX_WIDTH, E)
    if c.width % c.heads:
        raise E(f"decoder width {c.width} is not divisible by heads {c.heads}; pick another pair")
    check_float("mlp_ratio", c.mlp_ratio, 0.0, MAX_MLP_RATIO, E, low_open=True)
    if int(c.mlp_ratio * c.width) < 1:
        raise E(f"mlp_ratio {c.mlp_ratio} x width {c.width} leaves the MLP without a hidden unit")
    check_choice("train_schedule", c.train_schedule, SCHEDULES, E)
    check_choice("pass1", c.pass1, ("argmax", "sample"), E)
    check_bool("pass1_grad", c.pass1_grad, E)
    check_bool("pass1_keep_seen", c.pass1_keep_seen, E)
    check_float("caption_dropout", c.caption_dropout, 0.0, 1.0, E, high_open=True)
    t = c.text
    if isinstance(t, BertConfig):
        _check_bert(t)
    elif not isinstance(t, TextConfig):
        raise E(f"text must be a TextConfig or a BertConfig, got {shown(t)}")
    else:
        _check_clip(t)
    count = _parameter_count(c)
    if count > MAX_PARAMETERS:
        raise E(f"this config describes a model of {count:,} parameters, over the limit of {MAX_PARAMETERS:,}; "
                "check its width, layers, grid and codebook_size")


def _check_clip(t: TextConfig) -> None:
    E = EmageError
    check_int("text.vocab_size", t.vocab_size, 2, MAX_VOCAB, E)
    check_int("text.context_length", t.context_length, 2, MAX_CONTEXT, E)
    check_int("text.width", t.width, 1, MAX_WIDTH, E)
    check_int("text.heads", t.heads, 1, MAX_WIDTH, E)
    if t.width % t.heads:
        raise E(f"text width {t.width} is not divisible by text heads {t.heads}; pick another pair")
    check_int("text.layers", t.layers, 1, MAX_LAYERS, E)
    check_int("text.embed_dim", t.embed_dim, 1, MAX_WIDTH, E)
    check_bool("text.causal", t.causal, E)


def _check_bert(t: BertConfig) -> None:
    E = EmageError
    check_int("text.vocab_size", t.vocab_size, 2, MAX_VOCAB, E)
    check_int("text.hidden_size", t.hidden_size, 1, MAX_WIDTH, E)
    check_int("text.num_attention_heads", t.num_attention_heads, 1, MAX_WIDTH, E)
    if t.hidden_size % t.num_attention_heads:
        raise E(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    check_int("text.num_hidden_layers", t.num_hidden_layers, 1, MAX_LAYERS, E)
    check_int("text.intermediate_size", t.intermediate_size, 1, 4 * MAX_WIDTH, E)
    check_int("text.max_position_embeddings", t.max_position_embeddings, 2, MAX_CONTEXT, E)
    check_int("text.context_length", t.context_length, 2, t.max_position_embeddings, E)
    check_int("text.type_vocab_size", t.type_vocab_size, 1, 16, E)
    check_float("text.layer_norm_eps", t.layer_norm_eps, 0.0, 1.0, E, low_open=True)
    check_choice("text.hidden_act", t.hidden_act, ("gelu",), E)
    for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
        check_int(f"text.{name}", getattr(t, name), 0, t.vocab_size - 1, E)


# ----------------------------------------------------------------------------------------
# Pure functions: schedules, masking, sampling, committing (no randomness inside)
# ----------------------------------------------------------------------------------------


def mask_schedule(name: str, r):
    """tau(r): the fraction of image tokens KEPT (unmasked) at progress r in [0, 1].

    linear: tau(r) = r.  cosine: tau(r) = 1 - cos(pi r / 2), the paper's "concave cosine
    masking strategy" (Section 3.2; the mask ratio cos(pi r / 2) is concave): few tokens
    are committed early and many late. tau(0) = 0, tau(1) = 1. Floats or tensors.
    """
    if name == "linear":
        return r
    if name == "cosine":
        return 1 - (torch.cos(r * (math.pi / 2)) if torch.is_tensor(r) else math.cos(r * math.pi / 2))
    raise EmageError(f"unknown schedule {name!r}; choose linear or cosine")


def commit_counts(name: str, steps: int, n: torch.Tensor) -> torch.Tensor:
    """Tokens committed after each round: counts[t - 1, b] = floor(tau(t / T) * n_b).

    Algorithms 1 and 3, line 4: after round t, Y_obs holds floor(tau(t/T) n) tokens. Two
    guards the paper leaves implicit: every round commits at least one more token than the
    round before (where tokens are left), so no round is wasted at small n or large T, and
    round T commits all n (1 - cos(pi/2) is not exactly 1 in floating point).
    n: LongTensor[B] (or an int) of positions to fill; returns LongTensor[T, B].
    """
    if steps < 1:
        raise EmageError(f"steps must be at least 1, got {steps}")
    n = torch.as_tensor(n, dtype=torch.long).reshape(-1)  # (B,)
    counts, prev = [], torch.zeros_like(n)
    for t in range(1, steps + 1):
        c = torch.floor(mask_schedule(name, t / steps) * n.double() + 1e-9).long()  # line 4
        c = torch.minimum(torch.maximum(c, prev + 1), n)
        if t == steps:
            c = n
        counts.append(c)
        prev = c
    return torch.stack(counts)  # (T, B)


def random_mask(u_ratio: torch.Tensor, u_position: torch.Tensor, schedule: str) -> torch.Tensor:
    """Training masks: True at k positions per row, k ~ U(0, n] through the schedule.

    Algorithm 2, lines 3-4 (and Sections 3.2, 3.3): the masked fraction is 1 - tau(u) with
    u = u_ratio ~ U[0, 1), i.e. U(0, 1] for the linear schedule, and k = ceil(fraction * n).
    Patch: the paper writes k = floor(r |Y|) with r ~ U(0, 1]; floor gives k = 0 (a row
    with nothing to learn for #1) with probability ~1/n and k = n (the first inference
    round) with probability 0, while ceil makes k exactly uniform on {1, ..., n}.
    The k positions are those with the smallest u_position (a uniformly random subset).
    u_ratio: [B], u_position: [B, n], both uniform in [0, 1); returns BoolTensor[B, n].
    """
    n = u_position.shape[-1]
    k = torch.ceil((1 - mask_schedule(schedule, u_ratio)) * n).long().clamp(1, n)  # (B,)
    rank = u_position.argsort(-1).argsort(-1)  # (B, n): 0 for the smallest noise
    return rank < k[:, None]


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0):
    """Draw one token per position from softmax(logits / temperature) by inverse CDF.

    logits: [B, n, K]; u: [B, n] uniform in [0, 1). Returns (tokens[B, n] long, their
    probabilities[B, n]), the P_obs of Algorithms 1 and 3, line 3. temperature 0 is argmax.
    The inverse CDF (count the cumulative probabilities below u) keeps the sampling free of
    random ops, so the same u gives the same token in every runtime.
    """
    if temperature == 0:  # greedy; the confidence is the model's own probability
        p, tokens = F.softmax(logits.float(), dim=-1).max(-1)
        return tokens, p
    logits = logits.float()
    probs = F.softmax(logits if temperature == 1 else logits / temperature, dim=-1)  # (B, n, K)
    cdf = probs.cumsum(-1)  # (B, n, K), non-decreasing
    target = u[..., None] * cdf[..., -1:]  # (B, n, 1)
    # the number of cumulative probabilities below u, found by bisection (same as (cdf < target).sum(-1))
    tokens = torch.searchsorted(cdf, target)[..., 0].clamp(max=logits.shape[-1] - 1)  # (B, n)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def gumbel_confidence(probs: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    """Ranking score log p + scale * Gumbel noise, Gumbel = -log(-log u).

    Section 4: candidates per caption differ by "adding gumbel noise to model predicted
    probabilities when selecting which positions to unmask". generate() anneals the scale
    linearly to 0 over the rounds (as MaskGIT does), so late rounds follow the model.
    """
    g = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    return torch.log(probs.clamp_min(1e-30)) + scale * g


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (beyond the paper, as Muse and aMUSEd do): scale 1 is `cond`."""
    return uncond + scale * (cond - uncond)


def _top_count(confidence: torch.Tensor, committed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """True at the `count` highest-ranked positions per row; committed positions rank first.

    Line 5 of Algorithms 1 and 3 sets P_obs of committed tokens to one so they are always
    among the kept; with Gumbel noise on the scores "one" must beat any score, hence +inf.
    """
    score = torch.where(committed, torch.full_like(confidence, float("inf")), confidence)
    rank = torch.sort(score, dim=-1, descending=True, stable=True).indices.argsort(-1)  # (B, n): 0 = best
    return rank < count[:, None]


def commit_algorithm1(tokens, committed, sampled, confidence, count, mask_id: int):
    """Algorithm 1, lines 4-5: keep the top `count` tokens; committed tokens never change.

    tokens[B, n] is Y_obs; committed[B, n] marks its non-[mask] tokens (P_obs = 1);
    sampled/confidence[B, n] are this round's predictions and scores; count[B] is
    floor(tau(t/T) n). Returns the new (tokens, committed).
    """
    keep = _top_count(confidence, committed, count)  # line 4 (committed first: line 5)
    new = torch.where(keep, sampled, torch.full_like(tokens, mask_id))
    return torch.where(committed, tokens, new), keep  # past tokens stay as they were


def commit_algorithm3(tokens, committed, fixed, sampled, confidence, count, mask_id: int):
    """Algorithm 3, lines 3-5: every kept position takes this round's prediction.

    Previously committed positions stay unmasked (line 5, P_obs = 1) but their values are
    replaced by the new predictions (Section 3.4: "we use newly predicted image tokens to
    update the values"); new positions are committed by confidence (line 4). `fixed` marks
    tokens given by the caller (editing) that never change.
    """
    keep = _top_count(confidence, committed, count)  # line 4 (committed first: line 5)
    new = torch.where(keep, sampled, torch.full_like(tokens, mask_id))  # revise + fill
    return torch.where(fixed, tokens, new), keep


# ----------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens; bidirectional (NAR) or causal (AR), with
    an optional key/value cache for token-by-token AR decoding."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool, cache: dict | None) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, S, hd)
        if cache is not None:  # AR decoding: one new query attends to every earlier position
            if "k" not in cache:  # first step: room for the whole sequence, written in place (no
                cache["k"] = k.new_empty(B, self.heads, cache["size"], D // self.heads)  # growing copy)
                cache["v"], cache["length"] = torch.empty_like(cache["k"]), 0
            start, end = cache["length"], cache["length"] + S
            cache["k"][:, :, start:end], cache["v"][:, :, start:end] = k, v
            k, v, cache["length"] = cache["k"][:, :, :end], cache["v"][:, :, :end], end  # (B, h, end, hd)
            causal = False  # S == 1: the cache holds only the past
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, S, hd)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class CrossAttention(nn.Module):
    """Image tokens attend to the caption's states; keys/values come precomputed (once per caption)."""

    def __init__(self, width: int, text_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(text_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def keys_values(self, states: torch.Tensor) -> torch.Tensor:
        B, L, _ = states.shape
        D = self.proj.out_features
        return self.kv(states).view(B, L, 2, self.heads, D // self.heads).permute(0, 2, 3, 1, 4)  # (B, 2, h, L, hd)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.heads, D // self.heads).transpose(1, 2)  # (B, h, S, hd)
        y = F.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], attn_mask=text_mask)  # (B, h, S, hd)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-LayerNorm decoder block: self-attention, cross-attention to the text, MLP."""

    def __init__(self, width: int, text_width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.cross = CrossAttention(width, text_width, heads)
        self.ln_3 = nn.LayerNorm(width)
        hidden = int(mlp_ratio * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, kv, text_mask, causal: bool, cache: dict | None):
        x = x + self.attn(self.ln_1(x), causal, cache)
        x = x + self.cross(self.ln_2(x), kv, text_mask)
        return x + self.mlp(self.ln_3(x))


class Emage(nn.Module):
    """Encoder-decoder generator: CLIP text encoder + Transformer decoder over image tokens.

    `variant` records what the model was trained as (set by load_checkpoint, or by the
    caller); generate() picks its default algorithm from it, Algorithm 3 when unknown.

    `beyond` is the one seam to what lies beyond the paper (extensions.Beyond, or None for
    the paper's model). It may supply the token embedding and the output head
    (`embedding(config)`, `head(config)`, None for the paper's), widen the training masks
    (`training_mask(config, mask, image_tokens, rand)`) and add a term to variant 3's loss
    (`extra_loss(model, text_tokens, x, image_tokens, logits, **extra)`).
    """

    def __init__(self, config: EmageConfig, variant=None, beyond=None):
        super().__init__()
        _check_config(config)
        self.config = config
        self.variant = None if variant is None else parse_variant(variant)
        self.beyond = beyond
        c = config
        self.text_encoder = BertEncoder(c.text) if isinstance(c.text, BertConfig) else TextEncoder(c.text)
        embedding = beyond.embedding(c) if beyond is not None else None
        self.tok_emb = embedding if embedding is not None else nn.Embedding(c.codebook_size + 1, c.width)  # codes + [mask]
        self.pos_emb = nn.Parameter(torch.zeros(c.n, c.width))  # learned positions
        self.blocks = nn.ModuleList(Block(c.width, c.text.width, c.heads, c.mlp_ratio) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        head = beyond.head(c) if beyond is not None else None
        self.head = head if head is not None else nn.Linear(c.width, c.codebook_size)  # [mask] is never predicted
        self._init_decoder()

    def _init_decoder(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if name.startswith("text_encoder."):
                continue  # the tower's own initialisation (CLIP's or BERT's), or its pretrained weights
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.config.layers) if name.endswith("proj.weight") or ".mlp.2." in name else 0.02
                nn.init.normal_(p, std=std)  # LayerNorm weights (1-d) keep their ones

    # -- text -------------------------------------------------------------------------------

    def empty_caption(self, batch: int, length: int, device=None) -> torch.Tensor:
        """The empty caption: CLIP's [sot, eot, 0, ...], or BERT's [CLS] [SEP] [PAD] ..."""
        return self.text_encoder.empty_caption(batch, length, device)

    def encode_text(self, text_tokens: torch.Tensor):
        """Run the text encoder once and compute every decoder layer's cross-attention keys/values.

        text_tokens: [B, L]. Returns (text_kv[B, layers, 2, heads, L, head_dim],
        text_mask[B, 1, 1, L] bool, True at the caption's tokens up to its end token).
        """
        if text_tokens.dim() != 2:
            raise EmageError(f"text tokens must be [batch, length], got shape {tuple(text_tokens.shape)}")
        states, valid = self.text_encoder.states_and_mask(text_tokens)  # (B, L, Dt), (B, L)
        text_kv = torch.stack([b.cross.keys_values(states) for b in self.blocks], 1)  # (B, layers, 2, h, L, hd)
        return text_kv, valid[:, None, None, :]

    # -- decoder ----------------------------------------------------------------------------

    def _decode(self, x, text_kv, text_mask, causal=False, caches=None) -> torch.Tensor:
        """x: embedded tokens [B, S, width] -> logits [B, S, K]."""
        for i, block in enumerate(self.blocks):
            x = block(x, text_kv[:, i], text_mask, causal, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def round_logits(self, image_tokens, text_kv, text_mask, causal: bool = False) -> torch.Tensor:
        """One decoder pass: image_tokens[B, S] (codes or [mask]) -> logits[B, S, K]."""
        S = image_tokens.shape[1]
        return self._decode(self.tok_emb(image_tokens) + self.pos_emb[:S], text_kv, text_mask, causal)

    # -- training ---------------------------------------------------------------------------

    def loss(self, text_tokens, image_tokens, variant, generator: torch.Generator | None = None, **extra) -> torch.Tensor:
        """Cross-entropy of one batch for a variant of Fig. 2: "full", 1, 2, 3 or "ar".

        text_tokens: [B, L] long; image_tokens: [B, n] long (ground truth Y). All
        randomness comes from `generator` (the global generator when None), in the order
        listed at the top of this file. `extra` goes to beyond.extra_loss (variant 3).
        """
        variant = parse_variant(variant)
        c, y = self.config, image_tokens
        if y.dim() != 2 or y.shape[1] != c.n:
            raise EmageError(f"image tokens must be [batch, {c.n}] for grid {c.grid}, got {tuple(y.shape)}")
        B, dev = y.shape[0], y.device
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
        if self.training and c.caption_dropout > 0:  # train the unconditional model too (guidance)
            drop = rand(B) < c.caption_dropout
            text_tokens = torch.where(drop[:, None], self.empty_caption(B, text_tokens.shape[1], dev), text_tokens)
        losses = {"full": self.loss_full, 1: self.loss_1, 2: self.loss_2, 3: self.loss_3, "ar": self.loss_ar}
        return losses[variant](text_tokens, y, rand, **extra)

    def training_mask(self, image_tokens, rand) -> torch.Tensor:
        """Algorithm 2, lines 3-4: k ~ U(0, n] random positions (widened by `beyond`, if given)."""
        B, n = image_tokens.shape
        mask = random_mask(rand(B), rand(B, n), self.config.train_schedule)
        return mask if self.beyond is None else self.beyond.training_mask(self.config, mask, image_tokens, rand)

    def loss_ar(self, text_tokens, y, rand, **extra):
        """The autoregressive baseline: input [start = mask id, y_1 .. y_{n-1}], predict y_1 .. y_n."""
        text_kv, text_mask = self.encode_text(text_tokens)
        start = torch.full_like(y[:, :1], self.config.mask_id)
        logits = self.round_logits(torch.cat([start, y[:, :-1]], 1), text_kv, text_mask, causal=True)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def loss_full(self, text_tokens, y, rand, **extra):
        """Section 3.1, fully NAR: every position [mask], one pass, loss on all."""
        logits = self.round_logits(torch.full_like(y, self.config.mask_id), *self.encode_text(text_tokens))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def loss_1(self, text_tokens, y, rand, **extra):
        """Section 3.2, #1: mask k ~ U(0, n] positions, predict them."""
        mask = self.training_mask(y, rand)
        logits = self.round_logits(torch.where(mask, self.config.mask_id, y), *self.encode_text(text_tokens))
        return F.cross_entropy(logits[mask], y[mask])

    # Passes 1 of #2 and #3. The paper does not say how the predicted tokens are chosen
    # nor whether gradients flow through pass 1. Default: argmax under no_grad.
    # - argmax: the inputs of pass 2 then look like the committed tokens of inference,
    #   which are the most probable ones (top-ranked by P_obs); "sample" draws instead.
    # - no gradient: Y_pred / Y_mix are discrete tokens, so no gradient reaches pass 1
    #   without an estimator the paper does not mention; Algorithm 2 line 9 computes the
    #   loss of pass 2 only. no_grad also skips pass 1's backward and activations (a #3
    #   step costs ~4/3 of a #1 step instead of 2x). pass1_grad=True lets gradients in
    #   through a straight-through one-hot (forward values unchanged).

    def loss_2(self, text_tokens, y, rand, **extra):
        """Section 3.3, #2: pass 1 fills the masked positions -> Y_mix; then #1 on Y_mix."""
        text_kv, text_mask = self.encode_text(text_tokens)  # once, shared by both passes
        M = self.config.mask_id
        mask1 = self.training_mask(y, rand)  # random positions ~ U(0, |Y|]
        pred, st = self._pass1(torch.where(mask1, M, y), text_kv, text_mask, rand)  # fill them
        y_mix = torch.where(mask1, pred, y)  # ground truth + predictions
        mask2 = self.training_mask(y, rand)  # then #1 on Y_mix: loss on the masked positions
        x = self._embed_mixed(torch.where(mask2, M, y_mix), st, mask1 & ~mask2)
        logits = self._decode(x, text_kv, text_mask)
        return F.cross_entropy(logits[mask2], y[mask2])

    def loss_3(self, text_tokens, y, rand, **extra):
        """Section 3.4, #3: Algorithm 2, line by line."""
        text_kv, text_mask = self.encode_text(text_tokens)  # once, shared by both passes
        M = self.config.mask_id
        mask1 = self.training_mask(y, rand)  # lines 3-4: r ~ U(0, 1], k positions
        y_mask = torch.where(mask1, M, y)  # line 5: Y_mask
        y_pred, st = self._pass1(y_mask, text_kv, text_mask, rand)  # line 6: Y_pred, all positions
        # Line 6 read literally lets pass 1 overwrite the tokens it was shown. But only pass 2
        # is trained, and its inputs then never hold a true token: a fresh model predicts
        # background everywhere, pass 2 learns to ignore its input, and pass 1, the same
        # model, keeps predicting background. Measured on the shapes world: after 1,000 steps
        # the loss sat at the unigram entropy and a foreground token with 95 % of its context
        # visible still cost 6.8 nats (uniform over the codes in use). A model that reads its
        # input returns the shown tokens unchanged, so by default we keep them: Y_obs then
        # mixes true tokens, pass-1 mistakes and [mask], as Section 3.4 describes.
        seen = ~mask1 if self.config.pass1_keep_seen else torch.zeros_like(mask1)
        y_pred = torch.where(seen, y, y_pred)
        mask2 = self.training_mask(y, rand)  # line 7: another ratio, mask Y_pred -> Y_obs
        x = self._embed_mixed(torch.where(mask2, M, y_pred), st, ~mask2 & ~seen)
        logits = self._decode(x, text_kv, text_mask)  # line 8: predict all positions
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # line 9: loss on all positions
        if self.beyond is not None:  # beyond the paper: an extra term on pass 2 (extensions.py)
            loss = loss + self.beyond.extra_loss(self, text_tokens, x, y, logits, **extra)
        return loss

    def _pass1(self, inputs, text_kv, text_mask, rand):
        """First pass of #2 / #3: tokens predicted at every position, and (with pass1_grad)
        the straight-through one-hot [B, n, K] that carries gradients, else None."""
        grad = self.config.pass1_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            logits = self.round_logits(inputs, text_kv, text_mask)  # (B, n, K)
            if self.config.pass1 == "sample":
                pred, _ = sample_tokens(logits, rand(*inputs.shape), 1.0)
            else:
                pred = logits.argmax(-1)
            if not grad:
                return pred, None
            probs = logits.softmax(-1)
            one_hot = F.one_hot(pred, probs.shape[-1]).to(probs.dtype)
            return pred, one_hot + probs - probs.detach()

    def _embed_mixed(self, tokens, st, predicted):
        """Embed pass 2's input; with a straight-through one-hot, predicted positions use it."""
        x = self.tok_emb(tokens)  # (B, n, D)
        if st is not None:
            soft = st @ self.tok_emb.weight[: self.config.codebook_size]  # (B, n, D), same values
            x = torch.where(predicted[..., None], soft, x)
        return x + self.pos_emb

    # -- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        text_tokens: torch.Tensor,
        steps: int = 16,
        algorithm=None,
        schedule: str = "cosine",
        temperature: float = 1.0,
        num_candidates: int = 1,
        guidance_scale: float = 1.0,
        negative_tokens: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_history: bool = False,
        init_tokens: torch.Tensor | None = None,
        keep_mask: torch.Tensor | None = None,
        choice_temperature: float = 4.5,
        use_cache: bool = True,
    ):
        """Image tokens for each caption: LongTensor[B * num_candidates, n].

        text_tokens[B, L]; rows b * num_candidates + j hold candidate j of caption b.
        algorithm: 1, 3, "full" or "ar" (default: the one of self.variant, Algorithm 3 when
        unknown); steps = T; schedule = tau() (Section 4.7: cosine at inference);
        temperature of token sampling (0 = argmax); choice_temperature: scale of the Gumbel
        noise on the confidences, annealed linearly to 0 (4.5, MaskGIT's value);
        guidance_scale 1 = off, else the unconditional pass reads `negative_tokens` (or the
        empty caption) in the same batch; init_tokens[B, n] + keep_mask[B, n] fix tokens
        from round 0 (editing) and the schedule fills the rest; use_cache: AR only, the
        key/value cache (False re-runs the prefix every step, for the benchmark).
        With return_history=True returns (tokens, history[T, B', n]): Y_obs after each
        round (for AR, only the final map).
        """
        if algorithm is None:
            algorithm = DEFAULT_ALGORITHM[self.variant] if self.variant is not None else 3
        algorithm = parse_algorithm(algorithm)
        if num_candidates < 1:
            raise EmageError(f"num_candidates must be at least 1, got {num_candidates}")
        c, dev = self.config, text_tokens.device
        B = text_tokens.shape[0] * num_candidates
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)  # noqa: E731
        # The text encoder and every layer's cross-attention keys/values: once per caption.
        text_kv, text_mask = self._generation_text(text_tokens, num_candidates, guidance_scale, negative_tokens)

        def predict(tokens, causal=False, caches=None):  # one round; guidance = one doubled batch
            if guidance_scale == 1.0:
                return self._decode(self._embed(tokens, caches), text_kv, text_mask, causal, caches)
            both = torch.cat([tokens, tokens])  # (2B', S): conditional rows, then unconditional
            cond, uncond = self._decode(self._embed(both, caches), text_kv, text_mask, causal, caches).chunk(2)
            return guided_logits(cond, uncond, guidance_scale)

        if algorithm == "ar":
            if init_tokens is not None or keep_mask is not None:
                raise EmageError("editing (init_tokens/keep_mask) needs algorithm 1 or 3, not ar")
            tokens = self._generate_ar(predict, rand(B, c.n), temperature, use_cache)
            return (tokens, tokens[None]) if return_history else tokens
        if algorithm == "full":  # Section 3.1: one pass, i.e. Algorithm 1 with T = 1
            steps = 1

        # Algorithms 1 and 3, line 1: Y_obs = [mask] * n, P_obs = 0 (nothing committed yet)
        tokens, fixed = self._initial_tokens(B, init_tokens, keep_mask, num_candidates, dev)
        committed = fixed.clone()
        n_fixed = fixed.sum(-1)  # (B',) editing: only the other positions follow the schedule
        counts = commit_counts(schedule, steps, (c.n - n_fixed).cpu()).to(dev) + n_fixed  # (T, B')
        history = []
        for t in range(1, steps + 1):  # line 2: while t <= T
            u_token, u_confidence = rand(B, c.n), rand(B, c.n)
            # line 3: the model takes X and Y_obs and predicts tokens with probabilities P_obs
            sampled, p_obs = sample_tokens(predict(tokens), u_token, temperature)
            confidence = gumbel_confidence(p_obs, u_confidence, choice_temperature * (1 - t / steps))
            # lines 4-5: keep the top floor(tau(t/T) n) tokens, committed ones first (P_obs = 1)
            if algorithm == 3:
                tokens, committed = commit_algorithm3(tokens, committed, fixed, sampled, confidence, counts[t - 1], c.mask_id)
            else:
                tokens, committed = commit_algorithm1(tokens, committed, sampled, confidence, counts[t - 1], c.mask_id)
            history.append(tokens)
        return (tokens, torch.stack(history)) if return_history else tokens  # line 8: return Y_obs

    def _embed(self, tokens, caches=None):
        """Token + position embeddings; with an AR cache, positions continue after the cached ones."""
        start = caches[0].get("length", 0) if caches is not None else 0
        return self.tok_emb(tokens) + self.pos_emb[start : start + tokens.shape[1]]  # (B, S, D)

    def _generation_text(self, text_tokens, num_candidates, scale, negative_tokens):
        """encode_text once per caption, rows repeated per candidate; with guidance (scale != 1)
        the conditional rows [B'] are followed by the unconditional rows [B']."""
        if scale == 1.0:
            kv, mask = self.encode_text(text_tokens)
            return kv.repeat_interleave(num_candidates, 0), mask.repeat_interleave(num_candidates, 0)
        B, L = text_tokens.shape
        if negative_tokens is None:
            negative_tokens = self.empty_caption(B, L, text_tokens.device)
        if negative_tokens.dim() != 2 or negative_tokens.shape[0] not in (1, B):
            raise EmageError(f"negative tokens must be [1 or {B}, length], got {tuple(negative_tokens.shape)}")
        L = max(L, negative_tokens.shape[1])  # pad the shorter with 0: padding, masked out
        pad = lambda t: F.pad(t.expand(B, -1), (0, L - t.shape[1]))  # noqa: E731
        kv, mask = self.encode_text(torch.cat([pad(text_tokens), pad(negative_tokens)]))  # (2B, ...)
        rows = lambda t: torch.cat([h.repeat_interleave(num_candidates, 0) for h in t.chunk(2)])  # noqa: E731
        return rows(kv), rows(mask)  # (2B', ...)

    def _initial_tokens(self, B, init_tokens, keep_mask, num_candidates, dev):
        """Line 1: all [mask]; for editing, the kept tokens of init_tokens are fixed from the start."""
        n, mask_id = self.config.n, self.config.mask_id
        tokens = torch.full((B, n), mask_id, dtype=torch.long, device=dev)
        if init_tokens is None and keep_mask is None:
            return tokens, torch.zeros(B, n, dtype=torch.bool, device=dev)
        if init_tokens is None or keep_mask is None:
            raise EmageError("editing needs both init_tokens and keep_mask")
        if init_tokens.shape != keep_mask.shape or tuple(init_tokens.shape) != (B // num_candidates, n):
            raise EmageError(f"init_tokens and keep_mask must both be [{B // num_candidates}, {n}]")
        init = init_tokens.to(dev).repeat_interleave(num_candidates, 0)
        keep = keep_mask.to(dev).bool().repeat_interleave(num_candidates, 0)
        return torch.where(keep, init, tokens), keep

    def _generate_ar(self, predict, u, temperature, use_cache: bool) -> torch.Tensor:
        """Autoregressive baseline: n sequential steps from the start token [mask] at position 0.

        With the cache each step feeds one token and attends to the cached keys/values;
        without it (for the benchmark) each step re-runs the causal decoder on the prefix.
        u[B', n]: column i samples token i.
        """
        B, n = u.shape
        x = torch.full((B, 1), self.config.mask_id, dtype=torch.long, device=u.device)  # start token
        caches = [{"size": n} for _ in self.blocks] if use_cache else None  # positions to make room for
        for i in range(n):
            logits = predict(x[:, -1:], causal=True, caches=caches) if use_cache else predict(x, causal=True)
            token, _ = sample_tokens(logits[:, -1:], u[:, i : i + 1], temperature)  # (B', 1)
            x = torch.cat([x, token], 1)
        return x[:, 1:]  # (B', n)


# ----------------------------------------------------------------------------------------
# Checkpoints: a directory with config.json + model.safetensors
# ----------------------------------------------------------------------------------------


def load_tokenizer(path):
    """The caption tokenizer a checkpoint keeps beside it: BERT's WordPiece for a vocab.txt
    (Table 5's BERT tower), else CLIP's BPE (None: CLIP's own file, found as clip_text.find_bpe finds it)."""
    return WordPiece(path) if path is not None and Path(path).name == VOCAB_FILE_NAME else Tokenizer(path)


def save_checkpoint(model: Emage, out_dir, *, variant, step: int, tokenizer_path, vqgan_dir, extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ a copy of the tokenizer vocabulary) to out_dir.

    config.json holds the EmageConfig, the variant, the step, the VQGAN checkpoint dir
    relative to out_dir, the vocabulary file name and, for a model with extensions, their
    settings under "beyond".
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise EmageError(f"tokenizer vocabulary {tokenizer_path} does not exist; pass the BPE file the captions were encoded with")
    if tokenizer_path.resolve() != (out / tokenizer_path.name).resolve():
        atomic_write(out / tokenizer_path.name, lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    info = {
        "config": model.config.to_dict(),
        "variant": parse_variant(variant),
        "step": int(step),
        "vqgan_dir": os.path.relpath(Path(vqgan_dir).resolve(), out.resolve()),
        "tokenizer": tokenizer_path.name,
        "extra": extra or {},
    }
    if model.beyond is not None:  # what extensions.load_checkpoint needs to rebuild it
        info["beyond"] = model.beyond.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp))
    write_json(out / "config.json", info)
    return out


def load_checkpoint(ckpt_dir, map_location="cpu", make_beyond=None) -> tuple[Emage, dict]:
    """Rebuild the model from config.json and load model.safetensors strictly.

    Returns (model in eval mode, info) with info = {variant, step, tokenizer_path,
    vqgan_dir (both absolute), extra}. make_beyond(meta) -> the `beyond` object of a
    checkpoint that uses extensions (extensions.load_checkpoint passes it); without it such
    a checkpoint is refused.

    Nothing is allocated before it is checked: config.json is read bounded and every field
    checked (EmageConfig.from_dict), the model is built on the meta device and its tensor
    names and shapes compared with the safetensors header (read without the tensors); only
    then are the weights read, straight into that skeleton. A hostile config.json (ten
    million layers, a 100,000 x 100,000 grid, a width of 2**40) fails in milliseconds.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(ckpt_dir)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise EmageError(f"{d} is not an Emage checkpoint (needs config.json and model.safetensors)")
    try:
        meta = read_json(d / "config.json")
    except FileError as e:
        raise EmageError(f"{e}; copy the checkpoint again") from None
    if not isinstance(meta, dict) or "config" not in meta or "tokenizer" not in meta or "vqgan_dir" not in meta:
        raise EmageError(f"{d / 'config.json'} lacks the config, tokenizer or vqgan_dir entry; was it written by save_checkpoint?")
    where = d / "config.json"
    tokenizer, vqgan_dir = meta["tokenizer"], meta["vqgan_dir"]
    if (not isinstance(tokenizer, str) or not 0 < len(tokenizer) <= 255 or tokenizer in (".", "..")
            or any(c in tokenizer for c in "/\\\0")):
        raise EmageError(f"{where}: tokenizer must be the file name of the vocabulary beside it, got {shown(tokenizer)}")
    if not (d / tokenizer).is_file():
        raise EmageError(f"{d / tokenizer} is missing: config.json names it as the caption vocabulary; "
                         "copy the checkpoint again")
    if not isinstance(vqgan_dir, str) or not vqgan_dir or "\0" in vqgan_dir or len(vqgan_dir) > 4096:
        raise EmageError(f"{where}: vqgan_dir must be a path relative to the checkpoint, got {shown(vqgan_dir)}")
    variant = meta.get("variant")
    if variant is not None and not (is_whole(variant) or (isinstance(variant, str) and len(variant) <= 8)):
        raise EmageError(f"{where}: unknown variant {shown(variant)}; choose one of full, 1, 2, 3, ar")
    step = meta.get("step", 0)
    if not is_whole(step) or not 0 <= step < 2**63:
        raise EmageError(f"{where}: step must be a whole number >= 0, got {shown(step)}")
    if not isinstance(meta.get("extra", {}), dict) or not isinstance(meta.get("beyond") or {}, dict):
        raise EmageError(f"{where}: extra and beyond must be objects of fields")
    if make_beyond is None and meta.get("beyond"):
        raise EmageError(f"{d} uses features beyond the paper ({', '.join(map(str, meta['beyond']))[:120]}): "
                         "load it with extensions.load_checkpoint")
    try:
        beyond = make_beyond(meta) if make_beyond is not None else None
        config = EmageConfig.from_dict(meta["config"])
        with meta_device():  # shapes only: nothing allocated, nothing initialised
            model = Emage(config, variant=variant, beyond=beyond)
    except EmageError as e:
        raise EmageError(f"{where}: {e}") from None
    expected = model.state_dict()
    weights = d / "model.safetensors"
    try:
        stored = safetensors_header(weights)
    except FileError as e:
        raise EmageError(f"{e}; copy the checkpoint again") from None
    for name, tensor in expected.items():
        if name not in stored:
            raise EmageError(f"{d}: tensor {name} is missing from model.safetensors; config.json and the weights disagree")
        if stored[name][1] != tuple(tensor.shape):
            raise EmageError(f"{d}: tensor {name} has shape {stored[name][1]}, config.json implies {tuple(tensor.shape)}")
        if not stored[name][0].startswith(("F", "BF")):
            raise EmageError(f"{d}: tensor {name} holds {stored[name][0]}, not floating-point weights")
    for name in stored:
        if name not in expected:
            raise EmageError(f"{d}: unexpected tensor {shown(name, 80)} in model.safetensors; config.json and the weights disagree")
    try:
        state = load_file(str(weights), device=str(map_location))
    except SafetensorError as e:
        raise EmageError(f"{weights} is damaged or not a safetensors file ({e}); copy the checkpoint again") from None
    state = {name: tensor.to(expected[name].dtype) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)  # the loaded tensors become the parameters
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise EmageError(f"{d}: the weights leave part of the model unset; config.json and the weights disagree")
    model.eval()
    info = {
        "variant": model.variant,
        "step": step,
        "tokenizer_path": str((d / tokenizer).resolve()),
        "vqgan_dir": str((d / vqgan_dir).resolve()),
        "vqgan_relative": vqgan_dir,
        "extra": meta.get("extra", {}),
    }
    return model.to(map_location), info


# ----------------------------------------------------------------------------------------
# Command line: parameter counts of the presets
# ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description="Print the parameter count of an Emage preset (built on the meta device: no memory, no weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=["paper", "shapes"], default="paper", help="EmageConfig preset")
    args = p.parse_args(argv)
    with torch.device("meta"):
        model = Emage(getattr(EmageConfig, args.preset)())
    total = sum(t.numel() for t in model.parameters())
    text = sum(t.numel() for t in model.text_encoder.parameters())
    print(f"{args.preset}: {total / 1e6:.1f}M parameters (text encoder {text / 1e6:.1f}M, decoder {(total - text) / 1e6:.1f}M)")
    if args.preset == "paper":
        print("the paper reports 346M (Tables 3 and 4)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
