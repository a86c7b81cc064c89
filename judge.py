"""A caption-image judge over VQ tokens, for re-ranking candidates (beyond the paper).

The paper keeps the best of 16 candidates by CLIP similarity (Section 4). On the shapes
world the generator's own self-score (Emage.self_score) finds extra and misshapen objects,
but tells a swapped relation from the right one only weakly: its likelihood of a layout
barely depends on which side of the other object a caption puts each one (README). This
judge is trained for exactly that question. It reads the caption and the image tokens in
one small bidirectional Transformer and says whether they match:

    JudgeConfig, Judge(config)          (text[B, L], image tokens[B, n]) -> match logits[B]
    hard_negatives(caption, rng)         captions one detail away: the mirrored relation, a word, the count
    train_judge(out, vqgan_dir, ...)     binary cross-entropy on rendered shapes images, minutes on a CPU
    save_judge(model, dir), load_judge(dir) -> (Judge, Tokenizer)

It reads tokens, not pixels, so it sees what the generator drew, in the generator's own
vocabulary, and costs one pass over 64 + L positions per candidate. With colour-factored
codes (vqgan.PatternQuantizer) the image embedding is the sum of a colour and a pattern
vector, as in the generator, so that a held-out colour-shape pair is made of trained parts.

What it learned on the shapes world (README, "The judge"): it tells a caption from its
one-word and count negatives, but not from the mirrored relation, which it ranks at chance
whatever was tried (grid or cell positions, linear coordinates, a ranking term on the mirror,
3 layers, width 128). Added to the self-score it moved the accuracy of the demo before the
mirror loss by no more than noise on fresh seeds, so `sample.py --judge` is off by default
(the mirror loss, emage.mirror_loss, taught the generator the relation instead).

Command line:
    python judge.py train --out checkpoints/shapes/judge
    python judge.py eval --judge checkpoints/shapes/judge
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_text
from clip_text import LayerNorm, Transformer

FORMAT = "emage.judge"  # the "format" field of config.json
SHAPES_JUDGE = Path(__file__).resolve().parent / "checkpoints" / "shapes" / "judge"
SHAPES_PATTERNS = Path(__file__).resolve().parent / "checkpoints" / "shapes" / "patterns"
WEIGHT = 8.0  # re-ranking score = Emage.self_score + WEIGHT * judge logit (the best of the README's sweep)


class JudgeError(ValueError):
    """A user error: a missing or mismatched judge checkpoint, bad training arguments."""


@dataclass
class JudgeConfig:
    vocab_size: int = clip_text.SHAPES_VOCAB_SIZE  # caption ids (the shapes BPE by default)
    context_length: int = 24  # caption positions, as the shapes text tower
    codebook_size: int = 7 * 256  # image token ids of the VQGAN it reads
    colours: int = 7  # > 0: codes are colour * (codebook_size // colours) + pattern, embedded as a sum
    grid: tuple[int, int] = (8, 8)  # image tokens per column and row
    width: int = 64  # residual width
    heads: int = 4  # attention heads
    layers: int = 2  # Transformer blocks over [judgement; caption; image]
    grid_positions: bool = True  # image position = row vector + column vector (else one vector per cell)
    coordinates: bool = True  # also add x * u + y * v (x, y in [-1, 1]): "left of" becomes a comparison

    @property
    def patterns(self) -> int:
        return self.codebook_size // self.colours if self.colours else self.codebook_size


class Judge(nn.Module):
    """Does the image match the caption? A logit per (caption, image) row.

    The sequence is [judgement token; caption tokens; image tokens], each with its own
    positional table, and every position sees every other (the caption's padding after its
    end token is masked out). The logit is read from the judgement token's final state.
    """

    def __init__(self, config: JudgeConfig):
        super().__init__()
        if config.width % config.heads:
            raise JudgeError(f"width {config.width} is not divisible by heads {config.heads}; pick another pair")
        if config.colours and config.codebook_size % config.colours:
            raise JudgeError(f"codebook_size {config.codebook_size} is not a multiple of colours {config.colours}")
        self.config = config
        n = config.grid[0] * config.grid[1]
        self.judgement = nn.Parameter(torch.zeros(config.width))
        self.text_embedding = nn.Embedding(config.vocab_size, config.width)
        self.text_positions = nn.Parameter(torch.zeros(config.context_length, config.width))
        if config.colours:
            self.colour_embedding = nn.Embedding(config.colours, config.width)
        self.code_embedding = nn.Embedding(config.patterns, config.width)  # patterns, or whole codes
        if config.grid_positions:
            self.row_positions = nn.Parameter(torch.zeros(config.grid[0], 1, config.width))
            self.column_positions = nn.Parameter(torch.zeros(1, config.grid[1], config.width))
        else:
            self.cell_positions = nn.Parameter(torch.zeros(n, config.width))
        if config.coordinates:
            self.coordinate_directions = nn.Parameter(torch.zeros(2, config.width))  # u (x), v (y)
            y, x = torch.meshgrid(torch.linspace(-1, 1, config.grid[0]), torch.linspace(-1, 1, config.grid[1]),
                                  indexing="ij")
            self.register_buffer("grid_xy", torch.stack([x.flatten(), y.flatten()], 1), persistent=False)  # (n, 2)
        self.transformer = Transformer(config.width, config.heads, config.layers)
        self.ln_final = LayerNorm(config.width)
        self.head = nn.Linear(config.width, 1)
        for name, p in self.named_parameters():
            if name.endswith("positions") or name in ("judgement", "coordinate_directions"):
                nn.init.normal_(p, std=0.02)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=config.width ** -0.5)

    def image_positions(self) -> torch.Tensor:
        """(n, width): one vector per grid cell, in raster order."""
        c = self.config
        if c.grid_positions:
            positions = (self.row_positions + self.column_positions).flatten(0, 1)  # (h * w, D)
        else:
            positions = self.cell_positions
        if c.coordinates:
            positions = positions + self.grid_xy @ self.coordinate_directions  # (n, D)
        return positions

    def embed_image(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """tokens[B, n] -> (B, n, width): colour + pattern vectors for factored codes."""
        c = self.config
        if not c.colours:
            return self.code_embedding(image_tokens)
        return self.colour_embedding(image_tokens // c.patterns) + self.code_embedding(image_tokens % c.patterns)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        B, L = text_tokens.shape
        if L > c.context_length:
            raise JudgeError(f"{L} caption tokens but the judge has {c.context_length} positions; "
                             f"tokenize with context_length={c.context_length}")
        if image_tokens.shape != (B, c.grid[0] * c.grid[1]):
            raise JudgeError(f"the judge reads {B} rows of {c.grid[0] * c.grid[1]} image tokens, "
                             f"got {tuple(image_tokens.shape)}")
        end = text_tokens.argmax(-1)  # (B,) the end token has the vocabulary's largest id
        L = int(end.max()) + 1  # the padding after the longest caption is never read
        text = self.text_embedding(text_tokens[:, :L]) + self.text_positions[:L]  # (B, L, D)
        drawn, where = self.drawn_tokens(image_tokens)  # (B, K) each
        image = self.embed_image(image_tokens.gather(1, where)) + self.image_positions()[where]  # (B, K, D)
        first = self.judgement.expand(B, 1, -1)  # (B, 1, D)
        x = torch.cat([first, text, image], dim=1)  # (B, 1 + L + K, D)
        in_caption = torch.arange(L, device=text_tokens.device) <= end[:, None]  # (B, L)
        visible = torch.cat([in_caption.new_ones(B, 1), in_caption, drawn], 1)  # (B, S)
        x = self.transformer(x, visible[:, None, None, :])  # (B, S, D); keys masked per row
        return self.head(self.ln_final(x[:, 0])).squeeze(-1)  # (B,)

    def drawn_tokens(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which grid positions the judge reads: (drawn BoolTensor[B, K], positions LongTensor[B, K]).

        With colour-factored codes a background-coloured token paints nothing, whatever its
        pattern, so only the other tokens enter the sequence, each at its grid position:
        a shapes image has 4 to 18 of its 64, and the judge runs about twice as fast. K is the
        most any row draws; the rows with fewer are padded with masked-out positions.
        Otherwise every position is read.
        """
        c = self.config
        n = image_tokens.shape[1]
        if not c.colours:
            where = torch.arange(n, device=image_tokens.device).expand_as(image_tokens)
            return torch.ones_like(image_tokens, dtype=torch.bool), where
        drawn = image_tokens >= c.patterns  # colour > 0
        K = max(1, int(drawn.sum(1).max()))
        where = drawn.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]  # drawn positions first, in order
        return drawn.gather(1, where), where


