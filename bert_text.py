"""BERT as the caption encoder, from scratch: WordPiece tokenizer, post-LN Transformer, loader.

Table 5 of the paper compares text encoders for the non-autoregressive generator: CLIP's text
tower (clip_text.py, the one it keeps) against BERT. This file rebuilds BERT's encoder side so
that public Hugging Face checkpoints (bert-base-uncased and the like) load into it exactly:

    WordPiece(vocab_txt)          caption -> ids, the same ids as Hugging Face's (uncased) BertTokenizer
    BertConfig.from_hf(dict)      the fields of a Hugging Face BERT config.json this encoder needs
    BertEncoder(BertConfig)       tokens[B, L], attention_mask[B, L] -> states[B, L, hidden_size]
    load_bert(folder)             a Hugging Face BERT folder: config.json + model.safetensors / pytorch_model.bin
    load_wordpiece(folder)        the folder's vocab.txt as a WordPiece tokenizer

Only the encoder is rebuilt: the pooler and the pre-training heads (masked LM, next sentence)
of a checkpoint are skipped on purpose, since the generator reads the last hidden states.
There is no dropout: fine-tuning runs without it.

Command line:
    python bert_text.py encode FOLDER "text" ...     token ids and the shape of the states
    python bert_text.py tokenize FOLDER "text" ...   token ids and WordPiece pieces only (reads vocab.txt)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class BertError(ValueError):
    """A user error in this module: a missing folder or file, a damaged checkpoint, a shape mismatch, ..."""


# ----------------------------------------------------------------------------------------
# WordPiece tokenizer
# ----------------------------------------------------------------------------------------

VOCAB_FILE_NAME = "vocab.txt"  # one token per line, the line number (from 0) is its id
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
CONTINUATION = "##"  # prefix of a piece that continues a word rather than starting one
MAX_WORD_CHARS = 100  # a longer whitespace/punctuation-delimited word becomes a single [UNK]
# Code point ranges BERT counts as CJK ideographs (the CJK Unified Ideographs block, extensions
# A-E and the compatibility ideographs). Each such character becomes a word of its own. Hangul,
# kana and other scripts are not in here: they are split on spaces like Latin text.
CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
# BERT treats every non-letter, non-digit printable ASCII character as punctuation ("$", "^",
# "`", "+", ... are symbols to unicode, punctuation to BERT), plus unicode's P* categories.
ASCII_PUNCTUATION_RANGES = ((33, 47), (58, 64), (91, 96), (123, 126))


def is_whitespace(char: str) -> bool:
    """Space, tab, newline, carriage return, or a unicode space separator (category Zs)."""
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def is_control(char: str) -> bool:
    """A unicode "other" character (categories C*: controls, format, unassigned, private use,
    surrogates), except tab, newline and carriage return, which count as whitespace."""
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_punctuation(char: str) -> bool:
    """BERT's punctuation: the ASCII ranges 33-47, 58-64, 91-96, 123-126, or unicode category P*."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in ASCII_PUNCTUATION_RANGES) or unicodedata.category(char).startswith("P")


