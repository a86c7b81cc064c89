"""Train an Emage generator: `python train.py --variant 3`, on one CPU or many GPUs.

With no --data it trains on the shapes world (SHAPES.md): the first run tokenises a
shapes set once with the committed shapes tokenizer into `data/shapes-tokens`, then reads
it memory-mapped. By default its objects sit on the 8-px token grid at their exact sizes
(--shapes-align 8 --no-shapes-jitter, see the README); --shapes-align 1 --shapes-jitter
gives SHAPES.md's free placement. With --data DIR it reads token shards written by `python data.py prepare`.

    python train.py --variant 3                                       shapes world, CPU
    python train.py --variant 3 --preset paper --data DIR --text-init CLIP
    torchrun --nproc_per_node 8 train.py --preset paper --data DIR    DistributedDataParallel
    python train.py --variant 3 --init CKPT --set mirror_loss=1.0     fine-tune a checkpoint

Training (Section 4 of the paper): AdamW (lr 4.5e-4, betas 0.9/0.96, weight decay 4.5e-2),
batch 1024, gradient clipping 4.0, cosine learning rate with 2 % linear warm-up, FP32. The
shapes preset keeps the recipe but picks its own batch, learning rate and steps (PRESETS).

Every random number of a step is a function of (--seed, step, micro-batch): the batch is
`data.batch_indices(step)`, and micro-batch j of it (j = accumulation index * world size +
rank) draws its masks from a torch.Generator seeded with (seed, step, j). So a resumed run
repeats an uninterrupted one exactly, and N processes with accumulation A compute the same
update as one process with accumulation N * A.

Output directory (--out):
    step-0001000/          checkpoint: config.json + model.safetensors (emage.save_checkpoint),
                           the BPE vocabulary, train_state.pt (optimizer, step, RNG states)
    latest.json            {"step", "dir"} of the newest complete checkpoint; `latest` links to it
    metrics.jsonl          one JSON object per logged step and per evaluation
    samples/step-0001000.png   sample grid of the evaluation captions
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data
import emage
import vqgan
from clip_text import SHAPES_BPE_PATH, ClipTextError, Tokenizer

ROOT = Path(__file__).resolve().parent
SHAPES_VQGAN = ROOT / "checkpoints" / "shapes" / "patterns"  # the demo's colour-factored tokenizer
SHAPES_TOKENS = ROOT / "data" / "shapes-tokens"

# Per-preset training defaults (flags left unset take these). The paper's recipe is
# Section 4. Shapes: sweeps of #3 on a shared 2-core CPU, 9,600 examples each, loss at the
# end: lr 5e-4 / 1e-3 / 2e-3 at batch 32 -> 4.19 / 4.25 / 4.38; at the same examples,
# batch 16 / 32 / 64 -> 4.16 / 4.19 / 4.33. A batch of 32 costs ~1.2-4 s on one core
# (idle to busy machine), so 1,000 steps fit the ~40-minute demo budget.
PRESETS = {
    "paper": dict(batch_size=1024, lr=4.5e-4, steps=500_000, eval_every=5_000, log_every=50),
    "shapes": dict(batch_size=32, lr=5e-4, steps=1_000, eval_every=250, log_every=10),
}


class TrainError(ValueError):
    """A user error or a stopped run: bad flags, a diverged loss, a checkpoint that does not fit."""


# ----------------------------------------------------------------------------------------
# Pure pieces: learning rate, weight decay groups, seeds
# ----------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, base_lr: float, warmup: float = 0.02) -> float:
    """Cosine schedule with linear warm-up over the first `warmup` fraction of the steps
    (Section 4: "cosine learning rate scheduler with warm up ratio=0.02"). `step` counts
    from 0; the rate decays to 0 at `total_steps`."""
    warmup_steps = max(1, math.ceil(warmup * total_steps))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, not on biases and LayerNorm gains.
    Patch: the paper gives the decay (4.5e-2) but not its scope; this is GPT-2 / nanoGPT's rule."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of the mask noise of micro-batch `micro` of step `step` (independent streams)."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def apply_overrides(config, overrides: list[str]):
    """`--set layers=2 --set text.width=64`: replace dataclass fields, typed like the default."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainError(f"--set {item!r} is not key=value (for example --set layers=2)")
        target, *path = key.split(".")
        obj, name = config, target
        for part in path:
            obj, name = getattr(obj, name), part
        if not is_dataclass(obj) or name not in {f.name for f in fields(obj)}:
            raise TrainError(f"--set {key}: no such config field; see EmageConfig in emage.py")
        current = getattr(obj, name)
        try:
            if isinstance(current, bool):
                parsed = value.lower() in ("1", "true", "yes")
            elif isinstance(current, tuple):
                parsed = tuple(int(v) for v in value.split(","))
            else:
                parsed = type(current)(value)
        except ValueError:
            raise TrainError(f"--set {key}={value}: expected {type(current).__name__} like {current!r}") from None
        setattr(obj, name, parsed)
    return config


