"""The shapes world's tokenizers (SHAPES.md): image tokenizer presets and trainers, the caption vocabulary.

vqgan.py and clip_text.py hold the general machinery (the VQGAN architecture, its
quantisers and checkpoint formats; CLIP's byte-level BPE and text tower) and know nothing
of the shapes world. This file holds what makes them the shapes world's:

    vqgan_config() / patterns_config(patterns)   the tokenizer presets of checkpoints/shapes/vqgan and .../patterns
    text_config()                       the small text tower over the shapes vocabulary
    SHAPES_BPE_PATH, SHAPES_VOCAB_SIZE  the shipped caption vocabulary and its number of ids
    learn_bpe(texts, size, path)        a byte-level BPE vocabulary in CLIP's file format
    train(args)                         the VQGAN trainer, or the k-means of the pattern tokenizer
    reconstruction_report(model)        how many reconstructions of the evaluation images still pass shapes.score

Command line (a command refuses to replace an existing output unless --overwrite is given):
    python shapes_tokenizers.py train --out runs/shapes-vqgan                  the 256-code VQGAN (3,000 steps)
    python shapes_tokenizers.py train --patterns 256 --out runs/shapes-patterns  the demo's colour x pattern tokenizer
    python shapes_tokenizers.py eval --checkpoint checkpoints/shapes/vqgan     reconstruction pass rate, codebook usage
    python shapes_tokenizers.py learn-bpe --out runs/bpe_shapes.txt.gz         the shapes caption vocabulary
"""
from __future__ import annotations

import argparse
import gzip
import math
import random
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import shapes
from clip_text import EOT, SOT, WORD_PATTERN, ClipTextError, TextConfig, clean_text, merge_pair, word_symbols
import files
from files import FileError, atomic_write, check_float, check_int, to_uint8
from vqgan import (TRAIN_STATE_NAME, VQGAN, VQGANConfig, VQGANError, load_vqgan, save_vqgan, side_by_side, to_tensor,
                   torch_device)

ROOT = Path(__file__).resolve().parent
SHAPES_BPE_PATH = ROOT / "checkpoints" / "shapes" / "bpe_shapes.txt.gz"  # the shipped caption vocabulary
SHAPES_VOCAB_SIZE = 573  # ids in SHAPES_BPE_PATH (`python shapes_tokenizers.py learn-bpe` prints it)


class TokenizerError(ValueError):
    """A user error of this file's commands: an output that exists, conflicting options."""


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------

def vqgan_config() -> VQGANConfig:
    """The shapes-world VQGAN: 64x64 -> 8x8 tokens, decoding to the world's palette (SHAPES.md).

    A patch encoder (every black patch is one token, see vqgan.PatchEncoder) and a narrow
    decoder (8 channels at full resolution) that stays fast on a CPU at sampling time; one
    GroupNorm group, because per-channel groups would normalise a lone object's colour away.
    """
    palette = ((0, 0, 0),) + tuple(shapes.COLORS.values())  # background first
    return VQGANConfig(resolution=64, out_channels=len(palette), ch=8, ch_mult=(1, 1, 2, 4), num_res_blocks=1,
                       attn_resolutions=(), z_channels=32, embed_dim=16, n_embed=256, quantizer="vector",
                       norm_groups=1, palette=palette, encoder="patch")


def patterns_config(patterns: int = 256) -> VQGANConfig:
    """The shapes-world tokenizer with colour-factored codes (vqgan.PatternQuantizer): 64x64 -> 8x8
    tokens, code = colour * patterns + pattern, over the world's 7-colour palette."""
    palette = vqgan_config().palette
    return VQGANConfig(resolution=64, out_channels=len(palette), ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=0,
                       attn_resolutions=(), z_channels=8, embed_dim=8, n_embed=len(palette) * patterns,
                       quantizer="pattern", norm_groups=1, palette=palette, encoder="patch")


def text_config() -> TextConfig:
    """A small text tower for the shapes world, over the vocabulary of `SHAPES_BPE_PATH`."""
    return TextConfig(vocab_size=SHAPES_VOCAB_SIZE, context_length=24, width=128, heads=4, layers=3, embed_dim=128)


# ---------------------------------------------------------------------------
# Outputs: never replaced without --overwrite
# ---------------------------------------------------------------------------

