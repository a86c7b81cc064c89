"""Emage's sampling loop against two open mask-predict text-to-image peers, in one process.

The peers, built with random weights (time does not depend on the weights) at a matched
transformer size:

    Emage   this repository: CLIP text tower, decoder with cross-attention to keys/values
            computed once per caption, Algorithm 3 (#3), taming-style VQGAN decoder
    aMUSEd  diffusers (`AmusedPipeline` + `UVit2DModel`, `VQModel`, `AmusedScheduler`,
            CLIP text tower from transformers); the pipeline is deprecated in diffusers
            and lives under diffusers.pipelines.deprecated since 0.34
    Muse    lucidrains' muse-maskgit-pytorch (`MaskGit`, `MaskGitTransformer`, `VQGanVAE`,
            T5 text encoder from transformers)

Sizes (`--sizes`): "small" = 256 image tokens (16 x 16, 1024 codes, 256 x 256 pixels),
transformer width 256 with 12 layers (11-16M parameters); "large" = the same grid, width 512
with 12 layers (42-57M); "tiny" (for --quick) = 16 tokens, width 32, 1 layer. Every part
that can be matched is matched: transformer width, depth, heads and MLP size; text tower
width, depth, heads, vocabulary (49408) and context (77); codebook and grid; decoder
channels. What cannot be matched (each library's own block design, parameters per part,
FLOPs per round, text positions attended, how guidance is batched) is printed and written
under "mismatches", with the FLOPs counted by torch.utils.flop_counter.FlopCounterMode.

A cell is (size, batch, T, guidance off/on). In a cell every model runs once as a warm-up
(T = 2), then the three models take turns (Emage, aMUSEd, Muse, Emage, ...) for --repeats
timed runs each, so a shared machine slows all alike. A run is one caption-to-pixels call
timed in stages: tokenizer + text encoder, the T-round loop, the VQ decoder. "pixels" is
the whole run, "loop" its loop stage (the sampler given the encoded caption: every round,
its sampling and commits, nothing else). Every stage is timed twice: wall clock, and the CPU
time of the process; on a CPU shared with other jobs, with --threads 1, the CPU time is what
the code itself costs while the wall clock also measures the load (on a GPU only the wall
clock means anything). Times are medians; the ratio is Emage's time over the fastest peer's in
the same cell and clock (0.5 = Emage twice as fast).

All three read captions with this repository's CLIP BPE tokenizer (clip_text.Tokenizer):
aMUSEd's CLIPTokenizer and Muse's T5 tokenizer would need files from a model hub. The
tokenizer is a fraction of a millisecond of every run.

    python benchmarks/peers.py --quick                      # smoke test: tiny sizes, one cell, 1 repeat
    python benchmarks/peers.py                              # both sizes, every cell, 5 repeats
    python benchmarks/peers.py --sizes small --batches 1 --repeats 3 --json /tmp/peers.json

Peers come from requirements-peers.txt (installed with `pip install --no-deps`); a peer
that does not import is a row that says so, and the others still run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.machinery
import os
import platform
import re
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/peers.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

import clip_text  # noqa: E402
import files  # noqa: E402
from benchmarks.flops import counted_flops  # noqa: E402
import shapes_tokenizers  # noqa: E402

MODELS = ("Emage", "aMUSEd", "Muse")
PEERS = MODELS[1:]
GUIDANCE_SCALE = 3.0  # "on": any scale != 1 costs the same; Muse's default, aMUSEd's default is 10
CONTEXT = 77  # CLIP's context: the text positions of every caption
VOCAB = 49408  # CLIP's BPE vocabulary, for all three text towers
CAPTIONS = [
    "a red double decker bus driving down a city street",
    "two dogs playing with a frisbee on the grass",
    "a bowl of fruit on a wooden kitchen table",
    "a man riding a wave on top of a surfboard",
    "a clock tower in the middle of a town square",
    "a plate with a sandwich and a cup of coffee",
    "a giraffe standing next to a tall green tree",
    "an airplane flying over snowy mountains at sunset",
]


@dataclass(frozen=True)
class Size:
    name: str
    grid: int  # image tokens per side
    codebook: int
    width: int  # transformer width (all three)
    layers: int  # transformer blocks (aMUSEd: see AmusedRunner)
    heads: int
    text_width: int
    text_layers: int
    text_heads: int
    decoder_channels: int  # first level of every VQ decoder
    latent: int  # codebook vector size of the taming and diffusers decoders

    @property
    def n(self) -> int:
        return self.grid * self.grid

    @property
    def image(self) -> int:
        return 16 * self.grid  # every decoder upsamples 16x


SIZES = {
    "tiny": Size("tiny", grid=4, codebook=64, width=32, layers=1, heads=2, text_width=32, text_layers=1, text_heads=2,
                 decoder_channels=32, latent=32),
    "small": Size("small", grid=16, codebook=1024, width=256, layers=12, heads=4, text_width=256, text_layers=6,
                  text_heads=4, decoder_channels=32, latent=256),
    "large": Size("large", grid=16, codebook=1024, width=512, layers=12, heads=8, text_width=512, text_layers=12,
                  text_heads=8, decoder_channels=32, latent=256),
}


class PeerMissing(Exception):
    """A peer library is not installed (or does not import): its rows say so."""


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count(module: torch.nn.Module | None, skip: tuple[str, ...] = ()) -> int:
    """Parameters of a module, leaving out those whose names start with a prefix in skip."""
    if module is None:
        return 0
    return sum(p.numel() for name, p in module.named_parameters() if not name.startswith(skip))


def flops(fn) -> int:
    """Matrix-multiply, convolution and attention FLOPs of one call (torch.utils.flop_counter).
    Attention runs on the math kernel while counting: the CPU flash kernel has no FLOP formula,
    and without this the models that call scaled_dot_product_attention (Emage, aMUSEd) would
    be counted without attention while Muse's einsum attention is counted."""
    with torch.no_grad():
        return counted_flops(fn)