def is_cjk(char: str) -> bool:
    """Whether the character is a CJK ideograph by BERT's ranges (CJK_RANGES)."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def basic_tokenize(text: str, lower_case: bool = True) -> list[str]:
    """BERT's basic tokenizer: text -> words and punctuation marks, before WordPiece.

    1. drop NUL, U+FFFD and control characters; every whitespace character becomes a space;
    2. put spaces around each CJK ideograph;
    3. NFC-normalise, then split on whitespace (Python's notion, which also splits on U+2028/9);
    4. per word, when `lower_case`: lower-case, then strip accents (NFD, drop the Mn marks);
    5. split each word into runs of non-punctuation and single punctuation characters.
    """
    kept = []
    for char in text:
        if char in "\x00\ufffd" or is_control(char):
            continue
        kept.append(" " if is_whitespace(char) else char)
    spaced = "".join(f" {c} " if is_cjk(c) else c for c in kept)
    words = unicodedata.normalize("NFC", spaced).split()
    pieces: list[str] = []
    for word in words:
        if lower_case:
            word = word.lower()
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        pieces.extend(_split_on_punctuation(word))
    return " ".join(pieces).split()  # drops the words that lost every character to accent stripping


def _split_on_punctuation(word: str) -> list[str]:
    """"it's!" -> ["it", "'", "s", "!"]: every punctuation character stands alone."""
    out: list[str] = []
    run = ""  # the current run of non-punctuation characters
    for char in word:
        if is_punctuation(char):
            if run:
                out.append(run)
                run = ""
            out.append(char)
        else:
            run += char
    if run:
        out.append(run)
    return out


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """vocab.txt -> {token: id}; a token listed twice keeps its last id (as Hugging Face reads it)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BertError(f"{path} does not exist; pass the {VOCAB_FILE_NAME} of the BERT checkpoint") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BertError(f"{path} is not a readable UTF-8 vocabulary ({type(e).__name__}); pass the checkpoint's {VOCAB_FILE_NAME}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line starts no token
        lines.pop()
    return {token: i for i, token in enumerate(lines)}


class WordPiece:
    """BERT's uncased tokenizer: basic tokenization, then greedy longest-match-first WordPiece.

    Each word is cut into the longest vocabulary entry that starts it, then the longest
    "##" entry that continues it, and so on; a word with a part no entry matches, or one
    longer than MAX_WORD_CHARS characters, becomes a single [UNK]. The ids equal those of
    Hugging Face's slow BertTokenizer (do_lower_case=True; Google's tokenization.py plus an
    NFC step) on any text, except that a caption spelling a special token ("[MASK]") gets the pieces of
    the brackets and the word, not the special id: captions cannot inject control tokens.
    """

    def __init__(self, vocab_txt_path: str | os.PathLike, lower_case: bool = True):
        self.path = Path(vocab_txt_path)
        self.vocab = read_vocab(self.path)
        self.lower_case = lower_case
        missing = [t for t in (PAD, UNK, CLS, SEP) if t not in self.vocab]
        if missing:
            raise BertError(f"{self.path} lacks the special tokens {missing}; is it a BERT {VOCAB_FILE_NAME}?")
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.vocab_size = max(self.id_to_token) + 1
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (self.vocab[t] for t in (PAD, UNK, CLS, SEP))
        self._cache: dict[str, list[int]] = {}
        self._warned_truncation = False

    def wordpiece(self, word: str) -> list[int]:
        """One basic token -> ids of its pieces, greedy longest match first; [UNK] if any part fails."""
        if word not in self._cache:
            ids: list[int] | None = [] if len(word) <= MAX_WORD_CHARS else None
            start = 0
            while ids is not None and start < len(word):
                for end in range(len(word), start, -1):  # the longest candidate first
                    piece = word[start:end] if start == 0 else CONTINUATION + word[start:end]
                    if piece in self.vocab:
                        ids.append(self.vocab[piece])
                        start = end
                        break
                else:  # no entry matches here: the whole word is unknown
                    ids = None
            ids = [self.unk_id] if ids is None else ids
            if len(self._cache) > 100_000:  # bound the memory a long-running job spends on it
                self._cache.clear()
            self._cache[word] = ids
        return self._cache[word]

    def tokenize(self, text: str) -> list[str]:
        """Text -> WordPiece pieces as strings ("##" marks a continuation)."""
        return [self.id_to_token[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Caption -> ids, without [CLS] and [SEP]."""
        return [i for word in basic_tokenize(text, self.lower_case) for i in self.wordpiece(word)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids -> text: pieces joined by spaces, "##" pieces glued to the one before.

        [CLS], [SEP] and [PAD] are dropped unless skip_special_tokens is False; [UNK] stays.
        Lower-casing, accents and the spacing around punctuation cannot be recovered.
        """
        skipped = {self.cls_id, self.sep_id, self.pad_id} if skip_special_tokens else set()
        try:
            pieces = [self.id_to_token[int(i)] for i in ids if int(i) not in skipped]
        except KeyError as e:
            raise BertError(f"id {e.args[0]} is not in {self.path} ({len(self.vocab)} tokens)") from None
        return " ".join(pieces).replace(" " + CONTINUATION, "").strip()

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        """Captions -> LongTensor[B, context_length]: [CLS], ids, [SEP], then [PAD].

        An over-long caption keeps its first context_length - 2 ids, so [SEP] always fits; a
        warning says so once per tokenizer. The padding is the only [PAD] in a row (no text
        encodes to it), so `attention_mask(tokens)` recovers which positions to attend to.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise BertError(f"context_length {context_length} leaves no room for [CLS] and [SEP]; use >= 2")
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)  # (B, L)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > context_length - 2:
                if not self._warned_truncation:
                    warnings.warn(f"caption of {len(ids) + 2} tokens cut to {context_length}: {text[:60]!r}...")
                    self._warned_truncation = True
                ids = ids[: context_length - 2]
            ids = [self.cls_id, *ids, self.sep_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor[B, L]: 1 where `tokens` (from __call__) is [CLS], a caption id or [SEP], 0 on padding."""
        return (tokens != self.pad_id).long()


def is_bert_folder(path: str | os.PathLike) -> bool:
    """A folder whose config.json names model_type "bert" (what --text-init reads as Table 5's BERT)."""
    config = Path(path) / CONFIG_FILE_NAME
    if not config.is_file() or config.stat().st_size > 1 << 20:
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "bert"
    except (ValueError, AttributeError, UnicodeDecodeError):
        return False


def load_wordpiece(path: str | os.PathLike) -> WordPiece:
    """The tokenizer of a BERT folder (its vocab.txt), or of a vocab.txt given directly."""
    path = Path(path)
    if path.is_dir():
        path = path / VOCAB_FILE_NAME
    elif not path.exists():
        raise BertError(f"{path} does not exist; pass a Hugging Face BERT folder or its {VOCAB_FILE_NAME}")
    return WordPiece(path)


# ----------------------------------------------------------------------------------------
# The Transformer encoder
# ----------------------------------------------------------------------------------------


@dataclass
class BertConfig:
    vocab_size: int = 30522  # rows of the word embedding (lines of vocab.txt; may be padded beyond it)
    hidden_size: int = 768  # model dimension D of every layer
    num_hidden_layers: int = 12  # post-LN Transformer layers
    num_attention_heads: int = 12  # heads per layer; hidden_size must be divisible by it
    intermediate_size: int = 3072  # hidden units of each feed-forward block
    max_position_embeddings: int = 512  # learned positions: the longest token sequence
    type_vocab_size: int = 2  # segment embeddings (sentence A / B); only segment 0 is used here
    layer_norm_eps: float = 1e-12  # epsilon of every LayerNorm
    hidden_act: str = "gelu"  # the feed-forward activation: exact GELU, 0.5 x (1 + erf(x / sqrt 2)); the only one built
    pad_token_id: int = 0  # [PAD]: positions holding it are not attended to
    # Beyond Hugging Face's config (its tokenizer knows them); Emage keeps them in its checkpoint:
    cls_token_id: int = 101  # [CLS] and [SEP] of bert-base-uncased's vocab.txt; the empty caption is [CLS] [SEP]
    sep_token_id: int = 102
    context_length: int = 77  # caption positions Emage tokenizes to (at most max_position_embeddings)

    @property
    def width(self) -> int:
        """hidden_size, under the name Emage's cross-attention reads (clip_text.TextConfig.width)."""
        return self.hidden_size

    @classmethod
    def from_hf(cls, config: dict) -> "BertConfig":
        """The fields of a Hugging Face BERT config.json; a key left out means BertConfig's default
        (the same as transformers'). Variants this encoder does not build are refused."""
        if config.get("model_type", "bert") != "bert":
            raise BertError(f"config.json has model_type {config['model_type']!r}; only 'bert' checkpoints load here")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise BertError(f"position_embedding_type {config['position_embedding_type']!r} is not built here; only 'absolute'")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise BertError("config.json describes a BERT decoder (is_decoder / add_cross_attention); use an encoder checkpoint")
        fields = {name: config[name] for name in cls.__dataclass_fields__ if name in config}
        out = cls(**fields)
        if out.hidden_act != "gelu":
            raise BertError(f"hidden_act {out.hidden_act!r} is not built here; only 'gelu' (exact erf GELU)")
        return out


class BertLayer(nn.Module):
    """Post-LayerNorm block: x = norm(x + attn(x)), then x = norm(x + ffn(x)), as in BERT."""

    def __init__(self, config: BertConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(D, 3 * D)  # query, key and value projections stacked in that order
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=eps)
        self.ffn_in = nn.Linear(D, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, D)
        self.ffn_norm = nn.LayerNorm(D, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.heads
        q, k, v = self.qkv(x).reshape(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, L, 3D) -> 3 x (B, H, L, D/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D/H), scale 1/sqrt(D/H)
        a = a.transpose(1, 2).reshape(B, L, D)  # (B, H, L, D/H) -> (B, L, D)
        x = self.attn_norm(x + self.attn_out(a))  # (B, L, D)
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # (B, L, D); F.gelu is the exact erf form


class BertEncoder(nn.Module):
    """BERT's encoder: tokens[B, L], attention_mask[B, L] -> last hidden states[B, L, hidden_size].

    Embeddings are word + position (0..L-1) + segment 0, then a LayerNorm; then the post-LN
    layers. attention_mask is 1 for positions to attend to and 0 for padding (None: attend to
    all); masked keys get the dtype's most negative value added, as in BERT, so even a row of
    padding has finite states. Parameter names are this module's own; load_bert maps
    Hugging Face's names onto them one to one.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise BertError(f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}")
        if config.hidden_act != "gelu":
            raise BertError(f"hidden_act {config.hidden_act!r} is not built here; only 'gelu' (exact erf GELU)")
        self.config = config
        D = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, D)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, D)
        self.embedding_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation (normal, std 0.02; zero biases; unit LayerNorms), for training from scratch."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L = tokens.shape
        if L > self.config.max_position_embeddings:
            raise BertError(
                f"{L} tokens per caption but the encoder has {self.config.max_position_embeddings} positions; "
                f"tokenize with context_length <= {self.config.max_position_embeddings}"
            )
        position = torch.arange(L, device=tokens.device)  # (L,)
        x = self.word_embeddings(tokens) + self.position_embeddings(position) + self.token_type_embeddings.weight[0]  # (B, L, D)
        x = self.embedding_norm(x)  # (B, L, D)
        mask = None
        if attention_mask is not None:
            hidden = (attention_mask == 0)[:, None, None, :]  # (B, L) -> (B, 1, 1, L): keys to ignore
            mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill(hidden, torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, mask)  # (B, L, D)
        return x

    # The two questions Emage asks of its text tower (clip_text.TextEncoder answers them too):

    def states_and_mask(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states[B, L, D], valid[B, L] bool: False on padding)."""
        valid = tokens != self.config.pad_token_id  # (B, L)
        return self(tokens, valid), valid

    def empty_caption(self, batch: int, length: int, device=None) -> torch.Tensor:
        """The empty caption: [CLS] [SEP], then padding."""
        tokens = torch.full((batch, length), self.config.pad_token_id, dtype=torch.long, device=device)
        tokens[:, 0], tokens[:, 1] = self.config.cls_token_id, self.config.sep_token_id
        return tokens


# ----------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------

CONFIG_FILE_NAME = "config.json"
WEIGHTS_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")  # tried in this order
HF_PREFIX = "bert."  # BertForMaskedLM, BertForPreTraining, ... keep the encoder under it; BertModel does not
# Keys of a Hugging Face checkpoint skipped on purpose (after removing HF_PREFIX): the pooler
# (tanh layer over [CLS]), the pre-training heads (masked LM "cls.predictions.*", next sentence
# "cls.seq_relationship.*"), and the index buffers older transformers versions saved.
HF_IGNORED = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids")
# BERT checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta (bert-base-uncased does).
LAYER_NORM_ALIASES = {"gamma": "weight", "beta": "bias"}


def hf_key_map(config: BertConfig) -> dict[str, str | tuple[str, str, str]]:
    """Native key -> Hugging Face key (without "bert."), or the three q/k/v keys stacked into it."""
    out: dict[str, str | tuple[str, str, str]] = {
        "word_embeddings.weight": "embeddings.word_embeddings.weight",
        "position_embeddings.weight": "embeddings.position_embeddings.weight",
        "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embedding_norm.weight": "embeddings.LayerNorm.weight",
        "embedding_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            out[dst + f"qkv.{part}"] = tuple(src + f"attention.self.{p}.{part}" for p in ("query", "key", "value"))
            out[dst + f"attn_out.{part}"] = src + f"attention.output.dense.{part}"
            out[dst + f"attn_norm.{part}"] = src + f"attention.output.LayerNorm.{part}"
            out[dst + f"ffn_in.{part}"] = src + f"intermediate.dense.{part}"
            out[dst + f"ffn_out.{part}"] = src + f"output.dense.{part}"
            out[dst + f"ffn_norm.{part}"] = src + f"output.LayerNorm.{part}"
    return out


def _hf_name(key: str) -> str:
    """A checkpoint key in the spelling of hf_key_map: no "bert." prefix, LayerNorm.gamma/beta -> weight/bias."""
    key = key.removeprefix(HF_PREFIX)
    head, _, last = key.rpartition(".")
    if head.endswith("LayerNorm") and last in LAYER_NORM_ALIASES:
        key = f"{head}.{LAYER_NORM_ALIASES[last]}"
    return key


def hf_to_native(state: dict[str, torch.Tensor], config: BertConfig, source: Path) -> dict[str, torch.Tensor]:
    """Hugging Face BERT keys -> native keys: every key is ignorable (HF_IGNORED) or used exactly once."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _hf_name(key)
        if name in renamed:
            raise BertError(f"{source}: {key} appears twice (with and without {HF_PREFIX!r}, or as gamma/beta and weight/bias)")
        renamed[name] = value
    state = {k: v for k, v in renamed.items() if not k.startswith(HF_IGNORED)}
    mapping = hf_key_map(config)
    wanted = {k for src in mapping.values() for k in ((src,) if isinstance(src, str) else src)}
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        raise BertError(
            f"{source}: checkpoint lacks {len(missing)} keys {missing[:3]} and has {len(extra)} unexpected {extra[:3]}; "
            f"does config.json (num_hidden_layers={config.num_hidden_layers}) belong to these weights?"
        )
    return {dst: (state[src] if isinstance(src, str) else torch.cat([state[k] for k in src])) for dst, src in mapping.items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weights file (safetensors, or a pickled state dict read weights-only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a damaged header or a cut file
            raise BertError(f"{path} is not a readable safetensors file ({e}); download it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects other than tensors, a cut download, not a checkpoint
        raise BertError(f"{path} is not a weights-only state dict ({type(e).__name__}); download it again or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BertError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The checkpoint's tensors: model.safetensors, else pytorch_model.bin, else their sharded
    form (model.safetensors.index.json / pytorch_model.bin.index.json naming the shards)."""
    for name in WEIGHTS_FILE_NAMES:
        if (folder / name).is_file():
            return read_tensors(folder / name), folder / name
    for name in WEIGHTS_FILE_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise BertError(f"{index} is not a shard index ({type(e).__name__}); download it again") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise BertError(f"{index} names the shard {shard}, which is not in {folder}; download it")
                state.update(read_tensors(folder / shard))
            return state, index
    raise BertError(f"{folder} has no {' or '.join(WEIGHTS_FILE_NAMES)}; is it a Hugging Face BERT folder?")


def read_config(folder: Path) -> BertConfig:
    """The BertConfig of a Hugging Face folder's config.json."""
    path = folder / CONFIG_FILE_NAME
    if not path.is_file():
        raise BertError(f"{folder} has no {CONFIG_FILE_NAME}; is it a Hugging Face BERT folder?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise BertError(f"{path} is not readable JSON ({type(e).__name__}); download it again") from None
    if not isinstance(config, dict):
        raise BertError(f"{path} holds a {type(config).__name__}, not a BERT configuration")
    try:
        return BertConfig.from_hf(config)
    except TypeError as e:
        raise BertError(f"{path}: a field has the wrong type ({e})") from None


def _build(weights: dict[str, torch.Tensor], config: BertConfig, source: Path) -> BertEncoder:
    """Assert every key and shape against a freshly built encoder, then load strictly (in fp32)."""
    with torch.device("meta"):  # shapes only: no time spent on a random initialisation
        encoder = BertEncoder(config)
    expected = encoder.state_dict()
    assert set(expected) == set(weights), "hf_key_map and BertEncoder disagree on the parameter names"
    for key, value in expected.items():
        if weights[key].shape != value.shape:
            raise BertError(f"{source}: {key} has shape {tuple(weights[key].shape)}, config.json implies {tuple(value.shape)}; "
                            "do config.json and the weights belong together?")
    encoder.load_state_dict({k: v.float().contiguous() for k, v in weights.items()}, strict=True, assign=True)
    return encoder


def load_bert(path: str | os.PathLike) -> BertEncoder:
    """A BertEncoder (fp32, eval mode) from a Hugging Face BERT folder.

    The folder holds config.json and model.safetensors or pytorch_model.bin (read with
    weights_only=True), or sharded versions of them. Any BERT class works (BertModel,
    BertForMaskedLM, BertForPreTraining, ...): the "bert." prefix is optional, the pooler and
    pre-training heads are skipped, every other key must map one to one with the right shape.
    If the folder has a vocab.txt it must fit in the word embedding; load_wordpiece reads it.
    """
    folder = Path(path)
    if not folder.exists():
        raise BertError(f"{folder} does not exist; pass a Hugging Face BERT folder (config.json + model.safetensors)")
    if not folder.is_dir():
        raise BertError(f"{folder} is a file; pass the folder that holds it with its config.json")
    config = read_config(folder)
    state, source = _read_weights(folder)
    encoder = _build(hf_to_native(state, config, source), config, source).eval()
    if (folder / VOCAB_FILE_NAME).is_file():
        tokens = len(read_vocab(folder / VOCAB_FILE_NAME))
        if tokens > config.vocab_size:
            raise BertError(f"{folder / VOCAB_FILE_NAME} has {tokens} tokens but the encoder {config.vocab_size} embeddings; "
                            "the vocabulary belongs to another checkpoint")
    return encoder


# ----------------------------------------------------------------------------------------
# Writing a Hugging Face folder, and a BERT pretrained on the shapes world (Table 5)
# ----------------------------------------------------------------------------------------


def save_bert(encoder: BertEncoder, folder: str | os.PathLike, vocab: list[str]) -> None:
    """A Hugging Face BertModel folder (config.json, model.safetensors, vocab.txt), each file
    written atomically, that load_bert and transformers' BertModel.from_pretrained both read."""
    from safetensors.torch import save_file

    from files import atomic_write, write_json

    folder = Path(folder)
    state = {}
    for native, value in encoder.state_dict().items():
        hf = hf_key_map(encoder.config)[native]
        for name, part in zip((hf,) if isinstance(hf, str) else hf, value.chunk(1 if isinstance(hf, str) else 3)):
            state[name] = part.detach().contiguous().cpu()
    c = encoder.config
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(folder / VOCAB_FILE_NAME, lambda tmp: Path(tmp).write_text("".join(t + "\n" for t in vocab), encoding="utf-8"))
    write_json(folder / CONFIG_FILE_NAME, {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps, "hidden_act": c.hidden_act,
        "pad_token_id": c.pad_token_id})


def shapes_vocab() -> list[str]:
    """BERT's five special tokens, then every word of the shapes grammar (SHAPES.md) whole."""
    import shapes

    words = {*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES, "a", "an", "the"}
    for relation in shapes.RELATIONS:
        words.update(relation.split())
    return [PAD, UNK, CLS, SEP, MASK, *sorted(words)]


def train_shapes(out: str | os.PathLike, *, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                 threads: int = 1) -> dict:
    """Pretrain a BERT by masked-language modelling on shapes training captions (Table 5's BERT
    row): the shapes generator's text-tower size (3 layers of width 128, 4 heads, 24 positions),
    BERT's masking (15 % of the words; of those 80 % [MASK], 10 % a random word, 10 % kept) and
    its prediction head (dense, GELU, LayerNorm, then the tied word embeddings). Writes a Hugging
    Face folder with save_bert and returns the masked-word accuracy on novel-split captions."""
    import random
    import tempfile
    import time

    from tqdm import tqdm

    import shapes

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab = shapes_vocab()
    with tempfile.TemporaryDirectory() as scratch:  # nothing is written to `out` before training ends
        (Path(scratch) / VOCAB_FILE_NAME).write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
        tokenizer = WordPiece(Path(scratch) / VOCAB_FILE_NAME)
    mask_id, first_word = vocab.index(MASK), 5
    config = BertConfig(vocab_size=len(vocab), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=24)
    encoder = BertEncoder(config)
    head = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.LayerNorm(128, eps=config.layer_norm_eps))
    bias = nn.Parameter(torch.zeros(len(vocab)))
    parameters = [*encoder.parameters(), *head.parameters(), bias]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))

    def masked_batch(split: str, generator: torch.Generator):
        tokens = tokenizer([shapes.sample_caption(rng, split) for _ in range(batch_size)], context_length=24)
        chosen = (tokens >= first_word) & (torch.rand(tokens.shape, generator=generator) < 0.15)
        kind = torch.rand(tokens.shape, generator=generator)
        random_word = torch.randint(first_word, len(vocab), tokens.shape, generator=generator)
        inputs = torch.where(chosen & (kind < 0.8), mask_id, torch.where(chosen & (kind < 0.9), random_word, tokens))
        return inputs, tokens, chosen

    def logits(inputs):
        return head(encoder(inputs, inputs != tokenizer.pad_id)) @ encoder.word_embeddings.weight.T + bias

    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in (bar := tqdm(range(steps), desc="BERT on shapes captions", unit="step")):
        inputs, tokens, chosen = masked_batch("train", generator)
        loss = F.cross_entropy(logits(inputs)[chosen], tokens[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    encoder.eval()
    right = total = 0
    with torch.no_grad():
        for _ in range(20):
            inputs, tokens, chosen = masked_batch("novel", generator)
            right += (logits(inputs).argmax(-1)[chosen] == tokens[chosen]).sum().item()
            total += chosen.sum().item()
    save_bert(encoder, out, vocab)
    return {"masked_word_accuracy_novel": round(right / max(1, total), 4), "steps": steps, "batch_size": batch_size,
            "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - started)}


def _train_shapes(args: argparse.Namespace) -> None:
    from files import FileError, check_output

    if not (1 <= args.steps <= 10**7 and 2 <= args.batch_size <= 4096 and 0 < args.lr <= 10 and 1 <= args.threads <= 1024):
        raise BertError("--steps, --batch-size, --lr and --threads must be positive (batch at least 2, lr at most 10)")
    try:
        check_output(args.out, args.overwrite, "folder")
    except FileError as e:
        raise BertError(str(e)) from None
    report = train_shapes(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          threads=args.threads)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in report.items()))


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _tokenize(args: argparse.Namespace) -> None:
    tokenizer = load_wordpiece(args.folder)
    for text in args.texts:
        print(f"{text!r}\n  ids: {tokenizer.encode(text)}\n  pieces: {tokenizer.tokenize(text)}")


def _encode(args: argparse.Namespace) -> None:
    encoder = load_bert(args.folder)
    tokenizer = load_wordpiece(args.folder)
    context_length = min(args.context_length, encoder.config.max_position_embeddings)
    tokens = tokenizer(args.texts, context_length=context_length)  # (B, L)
    mask = tokenizer.attention_mask(tokens)  # (B, L)
    with torch.no_grad():
        states = encoder(tokens, mask)  # (B, L, D)
    for text, row, n, state in zip(args.texts, tokens, mask.sum(-1).tolist(), states):
        norm = state[:n].norm(dim=-1).mean().item()
        print(f"{text!r}\n  ids: {row[:n].tolist()}\n  states: {tuple(state.shape)}, mean norm over tokens {norm:.6f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("encode", help="print token ids and the shape of the last hidden states", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="Hugging Face BERT folder: config.json, model.safetensors or pytorch_model.bin, vocab.txt")
    p.add_argument("texts", nargs="+", help="captions to encode")
    p.add_argument("--context-length", type=int, default=77, help="tokens per caption, [CLS] and [SEP] included (capped at the encoder's positions)")
    p.set_defaults(run=_encode)

    p = commands.add_parser("tokenize", help="print token ids and WordPiece pieces (needs only vocab.txt)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="a BERT folder holding vocab.txt, or the vocab.txt itself")
    p.add_argument("texts", nargs="+", help="captions to tokenize")
    p.set_defaults(run=_tokenize)

    p = commands.add_parser("train-shapes", help="pretrain a BERT by masked-language modelling on shapes captions (Table 5)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/bert-shapes", help="the Hugging Face folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the folder's contents if it holds some")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="captions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (5 %% warm-up, then linear decay)")
    p.add_argument("--seed", type=int, default=0, help="seed of the captions, masks and initialisation")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.set_defaults(run=_train_shapes)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except BertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