def check_output(path, overwrite: bool, what: str, flag: str = "--out") -> Path:
    """`path` if a command may write there: it does not exist yet, or `overwrite` says to replace it
    (files.check_output, raising this file's TokenizerError)."""
    try:
        return files.check_output(path, overwrite, what, flag)
    except FileError as error:
        raise TokenizerError(str(error)) from None


MAX_TEXTS_BYTES = 256 * 1024 * 1024  # learn-bpe --texts larger than this is not read


def check_seeds(flag: str, seeds) -> None:
    if not 1 <= len(seeds) <= 64:
        raise TokenizerError(f"{flag} takes 1 to 64 render seeds, got {len(seeds)}")
    for seed in seeds:
        check_int(flag, seed, 0, 2**32 - 1, TokenizerError)


def check_train_args(args) -> None:
    """Every number of `train`, before any work (the network's sizes are VQGANConfig's to check)."""
    E = TokenizerError
    check_int("--steps", args.steps, 1, 10**7, E)
    check_int("--batch-size", args.batch_size, 1, 1024, E)
    check_float("--lr", args.lr, 0.0, 10.0, E, low_open=True)
    check_int("--warmup", args.warmup, 0, 10**7, E)
    check_int("--patterns", args.patterns, 0, 8192, E)
    check_int("--pattern-images", args.pattern_images, 1, 10**7, E)
    check_int("--pattern-iterations", args.pattern_iterations, 1, 10**4, E)
    check_float("--foreground-weight", args.foreground_weight, 0.0, 1e6, E)
    check_float("--edge-weight", args.edge_weight, 0.0, 1e6, E)
    for flag in ("restart_every", "sample_every", "checkpoint_every"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1, 10**9, E)
    check_float("--max-minutes", args.max_minutes, 0.0, 1e7, E)
    check_seeds("--eval-seeds", args.eval_seeds)
    check_int("--seed", args.seed, 0, 2**63 - 1, E)
    check_int("--threads", args.threads, 0, 1024, E)
    torch_device(args.device)
    if not args.patterns and not args.resume:
        network_config(args)  # its fields, before --out is touched


# ---------------------------------------------------------------------------
# The caption vocabulary (SHAPES_BPE_PATH)
# ---------------------------------------------------------------------------

def learn_bpe(texts, vocab_size: int, out_path) -> int:
    """Learn a byte-level BPE vocabulary of at most `vocab_size` ids from `texts`; write it to
    `out_path` in CLIP's file format (gzipped when the name ends in .gz). Returns the number of ids.

    Texts are cleaned and pre-tokenised exactly as `clip_text.Tokenizer.encode` does. Each round
    merges the most frequent adjacent pair over all words (ties: the pair seen first), until the
    vocabulary is full or every word is a single symbol; so a small corpus may stop early.
    Plain counting, O(merges x distinct words): meant for small vocabularies.
    """
    n_merges = vocab_size - 2 * 256 - 2
    if n_merges < 0:
        raise ClipTextError(f"vocab_size {vocab_size} is below the 514 ids of the bytes and special tokens; use >= 514")
    counts = Counter(w for text in texts for w in WORD_PATTERN.findall(clean_text(text)) if w not in (SOT, EOT))
    words = {tuple(word_symbols(w)): c for w, c in counts.items()}  # symbols of each distinct word -> count
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=pairs.__getitem__)  # first of the most frequent, in corpus order
        merges.append(best)
        words = {tuple(merge_pair(list(symbols), best)): c for symbols, c in words.items()}
    data = ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")
    if str(out_path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: the same corpus gives the same bytes
    atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))
    return 2 * 256 + len(merges) + 2


def shapes_captions(count: int, seed: int = 0) -> list[str]:
    """`count` training-split captions of the shapes world (the corpus of SHAPES_BPE_PATH at seed 0, 20,000)."""
    rng = random.Random(seed)
    return [shapes.sample_caption(rng, "train") for _ in range(count)]


# ---------------------------------------------------------------------------
# Evaluation of a tokenizer
# ---------------------------------------------------------------------------

EVAL_SEEDS = (0, 1)


def shapes_eval_set(seeds=EVAL_SEEDS, **render) -> tuple[list[str], np.ndarray]:
    """(captions, images (N, 64, 64, 3) uint8) for every evaluation caption and seed (render: align, jitter)."""
    captions = [c for c in shapes.eval_captions() for _ in seeds]
    images = np.stack([np.asarray(shapes.render(c, s, **render)) for c in shapes.eval_captions() for s in seeds])
    return captions, images