class TextMemo:
    """Stands in for a text encoder that a sampler calls inside its own loop function.

    `prime(x)` runs the real encoder on x (the timed text stage); a later call with the same
    input (the sampler's) returns that result at no cost. Inputs the sampler passed during
    the warm-up are recorded, so the text stage encodes exactly what the loop will ask for
    (with guidance: the caption rows and the empty-caption rows). `misses` counts calls the
    table could not answer: the loop then paid for text encoding itself, and the row says so.
    """

    def __init__(self, encode, key):
        self.encode, self.key = encode, key
        self.table: dict = {}
        self.recorded: list = []
        self.recording = False
        self.misses = 0

    def __call__(self, x):
        if self.recording:
            self.recorded.append(x)
        k = self.key(x)
        if k in self.table:
            return self.table[k]
        self.misses += 1
        return self.encode(x)

    def prime(self, x) -> None:
        self.table[self.key(x)] = self.encode(x)


def tensor_key(t: torch.Tensor):
    return tuple(t.shape), t.detach().cpu().numpy().tobytes()


def make_tokenizer() -> tuple[clip_text.Tokenizer, str]:
    """CLIP's BPE (ids below 49408) when a copy of the vocabulary is found, else the shapes one."""
    try:
        return clip_text.Tokenizer(), "CLIP BPE (49408 ids)"
    except clip_text.ClipTextError:
        return clip_text.Tokenizer(shapes_tokenizers.SHAPES_BPE_PATH), "shapes BPE (no CLIP vocabulary found)"


