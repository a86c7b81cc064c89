"""CLIP's text side, from scratch: byte-level BPE tokenizer and text Transformer.

The paper reads captions through the text tower of CLIP ViT-L/14 (width 768,
12 layers, 12 heads, context 77, vocabulary 49408) and found that starting from
CLIP's weights is what made the non-autoregressive generator train (Table 5).
This file rebuilds that tower so that public checkpoints load into it exactly:

    Tokenizer(bpe_path)            caption -> ids, the same ids as OpenAI's tokenizer; bpe_path is
                                   bpe_simple_vocab_16e6.txt.gz, a Hugging Face merges.txt, or a folder holding one
    TextEncoder(TextConfig)        tokens[B, L] -> (states[B, L, width], pooled[B, embed_dim])
    load_clip_text(path)           OpenAI state dict / TorchScript, Hugging Face, or native dir
    save_clip_text(encoder, dir)   native format: config.json + model.safetensors

Command line:
    python clip_text.py convert SRC OUT_DIR              any supported checkpoint -> native dir (a Hugging
                                                         Face folder's merges.txt and vocab.json come along)
    python clip_text.py convert ViT-L-14.pt OUT_DIR --trust-torchscript   OpenAI's TorchScript release
    python clip_text.py encode --checkpoint DIR [--bpe FILE_OR_DIR] "text"   token ids and the pooled norm

Small vocabularies in the same file format are learnt by shapes_tokenizers.learn_bpe.
"""
from __future__ import annotations

import argparse
import gzip
import html
import importlib.util
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

from files import FileError, atomic_write, check_output, read_json, write_json


class ClipTextError(ValueError):
    """A user error in this module: a missing vocabulary, an unreadable checkpoint, ..."""


# ----------------------------------------------------------------------------------------
# Byte-level BPE tokenizer
# ----------------------------------------------------------------------------------------

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"  # the file OpenAI CLIP and open_clip ship
BPE_ENV = "EMAGE_CLIP_BPE"  # environment variable naming a vocabulary file (or a folder holding one)
HF_MERGES, HF_VOCAB = "merges.txt", "vocab.json"  # a Hugging Face CLIP folder's BPE: the same merges, and their ids
# OpenAI's file lists some 262,000 merges but CLIP reads only the first 49152 - 256 - 2 of them,
# which gives 512 byte tokens + 48,894 merges + 2 special tokens = 49,408 ids.
MAX_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # always the last two ids: EOT is the largest
END_OF_WORD = "</w>"
# CLIP's pre-tokenisation: special tokens, English contractions, runs of letters, single
# digits, runs of other non-space characters. The text is lower-cased before it is applied.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _byte_to_char() -> dict[int, str]:
    """Each of the 256 bytes as one printable unicode character (GPT-2's reversible byte map).

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, soft hyphen, ...) take the code points 256,
    257, ... in byte order, so no BPE symbol ever contains a space or a newline.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def clean_text(text: str) -> str:
    """CLIP's normalisation: ftfy fix-up, HTML unescaped twice, whitespace runs -> one space, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def word_symbols(word: str) -> list[str]:
    """A pre-token's bytes as BPE symbols, the last one marked as the end of a word."""
    chars = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
    return [*chars[:-1], chars[-1] + END_OF_WORD]


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every occurrence of `pair`, scanning left to right without overlaps."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def find_bpe(path: str | os.PathLike | None = None) -> Path:
    """The vocabulary file: `path`, else $EMAGE_CLIP_BPE, else the copy inside an installed
    `open_clip` or `clip` package (located with importlib, without importing the package).

    `path` (and the variable) may name the file, or a folder holding one: a Hugging Face CLIP
    folder such as openai/clip-vit-large-patch14 (its merges.txt), or a folder with OpenAI's
    bpe_simple_vocab_16e6.txt.gz (vocabulary_in)."""
    for given, origin in ((path, "--bpe"), (os.environ.get(BPE_ENV) or None, f"${BPE_ENV}")):
        if given is not None:
            return vocabulary_in(given, origin)
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise ClipTextError(
        f"no CLIP BPE vocabulary found: pass --bpe with {BPE_FILE_NAME}, a Hugging Face CLIP folder "
        f"(its {HF_MERGES} is the vocabulary) or a folder holding either; or set {BPE_ENV} to one; "
        "or `pip install --no-deps open_clip_torch` (its wheel ships the file)"
    )


