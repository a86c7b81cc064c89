"""The shapes-world tokenizer: its trainer and its reconstruction test (SHAPES.md).

`python vqgan.py train` and `python vqgan.py eval` run these; the architecture, the
checkpoint formats and the taming loader stay in vqgan.py.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqgan import (TRAIN_STATE_NAME, VQGAN, VQGANConfig, VQGANError, atomic_write, load_vqgan, save_vqgan, side_by_side,
                   to_tensor, to_uint8)


EVAL_SEEDS = (0, 1)


def shapes_eval_set(seeds=EVAL_SEEDS, **render) -> tuple[list[str], np.ndarray]:
    """(captions, images (N, 64, 64, 3) uint8) for every evaluation caption and seed (render: align, jitter)."""
    import shapes
    captions = [c for c in shapes.eval_captions() for _ in seeds]
    images = np.stack([np.asarray(shapes.render(c, s, **render)) for c in shapes.eval_captions() for s in seeds])
    return captions, images


@torch.no_grad()
def unseen_codes(model: VQGAN, train_images: int, seeds=EVAL_SEEDS, batch_size: int = 500, **render) -> dict:
    """How many novel evaluation images (held-out pairs, SHAPES.md) need a code that none of
    `train_images` training renders produce: codes a generator never sees in training."""
    import shapes
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
    import shapes
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
    import shapes
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


def train_patterns(args) -> dict:
    """Fit the pattern quantizer's mask codebook by k-means on training renders; returns the reconstruction report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    model = VQGAN(VQGANConfig.shapes_patterns(args.patterns))
    masks, counts = foreground_masks(model, args.seed, args.pattern_images)
    generator = torch.Generator().manual_seed(args.seed)
    table, wrong = kmeans_patterns(masks, counts, args.patterns, args.pattern_iterations, generator)
    model.quantize.masks.copy_(table)
    report = reconstruction_report(model, seeds=args.eval_seeds)
    minutes = (time.time() - start) / 60
    print(f"k-means of {int(counts.sum())} non-empty patches ({masks.shape[0]} distinct) into {args.patterns} patterns: "
          f"{wrong:.2f} wrong pixels per patch; {minutes:.1f} min")
    meta = {"train": {k: v for k, v in vars(args).items() if k not in ("run", "resume")}, "step": args.pattern_iterations,
            "metrics": {**report, "wrong_pixels_per_patch": round(wrong, 3), "train_minutes_this_run": round(minutes, 1)}}
    save_vqgan(model, args.out, meta)
    print(format_report(report))
    return report


def train(args) -> dict:
    """Train a shapes-world VQGAN into args.out; returns the final reconstruction report."""
    if args.patterns:
        return train_patterns(args)
    from tqdm import tqdm
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
        state = torch.load(out / TRAIN_STATE_NAME, map_location=device, weights_only=True)
        step, usage = state["step"], state["usage"].cpu()
    else:
        preset = VQGANConfig.shapes()
        config = replace(preset, encoder=args.encoder, n_embed=args.n_embed, embed_dim=args.embed_dim, ch=args.ch, ch_mult=tuple(args.ch_mult),
                         num_res_blocks=args.num_res_blocks, z_channels=args.z_channels, norm_groups=args.norm_groups,
                         palette=preset.palette if args.palette else (),
                         out_channels=preset.out_channels if args.palette else 3)
        model, state, step = VQGAN(config).to(device), None, 0
        usage = torch.zeros(config.n_embed, dtype=torch.long)
    if model.config.quantizer != "vector":
        raise VQGANError("the shapes trainer trains the vector quantiser only")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    generator = torch.Generator().manual_seed(args.seed + step)
    import shapes
    preview = to_tensor([shapes.render(c, 0) for c in shapes.eval_captions()[:16]]).to(device)  # fixed grid images
    (out / "samples").mkdir(exist_ok=True)
    start_time, start_step = time.time(), step
    meta = {"train": {k: v for k, v in vars(args).items() if k not in ("run", "resume")}}

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