# ----------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------


def setup_distributed(device_arg: str | None):
    """(rank, world_size, device). Under torchrun: one process per GPU with NCCL, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and device_arg in (None, "cuda")
    if device_arg not in (None, "cpu", "cuda"):
        raise TrainError(f"--device {device_arg}: use cpu or cuda")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


class LossModule(nn.Module):
    """DistributedDataParallel synchronises gradients through forward(); Emage trains through
    .loss(), so this forwards one to the other."""

    def __init__(self, model: emage.Emage):
        super().__init__()
        self.model = model

    def forward(self, text_tokens, image_tokens, variant, generator, contrast_tokens=None):
        return self.model.loss(text_tokens, image_tokens, variant, generator=generator, contrast_tokens=contrast_tokens)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def shapes_tokens(args, rank: int, world: int) -> Path:
    """The tokenised shapes set, built on first use (all ranks encode a share of the shards)."""
    out = Path(args.shapes_cache)
    source = data.ShapesSource(args.shapes_examples, seed=args.shapes_seed, align=args.shapes_align, jitter=args.shapes_jitter)
    vqgan_dir = args.vqgan or SHAPES_VQGAN
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("vqgan_fingerprint") != data.vqgan_fingerprint(vqgan_dir):
            raise TrainError(f"{out} was tokenised with another VQGAN; delete it (or pass --shapes-cache NEW_DIR) to rebuild")
        if meta.get("source") != source.description:
            raise TrainError(f"{out} holds {meta.get('source')}, not {source.description}; delete it, pass "
                             f"--shapes-cache NEW_DIR, or match --shapes-examples/--shapes-seed")
        return out
    if rank == 0:
        print(f"tokenising {args.shapes_examples} shapes examples once into {out} (minutes on a CPU; kept for later runs)", flush=True)
    data.prepare(source, vqgan_dir, out, shard_size=10_000, rank=rank, world_size=world, device="cpu")
    if world > 1:
        dist.barrier()
    return out


def contrast_tokens(tokenizer, captions: list[str], config: emage.EmageConfig) -> torch.Tensor | None:
    """The captions' mirrors for EmageConfig.mirror_loss, tokenised (None when it is off).
    A caption with no mirror (one object, or outside the shapes grammar) is its own
    contrast, which the loss skips."""
    if not config.mirror_loss:
        return None
    import shapes

    mirrors = [shapes.contrast_for(caption) or caption for caption in captions]
    return tokenizer(mirrors, context_length=config.text.context_length)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def save(out: Path, model: emage.Emage, optimizer, step: int, args, tokenizer_path, vqgan_dir, rng_states, keep: int) -> Path:
    """Write checkpoint `step` into a fresh folder, publish it by renaming, then point latest at it.

    The folder appears whole or not at all (rename), and latest.json moves only once it
    does; an interrupted save leaves the previous checkpoint in place.
    """
    final = out / checkpoint_name(step)
    tmp = out / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    emage.save_checkpoint(model, tmp, variant=args.variant, step=step, tokenizer_path=tokenizer_path,
                          vqgan_dir=vqgan_dir, extra={"train_args": vars(args)})
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_states,
             "schedule": {"steps": args.steps, "lr": args.lr, "warmup": args.warmup}, "seed": args.seed}
    torch.save(state, tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    data._write_json(out / "latest.json", {"step": step, "dir": final.name})
    link = out / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(final.name)
        os.replace(link, out / "latest")
    except OSError:
        pass  # symlinks are a convenience; latest.json is the record
    old = sorted(p for p in out.glob("step-*") if p.is_dir() and p.name != final.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p)
    return final


def find_resume(out: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    record = out / "latest.json"
    if not record.is_file():
        raise TrainError(f"--resume: {out} has no latest.json; pass the checkpoint directory, e.g. --resume {out}/step-0001000")
    return out / json.loads(record.read_text())["dir"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a run resumes from)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        data._atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))


# ----------------------------------------------------------------------------------------
# Evaluation: sample grid and shapes accuracy
# ----------------------------------------------------------------------------------------


def tokens_to_images(vq, tokens: torch.Tensor, grid) -> list:
    """Codes [B, n] -> list of PIL images (VQGAN decoder output [-1, 1] -> uint8)."""
    from PIL import Image

    with torch.no_grad():
        x = vq.decode(tokens.view(-1, *grid))  # (B, 3, H, W) in [-1, 1]
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in x]


def image_grid(images, captions, scale: int = 2, cols: int = 4):
    """Images in rows of `cols`, upscaled (nearest) by `scale`, each over its wrapped caption."""
    from PIL import Image, ImageDraw

    size = images[0].size[0] * scale
    label = 46  # four lines of PIL's default font
    rows = -(-len(images) // cols)
    canvas = Image.new("RGB", (cols * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % cols) * size, (i // cols) * (size + label)
        canvas.paste(image.resize((size, size), Image.NEAREST), (x, y))
        words, lines = caption.split(), [""]
        for w in words:
            lines[-1:] = [lines[-1], w] if len(lines[-1]) + len(w) + 1 > size // 6 and lines[-1] else [f"{lines[-1]} {w}".strip()]
        draw.multiline_text((x + 2, y + size + 1), "\n".join(lines[:4]), fill="black", spacing=0)
    return canvas


def evaluate(model, vq, tokenizer, captions, context_length, grid, device, seed, shapes_world: bool):
    """Generate one image per caption (the variant's own algorithm, 16 rounds); score them
    against SHAPES.md when training on the shapes world. Returns (metrics, images)."""
    was_training = model.training
    model.eval()
    text = tokenizer(captions, context_length=context_length).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = model.generate(text, steps=16, generator=generator)  # (B, n)
    model.train(was_training)
    images = tokens_to_images(vq, tokens, grid) if vq is not None else []
    metrics = {}
    if shapes_world and images:
        import shapes

        report = shapes.accuracy_report([(c, shapes.score(im, c)) for c, im in zip(captions, images)])
        metrics = {f"accuracy_{k}": v["accuracy"] for k, v in report.items()}
    return metrics, images


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------


def vqgan_colours(vqgan_dir) -> int:
    """Palette size of a colour-factored VQGAN (quantizer "pattern"), else 0: EmageConfig.colours."""
    path = Path(vqgan_dir) / "config.json"
    config = json.loads(path.read_text()).get("config", {}) if path.is_file() else {}
    return len(config.get("palette", ())) if config.get("quantizer") == "pattern" else 0


def build_model(args, tokenizer, shards, vqgan_dir=None) -> emage.Emage:
    config = emage.EmageConfig.paper() if args.preset == "paper" else emage.EmageConfig.shapes()
    config.codebook_size = shards.codebook_size  # the VQGAN of the data decides these
    config.grid = tuple(shards.grid)
    config.colours = vqgan_colours(vqgan_dir) if vqgan_dir is not None else 0
    text_encoder = None
    if args.text_init:
        import clip_text

        text_encoder = clip_text.load_clip_text(args.text_init)
        config.text = text_encoder.config
    config.text.vocab_size = tokenizer.vocab_size
    apply_overrides(config, args.set)
    if text_encoder is not None and text_encoder.config.vocab_size != tokenizer.vocab_size:
        raise TrainError(f"--text-init has a vocabulary of {text_encoder.config.vocab_size} ids but --bpe gives "
                         f"{tokenizer.vocab_size}; use the BPE file of that CLIP model")
    model = emage.Emage(config, variant=args.variant)
    if text_encoder is not None:
        model.text_encoder.load_state_dict(text_encoder.state_dict(), strict=True)
    return model


def init_model(args) -> tuple[emage.Emage, Tokenizer]:
    """--init CHECKPOINT: its weights, config (with --set applied on top) and vocabulary; the
    optimizer, schedule and step start afresh (fine-tuning, unlike --resume)."""
    source, info = emage.load_checkpoint(args.init)
    if info["variant"] != args.variant:
        raise TrainError(f"--init {args.init} was trained as variant {info['variant']}, not --variant {args.variant}")
    config = apply_overrides(emage.EmageConfig.from_dict(source.config.to_dict()), args.set)
    model = emage.Emage(config, variant=args.variant)
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError:
        raise TrainError(f"--set changes the shape of {args.init}'s weights; with --init, set only training "
                         "fields (object_mask, caption_dropout, mirror_loss, ...)") from None
    return model, Tokenizer(info["tokenizer_path"])


def resolve_args(args) -> None:
    """Fill preset defaults and check the flags (before any work)."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variant = emage.parse_variant(args.variant)
    if args.out is None:
        args.out = str(ROOT / "runs" / f"{args.preset}-v{args.variant}")
    if args.steps <= 0 or args.batch_size <= 0 or args.grad_accum <= 0:
        raise TrainError("--steps, --batch-size and --grad-accum must be positive")
    if args.init and args.resume:
        raise TrainError("--init starts a new run from a checkpoint's weights and --resume continues a run: pass one")
    if args.save_every is None:
        args.save_every = args.eval_every
    if min(args.save_every, args.eval_every, args.log_every, args.keep) <= 0:
        raise TrainError("--save-every, --eval-every, --log-every and --keep must be positive")
    if not (args.lr > 0 and 0 <= args.warmup <= 1):  # nan fails both
        raise TrainError(f"--lr must be positive and --warmup a fraction in [0, 1], got {args.lr} and {args.warmup}")


def train(args) -> int:
    resolve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    try:
        return _train(args, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world: int, device: torch.device) -> int:
    per_micro, rest = divmod(args.batch_size, world * args.grad_accum)
    if rest or per_micro == 0:
        raise TrainError(f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum "
                         f"({world} x {args.grad_accum})")
    out = Path(args.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    # Data: token shards (tokenising the shapes world on first use).
    data_dir = shapes_tokens(args, rank, world) if args.data == "shapes" else Path(args.data)
    shards = data.TokenShards(data_dir)
    shapes_world = shards.meta["source"].startswith("shapes(")  # scored against SHAPES.md at evaluation
    vqgan_dir = Path(args.vqgan or shards.meta["vqgan"])
    tokenizer_path = Path(args.bpe) if args.bpe else (SHAPES_BPE_PATH if args.preset == "shapes" else None)
    tokenizer = Tokenizer(tokenizer_path)
    tokenizer_path = tokenizer.path

    # Model and optimiser (fresh, or from a checkpoint).
    torch.manual_seed(args.seed)
    start_step, resume_dir = 0, None
    if args.resume:
        resume_dir = find_resume(out, args.resume)
        model, info = emage.load_checkpoint(resume_dir)
        if info["variant"] != args.variant:
            raise TrainError(f"{resume_dir} was trained as variant {info['variant']}, not --variant {args.variant}")
        start_step = info["step"]
        tokenizer = Tokenizer(info["tokenizer_path"])  # the vocabulary the run started with (copied into each checkpoint)
        # Keep a copy in the run folder: the checkpoint it came from is deleted once --keep newer ones exist.
        tokenizer_path = out / tokenizer.path.name
        if rank == 0:
            shutil.copyfile(tokenizer.path, tokenizer_path)
    elif args.init:
        model, tokenizer = init_model(args)
        tokenizer_path = tokenizer.path
    else:
        model = build_model(args, tokenizer, shards, vqgan_dir)
    if model.config.mirror_loss and args.variant != 3:
        raise TrainError("--set mirror_loss works on variant 3's second pass; train --variant 3 or leave it at 0")
    if (model.config.codebook_size, tuple(model.config.grid)) != (shards.codebook_size, tuple(shards.grid)):
        raise TrainError(f"the model expects {model.config.codebook_size} codes on a {model.config.grid} grid but "
                         f"{data_dir} holds {shards.codebook_size} codes on {shards.grid}")
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=1e-8)
    rng_states = None
    if resume_dir is not None:
        try:
            state = torch.load(resume_dir / "train_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated, or a pickle holding more than tensors: all fail differently
            raise TrainError(f"{resume_dir / 'train_state.pt'} cannot be read as a weights-only file ({type(e).__name__}); "
                             "resume from another checkpoint") from None
        optimizer.load_state_dict(state["optimizer"])
        rng_states = state["rng"]
        if state["schedule"]["steps"] != args.steps and is_main:
            print(f"note: --steps {args.steps} differs from the resumed run's {state['schedule']['steps']}; "
                  f"the learning-rate schedule changes from here", file=sys.stderr)
    if rng_states is not None and len(rng_states) == world:
        torch.set_rng_state(rng_states[rank]["cpu"])
        if device.type == "cuda" and rng_states[rank].get("cuda") is not None:
            torch.cuda.set_rng_state(rng_states[rank]["cuda"], device)
    else:
        torch.manual_seed(args.seed + 1 + rank)
    step_module = LossModule(model)
    if world > 1:
        # Parameters the loss never reaches (CLIP's pooled-output projection) get no gradient.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext())

    # Evaluation set-up (rank 0 writes everything).
    vq = None
    eval_captions = []
    if is_main:
        if vqgan_dir.exists():
            vq = vqgan.load_vqgan(vqgan_dir).to(device).eval()
        else:
            print(f"note: VQGAN {vqgan_dir} not found; no sample grids", file=sys.stderr)
        if shapes_world:
            import shapes

            every = shapes.eval_captions()
            eval_captions = every[:: max(1, len(every) // args.eval_captions)][: args.eval_captions]
        else:
            eval_captions = [shards.caption(i) for i in range(min(args.eval_captions, len(shards)))]
        metrics_path = out / "metrics.jsonl"
        if resume_dir is not None:
            truncate_metrics(metrics_path, start_step)
        else:
            metrics_path.unlink(missing_ok=True)
        metrics_file = open(metrics_path, "a")
        (out / "samples").mkdir(exist_ok=True)

    def log(record):
        if is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def gather_rng():
        local = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        if world == 1:
            return [local]
        everyone = [None] * world
        dist.all_gather_object(everyone, local)
        return everyone

    def checkpoint(step):
        states = gather_rng()  # every rank takes part
        if is_main:
            return save(out, model, optimizer, step, args, tokenizer_path, vqgan_dir, states, args.keep)
        return None

    def run_eval(step):
        if not is_main or vq is None or not eval_captions:
            return None
        metrics, images = evaluate(model, vq, tokenizer, eval_captions, model.config.text.context_length,
                                   model.config.grid, device, args.seed, shapes_world)
        if images:
            image_grid(images, eval_captions).save(out / "samples" / f"{checkpoint_name(step)}.png")
        if metrics:
            log({"step": step, **metrics})
        return metrics

    # Signals: finish the current step, save, exit cleanly.
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    from tqdm import tqdm

    n_tokens = model.config.n
    bar = tqdm(total=args.steps, initial=start_step, disable=not is_main, dynamic_ncols=True, unit="step")
    last_good = resume_dir
    window = {"loss": 0.0, "count": 0, "time": 0.0, "tokens": 0}
    tokens_per_s = 0.0
    step = start_step
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, args.steps, args.lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = data.batch_indices(step, args.batch_size, len(shards), args.seed)
            loss_sum = torch.zeros((), device=device)
            for a in range(args.grad_accum):
                j = a * world + rank  # micro-batch index within the global batch
                captions, image_tokens = shards.batch(indices[j * per_micro:(j + 1) * per_micro])
                text_tokens = tokenizer(captions, context_length=model.config.text.context_length)
                contrast = contrast_tokens(tokenizer, captions, model.config)
                generator = torch.Generator(device=device).manual_seed(micro_seed(args.seed, step, j))
                sync = world == 1 or a == args.grad_accum - 1
                with (nullcontext() if sync else step_module.no_sync()), autocast:
                    loss = step_module(text_tokens.to(device), image_tokens.to(device), args.variant, generator,
                                       None if contrast is None else contrast.to(device))
                (loss / args.grad_accum).backward()
                loss_sum += loss.detach().float()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            # One all-reduce carries the loss, the finiteness check and the stop request.
            flags = torch.stack([loss_sum / args.grad_accum, grad_norm.float().to(device),
                                 torch.tensor(float(stop["signal"] is not None), device=device)])
            flags = torch.nan_to_num(flags, nan=float("inf"))
            if world > 1:
                dist.all_reduce(flags)
                flags[:2] /= world  # mean loss; the norm of the (already averaged) gradient is the same on every rank
            mean_loss, norm, stop_requested = flags.tolist()
            if not (math.isfinite(mean_loss) and math.isfinite(norm)):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                raise TrainError(f"the loss or gradient norm became non-finite at step {step + 1} (loss {mean_loss}, "
                                 f"grad norm {norm}); stopped without saving, {where}. Try a lower --lr, --dtype fp32, "
                                 f"or --resume from that checkpoint")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            dt = time.perf_counter() - t0
            window = {"loss": window["loss"] + mean_loss, "count": window["count"] + 1, "time": window["time"] + dt,
                      "tokens": window["tokens"] + args.batch_size * n_tokens}
            tokens_per_s = args.batch_size * n_tokens / dt if tokens_per_s == 0 else 0.9 * tokens_per_s + 0.1 * args.batch_size * n_tokens / dt
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if step % args.log_every == 0 or step == args.steps:
                log({"step": step, "loss": window["loss"] / window["count"], "lr": lr, "grad_norm": norm,
                     "tokens_per_s": window["tokens"] / window["time"], "steps_per_s": window["count"] / window["time"],
                     "time": time.time()})
                window = {"loss": 0.0, "count": 0, "time": 0.0, "tokens": 0}
            if stop_requested:
                last_good = checkpoint(step)
                if is_main:
                    bar.close()
                    print(f"stopped by signal at step {step}; checkpoint {last_good} (continue with --resume)", file=sys.stderr)
                return 0
            if step % args.save_every == 0 or step == args.steps:
                last_good = checkpoint(step) or last_good
            if step % args.eval_every == 0 or step == args.steps:
                metrics = run_eval(step)
                if metrics:
                    bar.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    finally:
        bar.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if is_main:
            metrics_file.close()
    if is_main:
        print(f"done: {step} steps; checkpoint {out / checkpoint_name(step)}", file=sys.stderr)
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: flags whose help already explains theirs are left alone."""

    def _get_help_string(self, action):
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    shapes_defaults = PRESETS["shapes"]
    paper = PRESETS["paper"]
    preset_help = lambda key: f"(default: {shapes_defaults[key]} for --preset shapes, {paper[key]} for paper)"  # noqa: E731
    p.add_argument("--variant", default="3", help="what to train (Fig. 2): full, 1, 2, 3 or ar (autoregressive baseline)")
    p.add_argument("--data", default="shapes", help="'shapes' (the embedded world) or a token-shard directory from `python data.py prepare`")
    p.add_argument("--preset", default="shapes", choices=sorted(PRESETS), help="model size and training defaults: EmageConfig.shapes() or .paper()")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps {preset_help('steps')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"global batch over all processes and accumulation {preset_help('batch_size')}")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and process")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate {preset_help('lr')}")
    p.add_argument("--warmup", type=float, default=0.02, help="fraction of the steps of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=4.5e-2, help="AdamW weight decay (matrices and embeddings)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.96, help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=4.0, help="gradient norm clipping")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (weights and optimizer stay fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batch order and masks")
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET-vVARIANT)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from the latest checkpoint in --out, or from the given checkpoint directory")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from an Emage checkpoint's weights, config and vocabulary with a fresh "
                        "optimizer and schedule (--set may change training fields such as mirror_loss)")
    p.add_argument("--text-init", default=None, help="initialise the text encoder from CLIP weights (OpenAI, Hugging Face or native; see clip_text.load_clip_text)")
    p.add_argument("--bpe", default=None, help="BPE vocabulary of the captions (default: the shapes vocabulary for --preset shapes, CLIP's for paper)")
    p.add_argument("--vqgan", default=None, help="VQGAN checkpoint dir for sample grids and the checkpoint's reference (default: the one the token shards were prepared with)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an EmageConfig field, e.g. --set layers=2 --set text.layers=1 (repeatable)")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between sample grids / shapes accuracy {preset_help('eval_every')}")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in --out (the newest ones)")
    p.add_argument("--log-every", type=int, default=None, help=f"steps per metrics.jsonl record {preset_help('log_every')}")
    p.add_argument("--eval-captions", type=int, default=16, help="captions generated at each evaluation")
    p.add_argument("--shapes-examples", type=int, default=30_000, help="examples in the tokenised shapes set built on first use")
    p.add_argument("--shapes-seed", type=int, default=0, help="seed of that shapes set")
    p.add_argument("--shapes-align", type=int, default=8,
                   help="render the training images with every object's corner on multiples of this many px "
                        "(8 = the token grid, the demo's; 1 = SHAPES.md's free placement)")
    p.add_argument("--shapes-jitter", action=argparse.BooleanOptionalAction, default=False,
                   help="draw object sizes with SHAPES.md's +-1 px jitter (the demo trains without: exactly 12 and 22 px)")
    p.add_argument("--shapes-cache", default=str(SHAPES_TOKENS), help="where the tokenised shapes set is kept")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's choice, one per core); "
                   "on a CPU shared with other jobs 1 is often several times faster")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (TrainError, data.DataError, emage.EmageError, vqgan.VQGANError, ClipTextError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was pending
        print("interrupted twice: stopped without saving", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