def vocabulary_in(path: str | os.PathLike, origin: str = "--bpe") -> Path:
    """A vocabulary file as given, or the one inside a folder: a Hugging Face CLIP folder's
    merges.txt, else bpe_simple_vocab_16e6.txt.gz. `origin` names the flag in errors."""
    given = Path(path)
    if given.is_dir():
        for name in (HF_MERGES, BPE_FILE_NAME):
            if (given / name).is_file():
                return given / name
        if (given / "tokenizer.json").is_file():  # transformers >= 5 saves only this file
            raise ClipTextError(f"{origin} {given} holds tokenizer.json but no {HF_MERGES}; write it (and {HF_VOCAB}) "
                                "beside it with python -c \"import sys, tokenizers; tokenizers.Tokenizer.from_file("
                                f"sys.argv[1] + '/tokenizer.json').model.save(sys.argv[1])\" {given}")
        raise ClipTextError(f"{origin} {given} is a folder without {HF_MERGES} (a Hugging Face CLIP folder) "
                            f"or {BPE_FILE_NAME}; pass the vocabulary file or a folder holding it")
    if not given.is_file():
        raise ClipTextError(f"{origin} {given} is not a file or a folder; pass {BPE_FILE_NAME}, a Hugging Face "
                            f"CLIP folder or its {HF_MERGES}")
    return given