class _Absent(types.ModuleType):
    """A stand-in for torchvision: every attribute is a placeholder that refuses to be used."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"torchvision.{name} is not installed (peers.py's stand-in)")

        return unavailable


@contextlib.contextmanager
def torchvision_stand_in(notes: list):
    """muse-maskgit-pytorch imports torchvision at module level but samples without it (only
    its training losses, trainers and super-resolution output use it). PyPI's torchvision
    wheels are CUDA builds that do not load beside a CPU build of torch; where torchvision does
    not import, stand-in modules are registered for the duration of the import only (so no
    other library's check for torchvision sees them), and a note says so."""
    try:
        import torchvision  # noqa: F401
        yield
        return
    except Exception as error:  # ImportError, or RuntimeError from a torchvision built for another torch
        why = type(error).__name__
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for name in saved:
        del sys.modules[name]
    names = ("torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.utils", "torchvision.models")
    for name in names:
        module = _Absent(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    try:
        yield
        notes.append(f"torchvision did not import ({why}); muse-maskgit-pytorch was imported beside a stand-in "
                     "(its sampling never calls torchvision)")
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


# ----------------------------------------------------------------------------------------
# The three samplers, each timed in stages: text, loop, decode
# ----------------------------------------------------------------------------------------


class Runner:
    name = ""
    version = ""
    notes: list[str]

    def __init__(self, size: Size, device: torch.device, tokenizer):
        self.size, self.device, self.tokenizer = size, device, tokenizer
        self.notes = []

    # Each subclass defines: text(captions, guided) -> state; loop(state, steps, guided, seed)
    # -> tokens [B, h, w]; decode(tokens) -> pixels; parts() -> parameters per part; flops().

    def run(self, captions: list[str], steps: int, guided: bool, seed: int = 0) -> dict:
        """Seconds of each stage of one caption-to-pixels call: wall clock, and the CPU time of
        this process (`<stage>_cpu`; on a shared machine with one thread, what the code itself
        cost, whatever else the machine ran meanwhile)."""
        dev, marks = self.device, []

        def mark():
            sync(dev)
            marks.append((time.perf_counter(), time.process_time()))

        mark()
        state = self.text(captions, guided)
        mark()
        tokens = self.loop(state, steps, guided, seed)
        mark()
        pixels = self.decode(tokens)
        mark()
        assert pixels.shape[0] == len(captions) and tuple(tokens.shape[-2:]) == (self.size.grid, self.size.grid)
        out = {}
        for clock, suffix in ((0, ""), (1, "_cpu")):
            t = [m[clock] for m in marks]
            out.update({f"text{suffix}": t[1] - t[0], f"loop{suffix}": t[2] - t[1], f"decode{suffix}": t[3] - t[2],
                        f"pixels{suffix}": t[3] - t[0]})
        return out

    def warm_up(self, captions: list[str], guided: bool) -> None:
        self.run(captions, 2, guided)


class EmageRunner(Runner):
    name = "Emage"

    def __init__(self, size: Size, device: torch.device, tokenizer):
        super().__init__(size, device, tokenizer)
        import emage
        import vqgan

        s = size
        text = clip_text.TextConfig(vocab_size=VOCAB, context_length=CONTEXT, width=s.text_width, heads=s.text_heads,
                                    layers=s.text_layers, embed_dim=s.text_width)
        config = emage.EmageConfig.shapes(codebook_size=s.codebook, grid=(s.grid, s.grid), width=s.width,
                                          layers=s.layers, heads=s.heads, mlp_ratio=4.0)
        config = dataclasses.replace(config, text=text)
        self.model = emage.Emage(config).eval().to(device)
        vq = vqgan.VQGANConfig(resolution=s.image, ch=s.decoder_channels, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1,
                               attn_resolutions=(), z_channels=s.latent, embed_dim=s.latent, n_embed=s.codebook,
                               quantizer="vector")
        self.vqgan = vqgan.VQGAN(vq).eval().to(device)
        self.memo = TextMemo(self.model.encode_text, tensor_key)
        self.model.encode_text = self.memo  # generate() calls self.encode_text: answered from the text stage
        self.recorded: dict = {}

    def tokens(self, captions):
        return self.tokenizer(captions, context_length=CONTEXT).to(self.device)

    def warm_up(self, captions, guided):
        self.memo.recorded, self.memo.recording = [], True
        try:
            self.model.generate(self.tokens(captions), steps=1, algorithm=3,
                                guidance_scale=GUIDANCE_SCALE if guided else 1.0)
        finally:
            self.memo.recording = False
        self.recorded[(len(captions), guided)] = self.memo.recorded
        super().warm_up(captions, guided)

    @torch.no_grad()
    def text(self, captions, guided):
        self.memo.table.clear()
        tokens = self.tokens(captions)
        for x in self.recorded.get((len(captions), guided), ()):  # what generate() will ask encode_text for
            self.memo.prime(x)
        return tokens

    def loop(self, tokens, steps, guided, seed):
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.model.generate(tokens, steps=steps, algorithm=3, guidance_scale=GUIDANCE_SCALE if guided else 1.0,
                                  generator=g)
        return out.view(-1, self.size.grid, self.size.grid)

    @torch.no_grad()
    def decode(self, tokens):
        return self.vqgan.decode(tokens)

    def parts(self) -> dict:
        text = count(self.model.text_encoder)
        return {"text": text, "transformer": count(self.model) - text,
                "decoder": count(self.vqgan, ("encoder.", "quant_conv."))}

    @torch.no_grad()
    def flops(self) -> dict:
        s, m = self.size, self.model
        tokens = self.tokens(CAPTIONS[:1])
        kv, mask = self.memo.encode(tokens)
        masked = torch.full((1, s.n), m.config.mask_id, dtype=torch.long, device=self.device)
        ids = torch.zeros(1, s.grid, s.grid, dtype=torch.long, device=self.device)
        return {"round": flops(lambda: m.round_logits(masked, kv, mask)),
                "text": flops(lambda: self.memo.encode(tokens)), "decode": flops(lambda: self.vqgan.decode(ids))}


class AmusedRunner(Runner):
    """aMUSEd: UVit2DModel = a convolutional in-block, `layers - 2` transformer blocks, a
    convolutional out-block. Each conv block (one residual block and one attention block with
    cross-attention, at the transformer's width) costs about one transformer block, so the
    depth matches Emage's; its MLPs are GEGLU with 8/3 x width (the parameters of a 4x MLP)."""

    name = "aMUSEd"

    def __init__(self, size: Size, device: torch.device, tokenizer):
        super().__init__(size, device, tokenizer)
        try:
            import diffusers
            from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection
        except Exception as error:  # ImportError, or a diffusers that no longer has aMUSEd
            raise PeerMissing(f"not installed: diffusers with AmusedPipeline ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:100]})") from None
        self.version = f"diffusers {diffusers.__version__}"
        s = size
        text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=s.text_width, intermediate_size=4 * s.text_width,
                              num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                              max_position_embeddings=CONTEXT, projection_dim=s.text_width,
                              bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
        self.text_encoder = CLIPTextModelWithProjection(text).eval().to(device)
        self.transformer = UVit2DModel(
            hidden_size=s.width, use_bias=False, cond_embed_dim=s.text_width, micro_cond_encode_dim=256,
            micro_cond_embed_dim=1280, encoder_hidden_size=s.text_width, vocab_size=s.codebook + 1,
            codebook_size=s.codebook, in_channels=s.width, block_out_channels=s.width, num_res_blocks=1,
            block_num_heads=s.heads, num_hidden_layers=max(1, s.layers - 2), num_attention_heads=s.heads,
            intermediate_size=8 * s.width // 3, sample_size=s.grid).eval().to(device)
        c = s.decoder_channels
        self.vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 5,
                             up_block_types=("UpDecoderBlock2D",) * 5, block_out_channels=(c, c, 2 * c, 2 * c, 4 * c),
                             layers_per_block=1, latent_channels=s.latent, num_vq_embeddings=s.codebook,
                             norm_num_groups=32, lookup_from_codebook=True, force_upcast=False,
                             sample_size=s.image).eval().to(device)
        scheduler = AmusedScheduler(mask_token_id=s.codebook)  # the last input id of UVit2DModel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice
            self.pipe = AmusedPipeline(vqvae=self.vqvae, tokenizer=None, text_encoder=self.text_encoder,
                                       transformer=self.transformer, scheduler=scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        if self.pipe.vae_scale_factor * s.grid != s.image:
            raise RuntimeError(f"aMUSEd's VQ model scales by {self.pipe.vae_scale_factor}, expected 16")

    @torch.no_grad()
    def encode(self, ids: torch.Tensor):
        out = self.text_encoder(ids, return_dict=True, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]  # what AmusedPipeline uses: pooled + penultimate layer

    def text(self, captions, guided):
        ids = self.tokenizer(captions, context_length=CONTEXT).to(self.device)
        pooled, states = self.encode(ids)
        if not guided:
            return pooled, states, None, None
        empty = self.tokenizer([""] * len(captions), context_length=CONTEXT).to(self.device)
        return (pooled, states, *self.encode(empty))

    def loop(self, state, steps, guided, seed):
        pooled, states, neg_pooled, neg_states = state
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.pipe(prompt_embeds=pooled, encoder_hidden_states=states, negative_prompt_embeds=neg_pooled,
                        negative_encoder_hidden_states=neg_states, guidance_scale=GUIDANCE_SCALE if guided else 1.0,
                        num_inference_steps=steps, generator=g, output_type="latent", height=self.size.image,
                        width=self.size.image)
        return out.images  # (B, h, w) token ids

    @torch.no_grad()
    def decode(self, tokens):
        B, h, w = tokens.shape  # as AmusedPipeline decodes its latents
        out = self.vqvae.decode(tokens, force_not_quantize=True, shape=(B, h, w, self.vqvae.config.latent_channels))
        return out.sample.clip(0, 1)

    def parts(self) -> dict:
        return {"text": count(self.text_encoder), "transformer": count(self.transformer),
                "decoder": count(self.vqvae, ("encoder.", "quant_conv."))}

    @torch.no_grad()
    def flops(self) -> dict:
        s = self.size
        ids = self.tokenizer(CAPTIONS[:1], context_length=CONTEXT).to(self.device)
        pooled, states = self.encode(ids)
        masked = torch.full((1, s.grid, s.grid), s.codebook, dtype=torch.long, device=self.device)
        micro = torch.tensor([[s.image, s.image, 0, 0, 6]], dtype=states.dtype, device=self.device)
        codes = torch.zeros(1, s.grid, s.grid, dtype=torch.long, device=self.device)
        return {"round": flops(lambda: self.transformer(masked, micro_conds=micro, pooled_text_emb=pooled,
                                                        encoder_hidden_states=states)),
                "text": flops(lambda: self.encode(ids)), "decode": flops(lambda: self.decode(codes))}


class MuseTokenizer:
    """The one call muse-maskgit-pytorch makes of a T5 tokenizer, answered with the CLIP BPE."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def batch_encode_plus(self, texts, return_tensors="pt", padding="longest", max_length=256, truncation=True):
        ids = self.tokenizer(texts, context_length=min(max_length, CONTEXT))
        length = int((ids != 0).sum(1).max())  # padding="longest"
        ids = ids[:, :length]
        return types.SimpleNamespace(input_ids=ids, attention_mask=(ids != 0).long())


class IdsOut(torch.nn.Module):
    """Takes the place of MaskGit's VQ model while it samples: the feature-map size it asks
    for, and token ids handed back as they are (the decode stage then decodes them)."""

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def get_encoded_fmap_size(self, image_size):
        return self.grid

    def decode_from_ids(self, ids):
        return ids


class MuseRunner(Runner):
    """Muse (lucidrains): MaskGitTransformer of the same width, depth, heads and 4x MLP (GEGLU at
    8/3 x width), over a T5 encoder of the text tower's width, depth and heads (gated-GELU
    feed-forward of 8/3 x width, CLIP's vocabulary). Attention is `flash=False` (einsum): the
    library's flash=True path runs memory-efficient-attention-pytorch's Python-level chunked
    kernel on every device, which is slower at 256 tokens. Its VQ decoder (transposed
    convolutions, residual blocks only at the lowest resolution) is much lighter per channel
    than the taming/diffusers decoders, so it gets twice their first-level channels: about the
    same FLOPs per image (the table of parts says how close)."""

    name = "Muse"

    def __init__(self, size: Size, device: torch.device, tokenizer):
        super().__init__(size, device, tokenizer)
        try:
            from transformers import T5Config, T5EncoderModel
            with torchvision_stand_in(self.notes):
                from muse_maskgit_pytorch import MaskGit, MaskGitTransformer, VQGanVAE
                from muse_maskgit_pytorch import t5 as muse_t5
        except Exception as error:
            raise PeerMissing(f"not installed: muse-maskgit-pytorch ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:100]})") from None
        try:
            from importlib.metadata import version
            self.version = f"muse-maskgit-pytorch {version('muse-maskgit-pytorch')}"
        except Exception:
            self.version = "muse-maskgit-pytorch"
        module = importlib.import_module("muse_maskgit_pytorch.muse_maskgit_pytorch")
        module.tqdm = lambda iterable, **kwargs: iterable  # its sampling loop's progress bar
        s = size
        name = f"peers-random-t5-{s.name}"  # registered below: nothing is fetched from a hub
        config = T5Config(vocab_size=VOCAB, d_model=s.text_width, d_kv=s.text_width // s.text_heads,
                          d_ff=8 * s.text_width // 3, num_layers=s.text_layers, num_heads=s.text_heads,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
        self.t5 = T5EncoderModel(config).eval().to(device)
        muse_t5.T5_CONFIGS[name] = {"config": config, "model": self.t5, "tokenizer": MuseTokenizer(tokenizer)}
        vae = VQGanVAE(dim=2 * s.decoder_channels, codebook_size=s.codebook, layers=4, use_vgg_and_gan=False)
        transformer = MaskGitTransformer(num_tokens=s.codebook, seq_len=s.n, dim=s.width, depth=s.layers,
                                         dim_head=s.width // s.heads, heads=s.heads, ff_mult=4, t5_name=name,
                                         flash=False)
        self.maskgit = MaskGit(image_size=s.image, transformer=transformer, vae=vae).eval().to(device)
        self.vae = self.maskgit.vae
        self.maskgit.vae = IdsOut(s.grid)  # generate() then returns token ids; the decode stage decodes them
        self.memo = TextMemo(transformer.encode_text, lambda texts: tuple(texts))
        transformer.encode_text = self.memo
        self.muse_t5 = muse_t5

    def text(self, captions, guided):
        self.memo.table.clear()
        self.memo.prime(list(captions))  # T5 over the captions; guidance masks the text out (no second encode)
        return list(captions)

    def loop(self, captions, steps, guided, seed):
        torch.manual_seed(seed)  # Muse samples from the global generator
        return self.maskgit.generate(captions, fmap_size=self.size.grid, timesteps=steps,
                                     cond_scale=GUIDANCE_SCALE if guided else 1.0)

    @torch.no_grad()
    def decode(self, tokens):
        return self.vae.decode_from_ids(tokens)

    def parts(self) -> dict:
        return {"text": count(self.t5), "transformer": count(self.maskgit.transformer),
                "decoder": count(self.vae, ("enc_dec.encoders.",))}

    @torch.no_grad()
    def flops(self) -> dict:
        s = self.size
        embeds = self.memo.encode(CAPTIONS[:1])
        masked = torch.full((1, s.n), s.codebook, dtype=torch.long, device=self.device)
        codes = torch.zeros(1, s.grid, s.grid, dtype=torch.long, device=self.device)
        return {"round": flops(lambda: self.maskgit.transformer.forward_with_cond_scale(masked, text_embeds=embeds,
                                                                                         cond_scale=1.0)),
                "text": flops(lambda: self.memo.encode(CAPTIONS[:1])), "decode": flops(lambda: self.decode(codes))}


RUNNERS = {"Emage": EmageRunner, "aMUSEd": AmusedRunner, "Muse": MuseRunner}


# ----------------------------------------------------------------------------------------
# Mismatches, timing, reporting
# ----------------------------------------------------------------------------------------


def describe(runners: dict, size: Size) -> dict:
    """Parameters per part, FLOPs per round / caption / decode, and the shapes each model sees."""
    out = {}
    for name, r in runners.items():
        if isinstance(r, str):
            out[name] = {"status": r}
            continue
        out[name] = {"status": "ok", "version": r.version, "parameters": r.parts(), "flops": r.flops(),
                     "notes": r.notes}
    emage_text = {"Emage": f"{CONTEXT} (padding masked)", "aMUSEd": f"{CONTEXT} (padding attended)",
                  "Muse": "longest caption in the batch (padding masked)"}
    guidance = {"Emage": "one decoder call on 2B rows per round", "aMUSEd": "one transformer call on 2B rows per round",
                "Muse": "two transformer calls on B rows per round (cond, then text masked out)"}
    for name, d in out.items():
        if d["status"] == "ok":
            d["text_positions"] = emage_text[name]
            d["guidance"] = guidance[name]
            d["image_tokens"] = size.n
            d["codebook"] = size.codebook
            d["pixels"] = f"{size.image}x{size.image}"
    return out


def mismatches(models: dict) -> list[str]:
    """Human-readable differences against Emage, one line each."""
    lines = []
    base = models.get("Emage", {})
    if base.get("status") != "ok":
        return ["Emage did not build: nothing to compare against"]
    for name in PEERS:
        d = models.get(name, {})
        if d.get("status") != "ok":
            lines.append(f"{name}: {d.get('status', 'absent')}")
            continue
        for part in ("text", "transformer", "decoder"):
            a, b = base["parameters"][part], d["parameters"][part]
            lines.append(f"{name}: {part} parameters {b / 1e6:.2f}M vs Emage {a / 1e6:.2f}M ({b / a:.2f}x)")
        for key, what in (("round", "FLOPs per round (batch 1, guidance off)"), ("text", "FLOPs per caption"),
                          ("decode", "FLOPs per image decode")):
            a, b = base["flops"][key], d["flops"][key]
            lines.append(f"{name}: {what} {b / 1e9:.3f} G vs Emage {a / 1e9:.3f} G ({b / max(a, 1):.2f}x)")
        lines.append(f"{name}: text positions attended: {d['text_positions']} (Emage: {base['text_positions']})")
        lines.append(f"{name}: guidance: {d['guidance']} (Emage: {base['guidance']})")
        lines.extend(f"{name}: {note}" for note in d["notes"])
    return lines


def build(names, size: Size, device: torch.device, tokenizer, log) -> dict:
    runners = {}
    for name in names:
        try:
            torch.manual_seed(0)
            runners[name] = RUNNERS[name](size, device, tokenizer)
        except PeerMissing as error:
            runners[name] = str(error)
        except Exception as error:  # a peer that imports but does not build: a row, not a crash
            runners[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        if isinstance(runners[name], str):
            log(f"{size.name}: {name}: {runners[name]}")
    return runners


def measure_cell(runners: dict, size: Size, batch: int, steps: int, guided: bool, repeats: int, log) -> list[dict]:
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    live = {}
    rows = {name: {"size": size.name, "batch": batch, "steps": steps, "guidance": guided, "model": name}
            for name in runners}
    for name, r in runners.items():
        if isinstance(r, str):
            rows[name].update(status="not installed" if r.startswith("not installed") else "error", why=r)
            continue
        try:
            r.warm_up(captions, guided)
            live[name] = r
        except Exception as error:
            rows[name].update(status="error", why=f"{type(error).__name__}: {error}"[:300])
    runs = {name: [] for name in live}
    for _ in range(repeats):  # interleaved: A, B, C, A, B, C, ...
        for name, r in list(live.items()):
            misses = getattr(getattr(r, "memo", None), "misses", 0)
            try:
                stages = r.run(captions, steps, guided)
            except Exception as error:
                rows[name].update(status="error", why=f"{type(error).__name__}: {error}"[:300])
                del live[name]
                continue
            stages["loop_included_text"] = getattr(getattr(r, "memo", None), "misses", 0) > misses
            runs[name].append(stages)
    for name in live:
        for stage in ("text", "loop", "decode", "pixels"):
            for suffix in ("", "_cpu"):
                rows[name][f"{stage}{suffix}_s"] = statistics.median(run[stage + suffix] for run in runs[name])
        rows[name].update(status="measured", runs=runs[name],
                          loop_included_text=any(run["loop_included_text"] for run in runs[name]))
    out = [rows[name] for name in runners]
    log(" | ".join(f"{row['model']} " + (f"{row['pixels_s']:.3f}/{row['loop_s']:.3f} s (CPU {row['pixels_cpu_s']:.3f}/"
                                           f"{row['loop_cpu_s']:.3f})" if row["status"] == "measured" else row["status"])
                   for row in out)
        + f"   [{size.name}, batch {batch}, T={steps}, guidance {'on' if guided else 'off'}; pixels/loop]")
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Per cell and mode: Emage's median over the fastest measured peer's."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["size"], row["batch"], row["steps"], row["guidance"]), {})[row["model"]] = row
    out = []
    for (size, batch, steps, guided), by in cells.items():
        for mode in ("pixels", "loop"):
            for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
                key = f"{mode}{suffix}_s"
                emage = by.get("Emage", {})
                peers = [(by[p][key], p) for p in PEERS if by.get(p, {}).get("status") == "measured"]
                entry = {"size": size, "batch": batch, "steps": steps, "guidance": guided, "mode": mode, "clock": clock,
                         "emage_s": emage.get(key), "fastest_peer": None, "peer_s": None, "ratio": None}
                if peers and emage.get("status") == "measured":
                    peer_s, peer = min(peers)
                    entry.update(fastest_peer=peer, peer_s=peer_s, ratio=emage[key] / peer_s)
                out.append(entry)
    return out


def cell_text(by: dict, name: str, key: str) -> str:
    row = by.get(name)
    if row is None:
        return "-"
    if row["status"] != "measured":
        return row["status"]
    star = "*" if key.startswith("loop") and row.get("loop_included_text") else ""  # the loop paid for text encoding
    return f"{row[key]:.3f}{star}"


def markdown(rows: list[dict], ratio_rows: list[dict], clock: str = "wall") -> str:
    """One table: medians of the wall clock ("wall") or of the process's CPU time ("cpu")."""
    suffix, unit = ("", "s") if clock == "wall" else ("_cpu", "CPU s")
    head = (f"| size | batch | T | guidance | Emage pixels ({unit}) | aMUSEd pixels ({unit}) | Muse pixels ({unit}) | "
            f"Emage / fastest | Emage loop ({unit}) | aMUSEd loop ({unit}) | Muse loop ({unit}) | Emage / fastest |")
    lines = [head, "|" + "---|" * 12]
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["size"], row["batch"], row["steps"], row["guidance"]), {})[row["model"]] = row
    rat = {(r["size"], r["batch"], r["steps"], r["guidance"], r["mode"], r["clock"]): r for r in ratio_rows}

    def ratio(key, mode):
        r = rat.get((*key, mode, clock))
        return f"{r['ratio']:.2f} ({r['fastest_peer']})" if r and r["ratio"] is not None else "-"

    for key, by in cells.items():
        size, batch, steps, guided = key
        lines.append(f"| {size} | {batch} | {steps} | {'on' if guided else 'off'} | "
                     + " | ".join(cell_text(by, m, f"pixels{suffix}_s") for m in MODELS) + f" | {ratio(key, 'pixels')} | "
                     + " | ".join(cell_text(by, m, f"loop{suffix}_s") for m in MODELS) + f" | {ratio(key, 'loop')} |")
    return "\n".join(lines)


def parts_markdown(models_by_size: dict) -> str:
    lines = ["| size | model | text params | transformer params | decoder params | GFLOP/round | GFLOP/caption | "
             "GFLOP/decode |", "|" + "---|" * 8]
    for size, models in models_by_size.items():
        for name, d in models.items():
            if d.get("status") != "ok":
                lines.append(f"| {size} | {name} | {d.get('status')} | | | | | |")
                continue
            p, f = d["parameters"], d["flops"]
            lines.append(f"| {size} | {name} | {p['text'] / 1e6:.2f}M | {p['transformer'] / 1e6:.2f}M | "
                         f"{p['decoder'] / 1e6:.2f}M | {f['round'] / 1e9:.3f} | {f['text'] / 1e9:.3f} | "
                         f"{f['decode'] / 1e9:.3f} |")
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    return f"{model}, {os.cpu_count()} logical CPUs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "large"], choices=tuple(SIZES), help="model sizes")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="captions per call")
    p.add_argument("--steps", nargs="+", type=int, default=[12, 16], help="rounds T")
    p.add_argument("--guidance", nargs="+", default=["off", "on"], choices=("off", "on"),
                   help=f"classifier-free guidance (on: scale {GUIDANCE_SCALE})")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="samplers to run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model and cell, interleaved; medians reported")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny size, 1 repeat, one cell (batch 1, T=12, guidance off)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json", help="output file")
    p.add_argument("--markdown", type=Path, default=None, help="also write the Markdown tables to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.steps, args.guidance, args.repeats = ["tiny"], [1], [12], ["off"], 1
    if args.repeats < 1 or args.threads < 1 or min(args.batches) < 1 or min(args.steps) < 2:
        print("error: --repeats, --threads and --batches must be positive, --steps at least 2", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    tokenizer, tokenizer_name = make_tokenizer()
    started = time.perf_counter()
    rows, models_by_size, mismatch_lines = [], {}, {}
    for size_name in args.sizes:
        size = SIZES[size_name]
        runners = build(args.models, size, device, tokenizer, log)
        models_by_size[size_name] = describe(runners, size)
        mismatch_lines[size_name] = mismatches(models_by_size[size_name])
        for line in mismatch_lines[size_name]:
            log(f"{size_name}: {line}")
        for batch in args.batches:
            for steps in args.steps:
                for guidance in args.guidance:
                    rows += measure_cell(runners, size, batch, steps, guidance == "on", args.repeats, log)
        del runners
    ratio_rows = ratios(rows)
    table, parts = markdown(rows, ratio_rows), parts_markdown(models_by_size)
    if device.type == "cpu":  # host CPU time says nothing of a GPU's work
        table += "\n\nCPU time of the process (medians):\n\n" + markdown(rows, ratio_rows, "cpu")
    print(table)
    print()
    print(parts)
    print()
    for size_name, lines in mismatch_lines.items():
        for line in lines:
            print(f"- {size_name}: {line}")
    report = {
        "command": " ".join(["python", "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(device), "device": str(device), "threads": args.threads,
        "load_average": os.getloadavg(), "torch": torch.__version__, "repeats": args.repeats,
        "guidance_scale": GUIDANCE_SCALE, "tokenizer": tokenizer_name, "seconds": time.perf_counter() - started,
        "sizes": {name: dataclasses.asdict(SIZES[name]) for name in args.sizes},
        "models": models_by_size, "mismatches": mismatch_lines, "results": rows, "ratios": ratio_rows,
        "markdown": table, "parts_markdown": parts,
    }
    files.write_json(args.json, report)
    if args.markdown:
        files.write_text(args.markdown, table + "\n\n" + parts + "\n")
    log(f"wrote {args.json} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