# ----------------------------------------------------------------------------------------
# Training data: rendered shapes examples and captions that do not match them
# ----------------------------------------------------------------------------------------


def hard_negatives(caption: str, rng: random.Random, split: str = "train") -> list[str]:
    """Captions the render of `caption` does not match, each one detail away.

    - the mirrored relation (two objects), the mistake the self-score misses most;
    - one changed colour, shape, size or relation (clip_image.mutate_caption);
    - the wrong count: one object of a two-object caption, or a one-object caption with a
      second object added.
    With split "train" they hold no held-out pair (a caption that holds one is then
    not a training caption: use split "any").
    """
    import shapes
    from clip_image import mutate_caption

    parsed = shapes.parse(caption)
    negatives = [mutate_caption(caption, rng, split)]
    if parsed.relation:
        negatives.append(shapes.mirrored(parsed))
        negatives.append(str(shapes.Caption((rng.choice(parsed.objects),), None)))
    else:
        while True:
            other = shapes.parse(shapes.sample_caption(rng, "train")).objects[0]
            pair = shapes.Caption((parsed.objects[0], other), rng.choice(shapes.RELATIONS))
            same = (other.color, other.shape) == (parsed.objects[0].color, parsed.objects[0].shape)
            if not same and (split != "train" or not pair.is_novel):
                negatives.append(str(pair))
                break
    return negatives