@torch.no_grad()
def unseen_codes(model: VQGAN, train_images: int, seeds=EVAL_SEEDS, batch_size: int = 500, **render) -> dict:
    """How many novel evaluation images (held-out pairs, SHAPES.md) need a code that none of
    `train_images` training renders produce: codes a generator never sees in training."""
    seen = torch.zeros(model.config.n_embed, dtype=torch.bool)
    for step, start in enumerate(range(0, train_images, batch_size)):
        batch = shapes_batch(0, step, min(batch_size, train_images - start), **render)
        seen[model.encode(to_tensor(batch)).flatten()] = True
    captions, images = shapes_eval_set(seeds, **render)
    novel = np.array([shapes.is_novel(c) for c in captions])
    tokens = model.encode(to_tensor(images[novel])).flatten(1)  # (N, n)
    needs = (~seen[tokens]).any(1)
    return {"novel_images": int(novel.sum()), "needing_unseen_code": int(needs.sum()),
            "codes_seen_in_training": int(seen.sum()), "train_images": train_images}


@torch.no_grad()
def reconstruction_report(model: VQGAN, seeds=EVAL_SEEDS, batch_size: int = 64, device: str = "cpu", **render) -> dict:
    """How many reconstructions of the shapes evaluation images still pass shapes.score, and codebook usage."""
    captions, images = shapes_eval_set(seeds, **render)
    model.eval()
    passed, counts = [], torch.zeros(model.config.n_embed, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start:start + batch_size]).to(device)
        tokens = model.encode(batch)  # (B, h, w)
        counts += torch.bincount(tokens.flatten().cpu(), minlength=model.config.n_embed)
        for array, caption in zip(to_uint8(model.decode(tokens)), captions[start:start + batch_size]):
            passed.append(shapes.score(array, caption))
    novel = [shapes.is_novel(c) for c in captions]
    probs = counts.float() / counts.sum()
    perplexity = float(torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()))

    def rate(select):
        chosen = [p for p, keep in zip(passed, select) if keep]
        return sum(chosen) / len(chosen)

    return {"pass_rate": rate([True] * len(passed)), "pass_rate_seen": rate([not n for n in novel]),
            "pass_rate_novel": rate(novel), "images": len(passed), "codes_used": int((counts > 0).sum()),
            "n_embed": model.config.n_embed, "perplexity": round(perplexity, 1),
            "grid": list(model.grid_size(images.shape[1]))}


def format_report(report: dict) -> str:
    return (f"reconstructions passing shapes.score: {report['pass_rate']:.2%} of {report['images']} "
            f"(seen {report['pass_rate_seen']:.2%}, novel {report['pass_rate_novel']:.2%}); "
            f"codebook usage {report['codes_used']}/{report['n_embed']} (perplexity {report['perplexity']}); "
            f"token grid {report['grid'][0]}x{report['grid'][1]}")


def shapes_batch(seed: int, step: int, batch_size: int, **render) -> np.ndarray:
    """A batch of training-split renders, determined by (seed, step) so a resumed run sees the
    same data (render: shapes.render's align and jitter)."""
    rng = random.Random(f"vqgan:{seed}:{step}")
    return np.stack([np.asarray(shapes.render(shapes.sample_caption(rng, "train"), rng.randrange(2 ** 31), **render))
                     for _ in range(batch_size)])