def vocabulary_beside(checkpoint: str | os.PathLike | None) -> Path | None:
    """The vocabulary a checkpoint folder ships (a Hugging Face CLIP folder's merges.txt, the
    file a native whole CLIP's config.json names, or a bpe_simple_vocab_16e6.txt.gz beside the
    weights), else None (also for a weights file)."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return None
    folder = Path(checkpoint)
    names = [HF_MERGES, BPE_FILE_NAME]
    try:
        meta = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    except FileError:
        meta = None
    named = meta.get("tokenizer") if isinstance(meta, dict) and meta.get("format") == WHOLE_CLIP_FORMAT else None
    if isinstance(named, str) and named == Path(named).name and named not in ("", ".", ".."):  # a plain name only
        names.insert(1, named)
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges of a vocabulary file, gzipped or plain: a header line, then one "a b" per line."""
    data = Path(path).read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":  # gzip magic number
            data = gzip.decompress(data)
        lines = data.decode("utf-8").split("\n")[1 : 1 + MAX_MERGES]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ClipTextError(f"{path} is not a readable BPE vocabulary ({e}); pass {BPE_FILE_NAME} or a vocabulary in its format") from None
    while lines and not lines[-1].strip():
        lines.pop()
    merges = []
    for number, line in enumerate(lines, start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ClipTextError(f"line {number} of {path} is {line!r}, not a merge \"a b\"; is this a CLIP BPE file?")
        merges.append(pair)
    return merges


def check_hf_vocab(merges_path: Path, vocab_size: int) -> None:
    """A Hugging Face folder's vocab.json (beside its merges.txt) must list as many ids as the
    merges give (512 byte symbols + merges + 2 special tokens): files of two tokenizers, or a
    cut merges.txt, would otherwise give other ids than the text tower was trained with."""
    vocab_json = merges_path.with_name(HF_VOCAB)
    if merges_path.name != HF_MERGES or not vocab_json.is_file():
        return
    try:
        size = len(json.loads(vocab_json.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise ClipTextError(f"{vocab_json} is not a readable vocabulary ({e}); download the folder again") from None
    if size != vocab_size:
        raise ClipTextError(f"{vocab_json} lists {size} tokens but {merges_path} gives {vocab_size} ids (512 bytes + "
                            f"{vocab_size - 514} merges + 2 special tokens); the two files do not belong together")


class Tokenizer:
    """CLIP's byte-level BPE: text -> ids identical to OpenAI's `simple_tokenizer`.

    Ids: 256 byte symbols, the same 256 ending a word ("</w>"), one id per merge in file
    order, then the start and end tokens, so the end token has the largest id.
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None):
        self.path = find_bpe(bpe_path)  # a file, or found in a folder (find_bpe)
        merges = read_merges(self.path)
        # Byte symbols in code point order: the printable bytes first, then the 68 remapped ones
        # (the order of CLIP's vocabulary, so 'a' is id 64 and 'a</w>' is id 256 + 64).
        byte_symbols = sorted(BYTE_TO_CHAR.values())
        vocab = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + [a + b for a, b in merges] + [SOT, EOT]
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}  # a repeated symbol keeps its last id, as in CLIP
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank = merged earlier
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = len(vocab) - 2, len(vocab) - 1
        check_hf_vocab(self.path, self.vocab_size)
        self._cache: dict[str, list[str]] = {}
        self._warned_truncation = False

    def bpe(self, word: str) -> list[str]:
        """Split one pre-token into vocabulary symbols: apply the earliest-learned merge present until none is left."""
        if word in (SOT, EOT):  # CLIP maps the literal special-token strings to their ids
            return [word]
        if word not in self._cache:
            symbols = word_symbols(word)
            while len(symbols) > 1:
                pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, MAX_MERGES))
                if pair not in self.ranks:
                    break
                symbols = merge_pair(symbols, pair)
            if len(self._cache) > 100_000:  # bound the memory a long-running job spends on it
                self._cache.clear()
            self._cache[word] = symbols
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """Caption -> ids, without the start and end tokens."""
        return [self.encoder[s] for word in WORD_PATTERN.findall(clean_text(text)) for s in self.bpe(word)]

    def decode(self, ids) -> str:
        """Ids -> text; every end of word becomes a space (so the text ends with one), as in CLIP."""
        try:
            symbols = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as e:
            raise ClipTextError(f"id {e.args[0]} is outside this vocabulary of {self.vocab_size} ids") from None
        data = bytearray(CHAR_TO_BYTE[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        """Captions -> LongTensor[B, context_length]: start, ids, end, then 0 as padding.

        An over-long caption is cut to `context_length` ids whose last is still the end token
        (CLIP's truncation); a warning says so once per tokenizer.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ClipTextError(f"context_length {context_length} leaves no room for the start and end tokens; use >= 2")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (B, L)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                if not self._warned_truncation:
                    warnings.warn(f"caption of {len(ids)} tokens cut to {context_length}: {text[:60]!r}...")
                    self._warned_truncation = True
                ids = ids[: context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


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
    causal: bool = True  # CLIP's mask; False: every token sees the whole caption (for towers trained from scratch)

    @classmethod
    def vit_b32(cls) -> "TextConfig":
        """The text tower of OpenAI CLIP ViT-B/32 (also ViT-B/16)."""
        return cls(vocab_size=49408, context_length=77, width=512, heads=8, layers=12, embed_dim=512)

    @classmethod
    def vit_l14(cls) -> "TextConfig":
        """The text tower of OpenAI CLIP ViT-L/14, the one the paper uses (Section 4)."""
        return cls(vocab_size=49408, context_length=77, width=768, heads=12, layers=12, embed_dim=768)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as CLIP does, then cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()  # also when the model was cast to fp16/bf16
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


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

    Attention is causal as in CLIP, so the states of the caption's tokens never see the
    padding after the end token. With config.causal False every token sees the whole caption
    (a word sees the words after it) and the padding is masked out. `pooled` is the final
    state at the end token, found as `tokens.argmax(-1)` because the end token has the
    largest id of the vocabulary, times the projection: exactly CLIP's `encode_text`.
    Parameter names mirror OpenAI's checkpoint one to one.
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

    def attention_mask(self, end: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask: causal [L, L] (CLIP's build_attention_mask), or [B, 1, 1, L] hiding the padding."""
        position = torch.arange(L, device=end.device)
        if self.config.causal:
            hidden = position[None, :] > position[:, None]  # (L, L) token i attends to tokens 0..i
        else:
            hidden = (position[None, :] > end[:, None])[:, None, None, :]  # (B, 1, 1, L) keys after the end token
        return torch.zeros(hidden.shape, dtype=dtype, device=end.device).masked_fill(hidden, float("-inf"))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = tokens.shape
        if L > self.config.context_length:
            raise ClipTextError(
                f"{L} tokens per caption but the encoder has {self.config.context_length} positions; "
                f"tokenize with context_length={self.config.context_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, D)
        end = tokens.argmax(dim=-1)  # (B,) position of the end token
        x = self.transformer(x, self.attention_mask(end, L, x.dtype))  # (B, L, D)
        states = self.ln_final(x)  # (B, L, D)
        pooled = states[torch.arange(B, device=tokens.device), end] @ self.text_projection  # (B, P)
        return states, pooled

    # The two questions Emage asks of its text tower (bert_text.BertEncoder answers them too):

    def states_and_mask(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states[B, L, D], valid[B, L] bool: True up to and including the end token)."""
        valid = torch.arange(tokens.shape[1], device=tokens.device) <= tokens.argmax(-1, keepdim=True)  # (B, L)
        return self(tokens)[0], valid

    def empty_caption(self, batch: int, length: int, device=None) -> torch.Tensor:
        """The empty caption [sot, eot, 0, ...]: CLIP's start and end ids are the two largest."""
        tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
        tokens[:, 0], tokens[:, 1] = self.config.vocab_size - 2, self.config.vocab_size - 1
        return tokens

# ----------------------------------------------------------------------------------------
# Checkpoints: native, OpenAI, Hugging Face
# ----------------------------------------------------------------------------------------

NATIVE_FORMAT = "emage.clip_text"  # the "format" field of a native config.json
WHOLE_CLIP_FORMAT = "emage.clip"  # clip_image.py's native whole CLIP (text.* and visual.* keys); its text tower loads
# Parts of a full CLIP checkpoint that are not the text tower, skipped on purpose: the image
# tower and the contrastive temperature; OpenAI's TorchScript archive also keeps three
# hyper-parameters as tensors, and open_clip saves its causal mask.
OPENAI_SKIPPED = ("visual.", "logit_scale", "input_resolution", "context_length", "vocab_size", "attn_mask")
HF_SKIPPED = ("vision_model.", "visual_projection.", "logit_scale", "text_model.embeddings.position_ids")
HF_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")  # the children of `text_model`


def save_clip_text(encoder: TextEncoder, out_dir: str | os.PathLike) -> None:
    """Write the native format: config.json (the TextConfig) + model.safetensors, each atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    write_json(out / "config.json", {"format": NATIVE_FORMAT, "config": asdict(encoder.config)})
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp))


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder and `constants.pkl`."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_tensors(path: Path, trust_torchscript: bool) -> dict[str, torch.Tensor]:
    """The tensors of one weights file, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        if not trust_torchscript:
            raise ClipTextError(
                f"{path} is a TorchScript archive, and loading TorchScript can run code from the file; "
                "if you trust it pass trust_torchscript=True (--trust-torchscript), then `convert` it once"
            )
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects other than tensors, or not a checkpoint at all
        raise ClipTextError(f"{path} is not a weights-only state dict ({type(e).__name__}); convert it to safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # open_clip training checkpoints
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ClipTextError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _native_config(fields, state: dict[str, torch.Tensor], config_path: Path) -> TextConfig:
    """A native config.json's TextConfig, accepted only where it agrees with the weights' shapes
    (so that no size the file claims is allocated before the weights vouch for it)."""
    try:
        config = TextConfig(**fields)
        expected = replace(_config_from_shapes(state, config.heads), causal=config.causal)
        if not (isinstance(config.heads, int) and 0 < config.heads and config.width % config.heads == 0
                and isinstance(config.causal, bool)):
            raise ValueError
    except (TypeError, KeyError, ValueError, IndexError, ClipTextError):
        raise ClipTextError(f"{config_path} does not describe the text tower beside it; convert the checkpoint again") from None
    if config != expected:
        raise ClipTextError(f"{config_path} says {config} but the weights have {expected}; convert the checkpoint again")
    return config


def _config_from_shapes(weights: dict[str, torch.Tensor], heads: int | None) -> TextConfig:
    """Rebuild the TextConfig from tensor shapes (in native/OpenAI key names), as CLIP's `build_model` does."""
    vocab_size, width = weights["token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in weights if k.startswith("transformer.resblocks.")})
    if heads is None and width % 64:
        raise ClipTextError(f"a text tower of width {width} has no 64-dimensional heads, the rule that gives the head "
                            "count of OpenAI's files; load it from a folder whose config.json names num_attention_heads")
    return TextConfig(
        vocab_size=vocab_size,
        context_length=weights["positional_embedding"].shape[0],
        width=width,
        heads=heads or width // 64,  # every OpenAI CLIP text tower uses 64-dimensional heads
        layers=layers,
        embed_dim=weights["text_projection"].shape[1],
    )


def openai_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI (and open_clip) key names are ours already: keep every text key, drop the rest."""
    return {k: v for k, v in state.items() if not k.startswith(OPENAI_SKIPPED)}


def hf_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text keys -> native keys; every text key is consumed or it is an error.

    q, k and v are separate Linear layers there and one fused `in_proj` here (stacked in that
    order); `text_projection` is a bias-free Linear there, a (width, embed_dim) matrix here.
    A CLIPTextModel has no projection: the identity stands in, so `pooled` is its pooler output.
    """
    if "embeddings.token_embedding.weight" in state:  # transformers 5 saves CLIPTextModel without the prefix
        state = {("text_model." + k if k.startswith(HF_TEXT_PARTS) else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(HF_SKIPPED)}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ClipTextError(f"Hugging Face checkpoint lacks {key}; is it a CLIP text model?")
        used.add(key)
        return state[key]

    t = "text_model."
    width = take(t + "final_layer_norm.weight").shape[0]
    out = {
        "token_embedding.weight": take(t + "embeddings.token_embedding.weight"),
        "positional_embedding": take(t + "embeddings.position_embedding.weight"),
        "ln_final.weight": state[t + "final_layer_norm.weight"],
        "ln_final.bias": take(t + "final_layer_norm.bias"),
    }
    out.update(hf_encoder_layers(state, t, take))
    if "text_projection.weight" in state:
        out["text_projection"] = take("text_projection.weight").t()  # (P, D) -> (D, P)
    else:
        out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    unused = sorted(set(state) - used)
    if unused:
        raise ClipTextError(f"{len(unused)} Hugging Face keys have no place in the text tower, e.g. {unused[:3]}")
    return out


def hf_encoder_layers(state: dict, prefix: str, take) -> dict[str, torch.Tensor]:
    """The Transformer layers of a Hugging Face CLIP tower (`prefix` "text_model." or
    "vision_model.") under OpenAI's names; `take(key)` fetches a tensor and marks it used.

    q, k and v are separate Linear layers there and one fused `in_proj` here, stacked in that order.
    """
    out = {}
    layers = len({k.split(".")[3] for k in state if k.startswith(prefix + "encoder.layers.")})
    for i in range(layers):
        src, dst = f"{prefix}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([take(src + f"self_attn.{p}_proj.{part}") for p in "qkv"])
            out[dst + f"attn.out_proj.{part}"] = take(src + f"self_attn.out_proj.{part}")
            out[dst + f"ln_1.{part}"] = take(src + f"layer_norm1.{part}")
            out[dst + f"ln_2.{part}"] = take(src + f"layer_norm2.{part}")
            out[dst + f"mlp.c_fc.{part}"] = take(src + f"mlp.fc1.{part}")
            out[dst + f"mlp.c_proj.{part}"] = take(src + f"mlp.fc2.{part}")
    return out


def _hf_text_config(config_path: Path) -> dict:
    """The text part of a Hugging Face config.json (CLIPModel nests it under "text_config")."""
    config = json.loads(config_path.read_text())
    text = config.get("text_config") or config
    # Keys left out of the file mean the CLIPTextConfig defaults (save_pretrained writes only differences).
    act, eps = text.get("hidden_act", "quick_gelu"), text.get("layer_norm_eps", 1e-5)
    if act != "quick_gelu" or eps != 1e-5:
        raise ClipTextError(f"{config_path}: hidden_act={act}, layer_norm_eps={eps}; only CLIP's quick_gelu and 1e-5 are built here")
    return text


def _build(weights: dict[str, torch.Tensor], config: TextConfig, source: Path) -> TextEncoder:
    """Assert every key and shape against a freshly built encoder, then load strictly (in fp32)."""
    with torch.device("meta"):  # shapes only: no time spent on a random initialisation
        encoder = TextEncoder(config)
    expected = encoder.state_dict()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ClipTextError(f"{source}: missing keys {missing[:3]}, unexpected keys {extra[:3]}; not a CLIP text tower?")
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise ClipTextError(f"{source}: {key} has shape {tuple(weights[key].shape)}, expected {tuple(value.shape)}")
    encoder.load_state_dict({k: v.float().contiguous() for k, v in weights.items()}, strict=True, assign=True)
    return encoder


def load_clip_text(path: str | os.PathLike, *, trust_torchscript: bool = False) -> TextEncoder:
    """A TextEncoder (fp32, eval mode) from any supported checkpoint:

    - a native directory (config.json with "format": "emage.clip_text" + model.safetensors), or
      clip_image.py's native whole CLIP ("emage.clip"), whose text tower is taken;
    - a Hugging Face CLIPModel, CLIPTextModel or CLIPTextModelWithProjection: a directory with
      config.json + model.safetensors (or pytorch_model.bin), or the weights file alone
      (heads then taken as width // 64, OpenAI's rule);
    - an OpenAI CLIP checkpoint: a plain state dict (.pt/.bin/.safetensors), or the TorchScript
      archive of the OpenAI release, which needs `trust_torchscript=True`.
    """
    path = Path(path)
    config_path, heads = None, None
    if path.is_dir():
        config_path = path / "config.json"
        weights_path = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights_path is None or not config_path.is_file():
            raise ClipTextError(f"{path} needs config.json and model.safetensors; is it a CLIP checkpoint directory?")
    elif path.is_file():
        weights_path = path
        config_path = path.with_name("config.json") if path.with_name("config.json").is_file() else None
    else:
        raise ClipTextError(f"checkpoint {path} does not exist")
    state = read_tensors(weights_path, trust_torchscript)
    native_config = None
    if config_path is not None:
        meta = read_json(config_path)  # bounded: a config.json handed in may be hostile
        if isinstance(meta, dict) and meta.get("format") == NATIVE_FORMAT:
            native_config = _native_config(meta.get("config"), state, config_path)
        elif isinstance(meta, dict) and meta.get("format") == WHOLE_CLIP_FORMAT:  # clip_image.py's: keep text.*
            state = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
            native_config = _native_config(meta.get("text"), state, config_path)
    if native_config is not None:
        return _build(state, native_config, path).eval()
    if any(k.startswith(("text_model.", "embeddings.token_embedding.")) for k in state):
        weights = hf_to_native(state)
        if config_path is not None:
            heads = _hf_text_config(config_path).get("num_attention_heads", 8)  # CLIPTextConfig's default
    elif "token_embedding.weight" in state:
        weights = openai_to_native(state)
    else:
        raise ClipTextError(f"{weights_path} has neither OpenAI nor Hugging Face CLIP text keys")
    return _build(weights, _config_from_shapes(weights, heads), path).eval()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _is_native_text_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("format") == NATIVE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _convert(args: argparse.Namespace) -> None:
    try:  # never over a folder it did not write; over its own earlier conversion only with --overwrite
        check_output(args.out_dir, args.overwrite, "folder", "OUT_DIR", ours=_is_native_text_folder)
    except FileError as error:
        raise ClipTextError(str(error)) from None
    encoder = load_clip_text(args.src, trust_torchscript=args.trust_torchscript)
    vocabulary = vocabulary_beside(args.src)  # a Hugging Face folder's merges.txt
    if vocabulary is not None:
        check_vocabulary(Tokenizer(vocabulary), encoder)
    save_clip_text(encoder, args.out_dir)
    if vocabulary is not None:  # so that `train.py --text-init OUT_DIR` finds the captions' vocabulary
        names = [vocabulary.name] + [HF_VOCAB] * (vocabulary.name == HF_MERGES and (vocabulary.parent / HF_VOCAB).is_file())
        for name in names:
            atomic_write(Path(args.out_dir) / name, lambda tmp, n=name: shutil.copyfile(vocabulary.parent / n, tmp))
    print(f"wrote {args.out_dir}: {encoder.config}" + (f", with the vocabulary {vocabulary.name}" if vocabulary else ""))


def check_vocabulary(tokenizer: Tokenizer, encoder: TextEncoder) -> None:
    if tokenizer.vocab_size != encoder.config.vocab_size:
        raise ClipTextError(
            f"the vocabulary {tokenizer.path} has {tokenizer.vocab_size} ids but the encoder "
            f"{encoder.config.vocab_size}; pass the matching --bpe"
        )


def _encode(args: argparse.Namespace) -> None:
    encoder = load_clip_text(args.checkpoint, trust_torchscript=args.trust_torchscript)
    tokenizer = Tokenizer(args.bpe or vocabulary_beside(args.checkpoint))
    check_vocabulary(tokenizer, encoder)
    tokens = tokenizer(args.texts, context_length=encoder.config.context_length)  # (B, L)
    with torch.no_grad():
        _, pooled = encoder(tokens)  # (B, P)
    for text, row, vector in zip(args.texts, tokens, pooled):
        ids = row[: int(row.argmax()) + 1].tolist()
        print(f"{text!r}\n  ids: {ids}\n  pooled norm: {vector.norm().item():.6f}")


BPE_HELP = (f"the captions' vocabulary: {BPE_FILE_NAME}, a Hugging Face CLIP folder (its {HF_MERGES}) or a folder "
            f"holding either (default: the checkpoint folder's own, else ${BPE_ENV}, else the file open_clip ships)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="any supported checkpoint -> native dir", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="OpenAI .pt / state dict (the ViT-L-14.pt release is TorchScript: add --trust-torchscript), "
                   "Hugging Face dir (openai/clip-vit-large-patch14) or weights file, or a native dir")
    p.add_argument("out_dir", help="where to write config.json + model.safetensors (+ a Hugging Face folder's merges.txt "
                   "and vocab.json, the captions' vocabulary)")
    p.add_argument("--trust-torchscript", action="store_true", help="allow OpenAI's TorchScript archive (it can run code)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR")
    p.set_defaults(run=_convert)

    p = commands.add_parser("encode", help="print token ids and the pooled vector's norm", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("texts", nargs="+", help="captions to encode")
    p.add_argument("--checkpoint", required=True, help="any checkpoint load_clip_text reads")
    p.add_argument("--bpe", default=None, help=BPE_HELP)
    p.add_argument("--trust-torchscript", action="store_true", help="allow OpenAI's TorchScript archive (it can run code)")
    p.set_defaults(run=_encode)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ClipTextError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