def render_pool(vq, num: int, seed: int, batch_size: int = 256) -> tuple[list[str], torch.Tensor]:
    """`num` training examples of the shapes stream (on the token grid, exact sizes, as the
    demo generator trains), tokenised: (captions, tokens LongTensor[num, n])."""
    import data
    import vqgan
    from tqdm import tqdm

    captions, codes = [], []
    for start in tqdm(range(0, num, batch_size), desc="render", unit="batch"):
        batch = [data.shapes_example(seed, i, align=8, jitter=False) for i in range(start, min(start + batch_size, num))]
        images = np.stack([np.asarray(image) for _, image in batch])  # (b, 64, 64, 3)
        with torch.no_grad():
            codes.append(vq.encode(vqgan.to_tensor(images)).flatten(1))  # (b, n)
        captions += [caption for caption, _ in batch]
    return captions, torch.cat(codes)


def judge_batch(rng: random.Random, captions: list[str], size: int):
    """`size` pool examples, each with its own caption (label 1) and its hard negatives (label 0):
    (caption texts, image row indices LongTensor[R], labels FloatTensor[R], mirror pairs
    LongTensor[P, 2]: the positions in the batch of each two-object caption and of its mirror)."""
    import shapes

    texts, rows, labels, pairs = [], [], [], []
    for i in rng.sample(range(len(captions)), size):
        positive = len(texts)
        mirror = shapes.mirrored(captions[i])
        for text, label in [(captions[i], 1.0)] + [(n, 0.0) for n in hard_negatives(captions[i], rng)]:
            if label == 0.0 and text == mirror:
                pairs.append((positive, len(texts)))
            texts.append(text)
            rows.append(i)
            labels.append(label)
    return texts, torch.tensor(rows), torch.tensor(labels), torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def judge_loss(logits: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor | None = None,
               mirror_weight: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy with the positives weighted so that they count as much as the
    negatives together (a positive has two or three negatives beside it), plus, with
    `mirror_weight` > 0, a ranking term softplus(mirror - caption) over the `pairs` of
    (caption, mirrored caption) on the same image: only the relation word tells them apart,
    so this term carries the relation signal that the cross-entropy dilutes among easy
    negatives."""
    weight = torch.where(labels > 0, (labels < 1).sum() / labels.sum().clamp(min=1), torch.ones_like(labels))
    loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weight)
    if mirror_weight and pairs is not None and len(pairs):
        loss = loss + mirror_weight * F.softplus(logits[pairs[:, 1]] - logits[pairs[:, 0]]).mean()
    return loss


@torch.no_grad()
def pairwise_accuracy(model: Judge, tokenizer: clip_text.Tokenizer, vq, seed: int = 0) -> dict[str, float]:
    """On one render of every evaluation caption (never trained on), the rate at which the judge
    puts the caption above the mirrored caption (two objects) and above each other hard
    negative, seen and novel captions apart."""
    import shapes
    import vqgan

    captions = shapes.eval_captions()
    images = np.stack([np.asarray(shapes.render(c, seed, align=8, jitter=False)) for c in captions])
    image_tokens = vq.encode(vqgan.to_tensor(images)).flatten(1)  # (N, n)
    rng = random.Random(seed)
    wins = {"seen": {"mirror": [], "other": []}, "novel": {"mirror": [], "other": []}}
    model.eval()
    for caption, row in zip(captions, image_tokens):
        split = "novel" if shapes.is_novel(caption) else "seen"
        texts = [caption] + hard_negatives(caption, rng, split="any")
        logits = model(tokenizer(texts, context_length=model.config.context_length), row.expand(len(texts), -1))
        mirror = shapes.contrast_for(caption)
        for text, logit in zip(texts[1:], logits[1:].tolist()):
            wins[split]["mirror" if text == mirror else "other"].append(logit < logits[0].item())
    return {f"{split}_{kind}": round(float(np.mean(v)), 4) for split, d in wins.items() for kind, v in d.items() if v}


def train_judge(out, vqgan_dir=SHAPES_PATTERNS, *, steps: int = 4000, batch_size: int = 64, lr: float = 1e-3,
                examples: int = 30_000, seed: int = 1, threads: int = 1, max_minutes: float = 12.0,
                log_every: int = 100, eval_every: int = 0, mirror_weight: float = 1.0,
                overrides: dict | None = None) -> dict:
    """Train a Judge on `examples` rendered shapes examples (stream seed `seed`) with AdamW and a
    cosine learning rate after 5 % warm-up; save it to `out`. Stops early after `max_minutes`
    (the steps done are recorded). Returns the pairwise accuracies stored in config.json."""
    import vqgan

    if steps < 1 or batch_size < 1 or examples < batch_size:
        raise JudgeError(f"need steps >= 1 and examples >= batch size >= 1, got {steps}, {examples}, {batch_size}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()
    vq = vqgan.load_vqgan(vqgan_dir).eval()
    quantizer = getattr(vq, "quantize", None)
    colours = getattr(quantizer, "colours", 0) if vq.config.quantizer == "pattern" else 0
    config = JudgeConfig(codebook_size=vq.config.n_embed, colours=colours, grid=vq.grid_size((64, 64)), **(overrides or {}))
    captions, tokens = render_pool(vq, examples, seed)
    tokenizer = clip_text.Tokenizer(clip_text.SHAPES_BPE_PATH)
    model = Judge(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    model.train()
    done = 0
    for step in range(steps):
        if time.perf_counter() - started > 60 * max_minutes:
            print(f"stopping after {step} steps: --max-minutes {max_minutes} reached", flush=True)
            break
        texts, rows, labels, pairs = judge_batch(rng, captions, batch_size)
        logits = model(tokenizer(texts, context_length=config.context_length), tokens[rows])
        loss = judge_loss(logits, labels, pairs, mirror_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if step % log_every == 0 or done == steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s", flush=True)
        if eval_every and done % eval_every == 0 and done < steps:
            print(f"step {done:5d}  {json.dumps(pairwise_accuracy(model, tokenizer, vq))}", flush=True)
            model.train()
    model.eval()
    report = pairwise_accuracy(model, tokenizer, vq)
    report.update(steps=done, batch_size=batch_size, lr=lr, examples=examples, seed=seed, mirror_weight=mirror_weight,
                  seconds=round(time.perf_counter() - started))
    save_judge(model, out, tokenizer.path, vqgan_dir, report)
    return report


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def save_judge(model: Judge, out_dir, tokenizer_path, vqgan_dir, training: dict | None = None) -> None:
    """config.json + model.safetensors + the vocabulary, written to a fresh folder that then
    replaces `out_dir` whole (an interrupted save leaves the previous judge in place)."""
    import data
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copyfile(tokenizer_path, tmp / Path(tokenizer_path).name)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {"format": FORMAT, "config": asdict(model.config), "tokenizer": Path(tokenizer_path).name,
            "vqgan_fingerprint": data.vqgan_fingerprint(vqgan_dir), "training": training or {}}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def load_judge(path, device="cpu") -> tuple[Judge, clip_text.Tokenizer]:
    """A judge saved by save_judge, in eval mode, and its tokenizer. Loads safetensors only."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise JudgeError(f"{path} is not a judge checkpoint (config.json + model.safetensors): "
                         f"train one with `python judge.py train --out {path}`")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise JudgeError(f"{path}/config.json is a {meta.get('format')!r} checkpoint, not a judge")
    fields = dict(meta["config"], grid=tuple(meta["config"]["grid"]))
    model = Judge(JudgeConfig(**fields))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device).eval(), clip_text.Tokenizer(path / meta["tokenizer"])


