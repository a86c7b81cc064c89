"""CLIP's text side, from scratch: byte-level BPE tokenizer, BPE learner, text Transformer.

The paper reads captions through the text tower of CLIP ViT-L/14 (width 768,
12 layers, 12 heads, context 77, vocabulary 49408) and found that starting from
CLIP's weights is what made the non-autoregressive generator train (Table 5).
This file rebuilds that tower so that public checkpoints load into it exactly:

    Tokenizer(bpe_path)            caption -> ids, the same ids as OpenAI's tokenizer
    learn_bpe(texts, size, path)   a small vocabulary in the same file format (shapes world)
    TextEncoder(TextConfig)        tokens[B, L] -> (states[B, L, width], pooled[B, embed_dim])
    load_clip_text(path)           OpenAI state dict / TorchScript, Hugging Face, or native dir
    save_clip_text(encoder, dir)   native format: config.json + model.safetensors

Command line:
    python clip_text.py convert SRC OUT_DIR              any supported checkpoint -> native dir
    python clip_text.py encode --checkpoint DIR "text"   token ids and the pooled vector's norm
    python clip_text.py learn-bpe --out FILE             learn a vocabulary (default: shapes captions)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClipTextError(ValueError):
    """A user error in this module: a missing vocabulary, an unreadable checkpoint, ..."""


# ----------------------------------------------------------------------------------------
# The text Transformer
# ----------------------------------------------------------------------------------------


@dataclass
class TextConfig:
    vocab_size: int = 49408  # BPE vocabulary: 256 bytes, 256 bytes + "</w>", merges, start, end
    context_length: int = 77  # positions in the positional embedding (longest token sequence)
    width: int = 768  # model dimension D of every residual block
    heads: int = 12  # attention heads; width must be divisible by heads
    layers: int = 12  # residual blocks
    embed_dim: int = 768  # size P of the pooled output after the text projection

    @classmethod
    def vit_b32(cls) -> "TextConfig":
        """The text tower of OpenAI CLIP ViT-B/32 (also ViT-B/16)."""
        return cls(vocab_size=49408, context_length=77, width=512, heads=8, layers=12, embed_dim=512)

    @classmethod
    def vit_l14(cls) -> "TextConfig":
        """The text tower of OpenAI CLIP ViT-L/14, the one the paper uses (Section 4)."""
        return cls(vocab_size=49408, context_length=77, width=768, heads=12, layers=12, embed_dim=768)

    @classmethod
    def shapes(cls) -> "TextConfig":
        """A small tower for the shapes world, over the vocabulary of `SHAPES_BPE_PATH`."""
        return cls(vocab_size=SHAPES_VOCAB_SIZE, context_length=24, width=128, heads=4, layers=3, embed_dim=128)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as CLIP does, then cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x), a cheap approximation of GELU kept for parity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with CLIP's parameter names (a fused `in_proj` for q, k, v)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, L, D)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The stack of residual blocks; its own module so parameter names read `transformer.resblocks.N.*` as in CLIP."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class TextEncoder(nn.Module):
    """CLIP's text tower: tokens[B, L] -> (states[B, L, width], pooled[B, embed_dim]).

    Attention is causal, so the states of the caption's tokens never see the padding after
    the end token. `pooled` is the final state at the end token, found as `tokens.argmax(-1)`
    because the end token has the largest id of the vocabulary, times the projection:
    exactly CLIP's `encode_text`. Parameter names mirror OpenAI's checkpoint one to one.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        if config.width % config.heads:
            raise ClipTextError(f"width {config.width} is not divisible by heads {config.heads}; pick another pair")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(config.width, config.heads, config.layers)
        self.ln_final = LayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        # -inf above the diagonal: token i attends to tokens 0..i (CLIP's build_attention_mask).
        causal = torch.full((config.context_length, config.context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's initialisation (its `initialize_parameters`), used when training from scratch."""
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = c.width**-0.5
        proj_std = c.width**-0.5 * (2 * c.layers) ** -0.5
        fc_std = (2 * c.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=c.width**-0.5)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = tokens.shape
        if L > self.config.context_length:
            raise ClipTextError(
                f"{L} tokens per caption but the encoder has {self.config.context_length} positions; "
                f"tokenize with context_length={self.config.context_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, D)
        mask = self.causal_mask[:L, :L].to(x.dtype)  # (L, L)
        x = self.transformer(x, mask)  # (B, L, D)
        states = self.ln_final(x)  # (B, L, D)
        end = tokens.argmax(dim=-1)  # (B,) position of the end token
        pooled = states[torch.arange(B, device=tokens.device), end] @ self.text_projection  # (B, P)
        return states, pooled


# Filled in below with the tokenizer; the shapes preset needs its vocabulary size.
SHAPES_VOCAB_SIZE = 512 + 2