def reconstruction_loss(model: VQGAN, decoded: torch.Tensor, images: torch.Tensor,
                        foreground_weight: float, edge_weight: float) -> torch.Tensor:
    """Per-pixel loss, up-weighted on object pixels and along edges.

    With a palette: cross-entropy against each pixel's palette colour; without one: L1 +
    squared error on RGB. Shapes images are mostly black, and the scorer judges a shape by
    how much of its bounding box it fills, so the few pixels at corners, apexes and the
    2-px gaps between objects decide; unweighted, the loss tolerates rounding them off.
    Edge pixels are those whose 3x3 neighbourhood is not one colour.
    """
    foreground = (images.max(1, keepdim=True).values > -0.5).float()  # (B, 1, H, W)
    spread = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)  # 3x3 max - 3x3 min, (B, 3, H, W)
    edges = (spread.abs().sum(1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
    weight = (1 + foreground_weight * foreground + edge_weight * edges)[:, 0]  # (B, H, W)
    # Mean weight 1: the reconstruction term keeps its scale relative to the quantiser's commitment
    # term; otherwise the encoder drifts away from the codebook (measured: 94.8 % vs 97.7 % pass).
    weight = weight / weight.mean()
    if model.config.palette:
        per_pixel = F.cross_entropy(decoded, model.palette_classes(images), reduction="none")  # (B, H, W)
    else:
        error = decoded - images
        per_pixel = (error.abs() + error ** 2).mean(1)  # (B, H, W)
    return (weight * per_pixel).mean()


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def foreground_masks(model: VQGAN, seed: int, images: int, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct non-empty f x f foreground masks of `images` training renders and how often each occurs."""
    masks = []
    for step in range(math.ceil(images / batch_size)):
        batch = to_tensor(shapes_batch(seed, step, min(batch_size, images - step * batch_size)))
        cells = model.quantize.cells(model.palette_classes(batch)).flatten(0, 2) > 0  # (B*h*w, f*f)
        masks.append(cells[cells.any(1)])
    return torch.unique(torch.cat(masks), dim=0, return_counts=True)


def kmeans_patterns(masks: torch.Tensor, counts: torch.Tensor, patterns: int, iterations: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Weighted k-means (Lloyd) of binary masks (U, f*f) into `patterns` centroids, row 0 fixed empty.

    Returns (centroids (patterns, f*f) in [0, 1], the mean number of wrong pixels per
    non-empty patch once each mask is decoded as its centroid thresholded at 0.5).
    """
    x, weight = masks.float(), counts.float()
    k = patterns - 1  # row 0 is the empty mask
    if x.shape[0] <= k:
        centroids = torch.cat([x, x.new_zeros(k - x.shape[0], x.shape[1])])
    else:
        centroids = x[torch.multinomial(weight, k, replacement=False, generator=generator)]
    for _ in range(iterations):
        assign = (centroids.square().sum(-1) - 2 * x @ centroids.t()).argmin(-1)  # (U,)
        total = torch.zeros_like(centroids).index_add_(0, assign, x * weight[:, None])
        mass = torch.zeros(k).index_add_(0, assign, weight)
        empty = mass == 0
        centroids = torch.where(empty[:, None], centroids, total / mass.clamp_min(1)[:, None])
        if empty.any():  # re-seed unused centroids on the masks they describe worst
            error = ((x - centroids[assign]).square().sum(-1) * weight)
            centroids[empty] = x[error.topk(int(empty.sum())).indices]
    table = torch.cat([x.new_zeros(1, x.shape[1]), centroids])  # (patterns, f*f)
    assign = (table.square().sum(-1) - 2 * x @ table.t()).argmin(-1)
    wrong = ((table[assign] > 0.5) != (x > 0.5)).sum(-1).float()
    return table, float((wrong * weight).sum() / weight.sum())


def recorded_args(args) -> dict:
    """The options a checkpoint's config.json records under "train" (not how the command was run)."""
    return {k: v for k, v in vars(args).items() if k not in ("run", "resume", "overwrite")}


def prepare_output(args) -> Path:
    """The run folder --out, checked: a fresh training run never writes into an existing non-empty
    folder unless --overwrite is given (then the previous run's train state and sample sheets go);
    --resume continues the run in it."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise TokenizerError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.resume:
        if args.patterns:
            raise TokenizerError("--resume continues a VQGAN training; the k-means of --patterns has nothing to resume")
        return out
    check_output(out, args.overwrite, "folder")
    if out.is_dir():  # --overwrite: nothing of the previous run may be read back as this one's
        (out / TRAIN_STATE_NAME).unlink(missing_ok=True)
        for sheet in (out / "samples").glob("step_*.png"):
            sheet.unlink()
    return out


def train_patterns(args) -> dict:
    """Fit the pattern quantizer's mask codebook by k-means on training renders; returns the reconstruction report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model = VQGAN(patterns_config(args.patterns))
    masks, counts = foreground_masks(model, args.seed, args.pattern_images)
    generator = torch.Generator().manual_seed(args.seed)
    table, wrong = kmeans_patterns(masks, counts, args.patterns, args.pattern_iterations, generator)
    model.quantize.masks.copy_(table)
    report = reconstruction_report(model, seeds=args.eval_seeds)
    minutes = (time.time() - start) / 60
    print(f"k-means of {int(counts.sum())} non-empty patches ({masks.shape[0]} distinct) into {args.patterns} patterns: "
          f"{wrong:.2f} wrong pixels per patch; {minutes:.1f} min")
    meta = {"train": recorded_args(args), "step": args.pattern_iterations,
            "metrics": {**report, "wrong_pixels_per_patch": round(wrong, 3), "train_minutes_this_run": round(minutes, 1)}}
    save_vqgan(model, args.out, meta)
    print(format_report(report))
    return report


def network_config(args) -> VQGANConfig:
    """The VQGAN the flags describe (the preset with --encoder, --n-embed, --ch, ...), every field
    checked by VQGANConfig before anything is built."""
    preset = vqgan_config()
    return replace(preset, encoder=args.encoder, n_embed=args.n_embed, embed_dim=args.embed_dim, ch=args.ch,
                   ch_mult=tuple(args.ch_mult), num_res_blocks=args.num_res_blocks, z_channels=args.z_channels,
                   norm_groups=args.norm_groups, palette=preset.palette if args.palette else (),
                   out_channels=preset.out_channels if args.palette else 3)


def read_train_state(path: Path, n_embed: int, device) -> dict:
    """train_state.pt, weights-only, every field checked before use."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated, foreign, or a pickle holding more than tensors: all fail differently
        raise VQGANError(f"{path} cannot be read as a weights-only file ({type(error).__name__}); "
                         "start again with --overwrite") from None
    ok = (isinstance(state, dict) and files.is_whole(state.get("step")) and state["step"] >= 0
          and isinstance(state.get("optimizer"), dict) and isinstance(state.get("usage"), torch.Tensor)
          and tuple(state["usage"].shape) == (n_embed,))
    if not ok:
        raise VQGANError(f"{path} lacks step, optimizer or a usage count per code; start again with --overwrite")
    return state


def train(args) -> dict:
    """Train a shapes-world VQGAN into args.out; returns the final reconstruction report."""
    if args.patterns:
        return train_patterns(args)
    from tqdm import tqdm  # a progress bar only here

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if args.resume:
        if not (out / TRAIN_STATE_NAME).is_file():
            raise VQGANError(f"--resume: {out / TRAIN_STATE_NAME} not found; start without --resume")
        model = load_vqgan(out).to(device)
        state = read_train_state(out / TRAIN_STATE_NAME, model.config.n_embed, device)
        step, usage = state["step"], state["usage"].cpu()
    else:
        config = network_config(args)
        model, state, step = VQGAN(config).to(device), None, 0
        usage = torch.zeros(config.n_embed, dtype=torch.long)
    if model.config.quantizer != "vector":
        raise VQGANError("the shapes trainer trains the vector quantiser only")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError):
            raise VQGANError(f"{out / TRAIN_STATE_NAME} holds an optimizer for another model; start again with --overwrite") from None
    generator = torch.Generator().manual_seed(args.seed + step)
    preview = to_tensor([shapes.render(c, 0) for c in shapes.eval_captions()[:16]]).to(device)  # fixed grid images
    (out / "samples").mkdir(exist_ok=True)
    start_time, start_step = time.time(), step
    meta = {"train": recorded_args(args)}

    def checkpoint():
        save_vqgan(model, out, {**meta, "step": step})
        atomic_write(out / TRAIN_STATE_NAME, lambda tmp: torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "usage": usage}, tmp))

    progress = tqdm(total=args.steps, initial=step, desc="vqgan", dynamic_ncols=True)
    while step < args.steps:
        if args.max_minutes and time.time() - start_time > 60 * args.max_minutes:
            progress.write(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break
        model.train()
        images = to_tensor(shapes_batch(args.seed, step, args.batch_size)).to(device)  # (B, 3, 64, 64)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        z = model.pre_quant(images)  # (B, D, 8, 8)
        if step == 0 or (step % args.restart_every == 0 and step < args.steps * 0.9):
            # Dead-code restart: codes unused since the last check jump onto random current encodings.
            # At step 0 every code counts as dead, which initialises the codebook from data.
            restarted = model.quantize.restart_dead_codes(z, usage == 0, generator)
            if step:
                progress.write(f"step {step}: restarted {restarted} dead codes")
            usage.zero_()
        z_q, quant_loss, tokens = model.quantize(z)
        decoded = model.decoder(model.post_quant_conv(z_q))  # (B, out_channels, 64, 64)
        rec_loss = reconstruction_loss(model, decoded, images, args.foreground_weight, args.edge_weight)
        loss = rec_loss + quant_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(tokens.flatten().cpu(), minlength=model.config.n_embed)
        step += 1
        progress.update(1)
        progress.set_postfix(rec=f"{rec_loss.item():.4f}", vq=f"{quant_loss.item():.4f}",
                             used=int((usage > 0).sum()))
        if step % args.sample_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                sheet = side_by_side(to_uint8(preview), to_uint8(model.decode(model.encode(preview))), scale=2)
            atomic_write(out / "samples" / f"step_{step:06d}.png", lambda tmp: sheet.save(tmp, format="PNG"))
        if step % args.checkpoint_every == 0:
            checkpoint()
    progress.close()
    minutes = (time.time() - start_time) / 60
    report = reconstruction_report(model, seeds=args.eval_seeds, device=device)
    meta["metrics"] = {**report, "train_minutes_this_run": round(minutes, 1), "steps_this_run": step - start_step}
    checkpoint()
    print(f"trained {step - start_step} steps in {minutes:.1f} min; {format_report(report)}")
    return report


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def cmd_eval(args) -> None:
    check_seeds("--seeds", args.seeds)
    check_int("--align", args.align, 1, 8, TokenizerError)
    check_int("--unseen-codes", args.unseen_codes, 0, 10**6, TokenizerError)
    torch_device(args.device)
    model = load_vqgan(args.checkpoint).to(args.device)
    start = time.time()
    render = {"align": args.align, "jitter": args.jitter}
    report = reconstruction_report(model, seeds=args.seeds, device=args.device, **render)
    print(format_report(report) + f"  ({time.time() - start:.1f} s)")
    if args.unseen_codes:
        r = unseen_codes(model.cpu(), args.unseen_codes, seeds=args.seeds, **render)
        print(f"{r['needing_unseen_code']} of {r['novel_images']} novel evaluation images need a code that none of "
              f"{r['train_images']} training renders produce ({r['codes_seen_in_training']} codes seen)")


def cmd_train(args) -> None:
    check_train_args(args)
    if args.out is None:
        args.out = "runs/shapes-patterns" if args.patterns else "runs/shapes-vqgan"
    prepare_output(args)
    train(args)


def cmd_learn_bpe(args) -> None:
    check_int("--vocab-size", args.vocab_size, 514, 2**20, TokenizerError)
    check_int("--captions", args.captions, 1, 10**7, TokenizerError)
    check_int("--seed", args.seed, 0, 2**63 - 1, TokenizerError)
    out = check_output(args.out, args.overwrite, "file")
    if args.texts:
        try:
            if Path(args.texts).stat().st_size > MAX_TEXTS_BYTES:
                raise TokenizerError(f"--texts {args.texts} is over {MAX_TEXTS_BYTES >> 20} MiB; pass a smaller corpus")
            texts = Path(args.texts).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise TokenizerError(f"--texts {args.texts} is not UTF-8 text: one caption per line expected") from None
    else:
        texts = shapes_captions(args.captions, args.seed)
    size = learn_bpe(texts, args.vocab_size, out)
    print(f"wrote {out}: {size} ids (of at most {args.vocab_size})")


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    preset = vqgan_config()

    ev = sub.add_parser("eval", help="shapes reconstruction pass rate and codebook usage", formatter_class=formatter)
    ev.add_argument("--checkpoint", default="checkpoints/shapes/vqgan", help="VQGAN directory")
    ev.add_argument("--seeds", type=int, nargs="+", default=list(EVAL_SEEDS), help="render seeds per evaluation caption")
    ev.add_argument("--align", type=int, default=1, help="render objects with corners on multiples of this many px")
    ev.add_argument("--jitter", action=argparse.BooleanOptionalAction, default=True, help="SHAPES.md's +-1 px size jitter")
    ev.add_argument("--unseen-codes", type=int, default=0, metavar="N",
                    help="also count the novel evaluation images that need a code absent from N training renders")
    ev.add_argument("--device", default="cpu", help="torch device")
    ev.set_defaults(run=cmd_eval)

    tr = sub.add_parser("train", help="train the shapes-world VQGAN (or, with --patterns, the pattern tokenizer)",
                        formatter_class=formatter)
    tr.add_argument("--out", default=None,
                    help="run directory: checkpoint, samples/, train state (default: runs/shapes-vqgan, with "
                         "--patterns runs/shapes-patterns); an existing one needs --resume or --overwrite")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint and train state in --out")
    tr.add_argument("--overwrite", action="store_true", help="replace what an earlier run left in --out")
    tr.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    tr.add_argument("--batch-size", type=int, default=16, help="images per step")
    tr.add_argument("--lr", type=float, default=4e-3, help="peak Adam learning rate")
    tr.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    tr.add_argument("--n-embed", type=int, default=preset.n_embed, help="codebook size")
    tr.add_argument("--encoder", choices=("patch", "taming"), default=preset.encoder,
                    help="patch: each token sees only its own patch (see vqgan.PatchEncoder); taming: convolutional")
    tr.add_argument("--embed-dim", type=int, default=preset.embed_dim, help="codebook vector size")
    tr.add_argument("--ch", type=int, default=preset.ch, help="channels of the first level")
    tr.add_argument("--ch-mult", type=int, nargs="+", default=list(preset.ch_mult),
                    help="channel multiplier per level; f = 2 ** (levels - 1)")
    tr.add_argument("--num-res-blocks", type=int, default=preset.num_res_blocks, help="ResNet blocks per level")
    tr.add_argument("--z-channels", type=int, default=preset.z_channels, help="encoder output channels")
    tr.add_argument("--norm-groups", type=int, default=preset.norm_groups, help="GroupNorm groups")
    tr.add_argument("--palette", action=argparse.BooleanOptionalAction, default=True,
                    help="decode to the shapes palette, trained with cross-entropy (see VQGAN.to_image)")
    tr.add_argument("--patterns", type=int, default=0,
                    help="> 0: a colour-factored tokenizer (vqgan.PatternQuantizer) with this many masks per colour, "
                         "fitted by k-means; the network options below are then unused")
    tr.add_argument("--pattern-images", type=int, default=20_000, help="training renders whose patches the k-means fits")
    tr.add_argument("--pattern-iterations", type=int, default=30, help="k-means (Lloyd) iterations")
    tr.add_argument("--foreground-weight", type=float, default=4.0, help="extra loss weight on object pixels")
    tr.add_argument("--edge-weight", type=float, default=8.0, help="extra loss weight on pixels next to an edge")
    tr.add_argument("--restart-every", type=int, default=50, help="steps between dead-code restarts")
    tr.add_argument("--sample-every", type=int, default=250, help="steps between reconstruction grids in OUT/samples")
    tr.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    tr.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this many minutes; 0: no limit")
    tr.add_argument("--eval-seeds", type=int, nargs="+", default=list(EVAL_SEEDS),
                    help="render seeds per evaluation caption for the final report")
    tr.add_argument("--seed", type=int, default=0, help="random seed (data and initialisation)")
    tr.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 is fastest on a CPU shared with other jobs, 0 keeps torch's default")
    tr.add_argument("--device", default="cpu", help="torch device")
    tr.set_defaults(run=cmd_train)

    bpe = sub.add_parser("learn-bpe", help="learn a small caption vocabulary in CLIP's file format",
                         formatter_class=formatter)
    bpe.add_argument("--out", default="runs/bpe_shapes.txt.gz",
                     help=f"output file (.gz: gzipped); the shipped one is {SHAPES_BPE_PATH.relative_to(ROOT)}")
    bpe.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    bpe.add_argument("--vocab-size", type=int, default=1024,
                     help="most ids to learn (stops early once every word is one symbol)")
    bpe.add_argument("--texts", default=None, help="a text file, one caption per line (default: shapes-world training captions)")
    bpe.add_argument("--captions", type=int, default=20000, help="shapes captions to draw when --texts is not given")
    bpe.add_argument("--seed", type=int, default=0, help="seed of the shapes caption stream")
    bpe.set_defaults(run=cmd_learn_bpe)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (TokenizerError, VQGANError, ClipTextError, FileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