def fingerprint(path) -> str | None:
    """The fingerprint of the VQGAN a judge was trained on (data.vqgan_fingerprint)."""
    return json.loads((Path(path) / "config.json").read_text()).get("vqgan_fingerprint")


def resolve(path) -> Path | None:
    """A --judge value as a folder: "none" -> None, "auto" -> the shipped shapes judge, else the path."""
    if str(path).lower() == "none":
        return None
    return SHAPES_JUDGE if str(path) == "auto" else Path(path)


def judge_for(vqgan_dir, path="auto", device="cpu") -> tuple[Judge, clip_text.Tokenizer] | None:
    """The judge re-ranking uses for a generator whose VQGAN is `vqgan_dir`.

    path "auto": the shipped shapes judge when it reads this VQGAN's codes, else None;
    "none": None; a folder: that judge, which must have been trained on this VQGAN.
    """
    import data

    folder, auto = resolve(path), str(path) == "auto"
    if folder is None or (auto and not (folder / "config.json").is_file()):
        return None
    judge = load_judge(folder, device)  # a clear error if the folder holds no judge
    if fingerprint(folder) == data.vqgan_fingerprint(vqgan_dir):
        return judge
    if auto:
        return None
    raise JudgeError(f"the judge {folder} reads the codes of another VQGAN than {vqgan_dir}: "
                     f"train one for it with `python judge.py train --vqgan {vqgan_dir}`, or pass --judge none")


@torch.no_grad()
def judge_scores(judge: tuple[Judge, clip_text.Tokenizer], captions: list[str], image_tokens: torch.Tensor) -> torch.Tensor:
    """Match logits (R,) of R (caption, image tokens[R, n]) rows; a caption's rows may repeat."""
    model, tokenizer = judge
    device = next(model.parameters()).device
    text = tokenizer(captions, context_length=model.config.context_length).to(device)
    return model(text, image_tokens.to(device)).float().cpu()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict:
    """`--set width=96 --set grid_positions=false` -> {"width": 96, "grid_positions": False}, typed like the defaults."""
    defaults = asdict(JudgeConfig())
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults or key in ("vocab_size", "codebook_size", "colours", "grid"):
            raise JudgeError(f"--set {item!r}: expected KEY=VALUE with KEY one of width, heads, layers, "
                             f"context_length, grid_positions, coordinates")
        current = defaults[key]
        try:
            out[key] = value.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(value)
        except ValueError:
            raise JudgeError(f"--set {key}={value}: expected {type(current).__name__} like {current!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a judge on rendered shapes examples",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", default=str(SHAPES_JUDGE), help="checkpoint folder (replaced whole when done)")
    t.add_argument("--vqgan", default=str(SHAPES_PATTERNS), help="the tokenizer whose codes the judge reads")
    t.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=64, help="examples per step, each with 2-3 negatives")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--examples", type=int, default=30_000, help="rendered training examples")
    t.add_argument("--seed", type=int, default=1, help="stream seed of the examples and of training")
    t.add_argument("--threads", type=int, default=1, help="CPU threads")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a JudgeConfig field, e.g. --set width=96 --set grid_positions=false (repeatable)")
    t.add_argument("--mirror-weight", type=float, default=1.0,
                   help="weight of the ranking term between each caption and its mirrored relation")
    t.add_argument("--eval-every", type=int, default=0, help="print the pairwise accuracies every N steps (0: at the end only)")
    t.add_argument("--max-minutes", type=float, default=12.0, help="stop early (and save) after this long")
    e = sub.add_parser("eval", help="pairwise accuracy on the evaluation captions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--judge", default=str(SHAPES_JUDGE), help="judge checkpoint folder")
    e.add_argument("--vqgan", default=str(SHAPES_PATTERNS), help="the tokenizer it was trained on")
    return p


def main(argv=None) -> int:
    import data
    import vqgan

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            report = train_judge(args.out, args.vqgan, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 examples=args.examples, seed=args.seed, threads=args.threads,
                                 max_minutes=args.max_minutes, eval_every=args.eval_every,
                                 mirror_weight=args.mirror_weight,
                                 overrides=parse_overrides(args.set))
            print(f"wrote {args.out}: {json.dumps(report)}")
        else:
            model, tokenizer = load_judge(args.judge)
            print(json.dumps(pairwise_accuracy(model, tokenizer, vqgan.load_vqgan(args.vqgan).eval())))
    except (JudgeError, data.DataError, vqgan.VQGANError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
