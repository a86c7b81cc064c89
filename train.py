"""Train an Emage generator: `python train.py --variant 3`, on one CPU or many GPUs.

On a fresh clone `python train.py --variant 3` runs the shipped demo's recipe
(recipes/shapes_demo.toml: two stages, about an hour on a 2-core CPU) into runs/shapes_demo/.
A recipe is a file of flags, one table per stage; flags on the command line override it.

    python train.py --variant 3                                         the demo's recipe (shapes world)
    python train.py --recipe recipes/paper.toml --data DIR --text-init CLIP   Section 4's settings
    torchrun --nproc_per_node 8 train.py --recipe recipes/paper.toml --data DIR   DistributedDataParallel
    python train.py --recipe none --variant 1 --steps 2000 --out runs/v1   no recipe: flags and presets only
    python train.py --list-fields                                       every --set field with its default

With --data shapes (the default) it trains on the shapes world (SHAPES.md): the first run
tokenises a shapes set once with the committed shapes tokenizer, then reads it
memory-mapped. With --data DIR it reads token shards written by `python data.py prepare`.

Training (Section 4 of the paper): AdamW (lr 4.5e-4, betas 0.9/0.96, weight decay 4.5e-2),
batch 1024, gradient clipping 4.0, cosine learning rate with 2 % linear warm-up, FP32.

Every random number of a step is a function of (--seed, step, micro-batch): the batch is
`data.batch_indices(step)`, and micro-batch j of it (j = accumulation index * world size +
rank) draws its masks from a torch.Generator seeded with (seed, step, j). So a resumed run
repeats an uninterrupted one exactly, and N processes with accumulation A compute the same
update as one process with accumulation N * A.

Run folder (--out): checkpoints, latest.json, metrics.jsonl and sample grids, locked while a
training writes to it and never started afresh over (run_folder.py).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import sys
import time
import tomllib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import bert_text
import data
import emage
import extensions
import vqgan
from clip_text import ClipTextError, Tokenizer
from files import FileError, read_json, to_uint8
from run_folder import (MetricsLog, TrainError, checkpoint_name, find_resume, finished_step, holder_error, holds_a_run,
                        lock_holder, read_train_state, run_lock, save)

ROOT = Path(__file__).resolve().parent
SHAPES_VQGAN = ROOT / "checkpoints" / "shapes" / "patterns"  # the demo's colour-factored tokenizer
SHAPES_BPE = ROOT / "checkpoints" / "shapes" / "bpe_shapes.txt.gz"
SHAPES_TOKENS = ROOT / "data" / "shapes-tokens"
DEFAULT_RECIPE = ROOT / "recipes" / "shapes_demo.toml"  # what `python train.py` runs on the shapes world

# Per-preset defaults for flags that neither the recipe nor the command line sets.
PRESETS = {
    "paper": dict(batch_size=1024, lr=4.5e-4, steps=500_000, eval_every=5_000, log_every=50),
    "shapes": dict(batch_size=32, lr=5e-4, steps=1_000, eval_every=250, log_every=10),
}


# ----------------------------------------------------------------------------------------
# Pure pieces: learning rate, weight decay groups, seeds
# ----------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, base_lr: float, warmup: float = 0.02, schedule: str = "cosine") -> float:
    """Cosine schedule with linear warm-up over the first `warmup` fraction of the steps
    (Section 4: "cosine learning rate scheduler with warm up ratio=0.02"). `step` counts
    from 0; the rate decays to 0 at `total_steps`. schedule="constant" keeps the peak after
    the warm-up, so that a run stopped at its plateau (--until-plateau) was not stopped by
    a rate that had already decayed."""
    warmup_steps = max(1, math.ceil(warmup * total_steps))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
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


# ----------------------------------------------------------------------------------------
# The model: config fields (--set), a fresh model, a fine-tuned one (--init)
# ----------------------------------------------------------------------------------------


def config_fields(config: emage.EmageConfig, beyond: extensions.Beyond) -> list[tuple[str, object]]:
    """(name, value) of every field --set accepts: EmageConfig's, text.*, and the extensions'."""
    out = []
    for obj, prefix in ((config, ""), (config.text, "text."), (beyond, "")):
        out += [(prefix + f.name, getattr(obj, f.name)) for f in fields(obj) if f.name != "text"]
    return out


def _parse_field(key: str, value: str, current):
    try:
        if isinstance(current, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if isinstance(current, tuple):
            return tuple(int(v) for v in value.split(","))
        parsed = type(current)(value)
    except ValueError:
        raise TrainError(f"--set {key}={value}: expected {type(current).__name__} like {current!r}") from None
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise TrainError(f"--set {key}={value}: must be a finite number")
    return parsed


def apply_overrides(config: emage.EmageConfig, beyond: extensions.Beyond, overrides: list[str]):
    """`--set layers=2 --set text.width=64 --set object_mask=0.3`: replace fields, typed like the default."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainError(f"--set {item!r} is not key=value (for example --set layers=2)")
        name = key.removeprefix("text.")
        obj = config.text if key.startswith("text.") else beyond if name in {f.name for f in fields(beyond)} else config
        if not is_dataclass(obj) or name not in {f.name for f in fields(obj)} or name == "text":
            raise TrainError(f"--set {key}: no such field; `python train.py --list-fields` lists them")
        setattr(obj, name, _parse_field(key, value, getattr(obj, name)))
    return config, beyond


def vqgan_colours(vqgan_dir) -> int:
    """Palette size of a colour-factored VQGAN (quantizer "pattern"), else 0: Beyond.colours.
    config.json is read bounded and its fields checked (load_vqgan checks the rest later)."""
    path = Path(vqgan_dir) / "config.json"
    if not path.is_file():
        return 0
    try:
        meta = read_json(path)
    except FileError as e:
        raise TrainError(f"{e}; pass another --vqgan") from None
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise TrainError(f"{path} is not a VQGAN config; pass another --vqgan")
    palette = config.get("palette", ())
    if not isinstance(palette, (list, tuple)) or len(palette) > 1024:
        raise TrainError(f"{path}: palette must be a list of at most 1024 colours; pass another --vqgan")
    return len(palette) if config.get("quantizer") == "pattern" else 0


def build_model(args, tokenizer, shards, vqgan_dir=None) -> emage.Emage:
    """A fresh model for the data: the preset, the data's grid and codes, --text-init, --set."""
    config = emage.EmageConfig.paper() if args.preset == "paper" else emage.EmageConfig.shapes()
    config.codebook_size, config.grid = shards.codebook_size, tuple(shards.grid)  # the VQGAN of the data decides
    beyond = extensions.Beyond(colours=vqgan_colours(vqgan_dir) if vqgan_dir is not None else 0)
    text_encoder = None
    if args.text_init and bert_text.is_bert_folder(args.text_init):  # Table 5: a BERT tower
        text_encoder = bert_text.load_bert(args.text_init)
        if tokenizer.vocab_size > text_encoder.config.vocab_size:
            raise TrainError(f"{tokenizer.path} has {tokenizer.vocab_size} ids but the BERT tower "
                             f"{text_encoder.config.vocab_size} embeddings; use the vocab.txt of that BERT folder")
        text_encoder.config = replace(text_encoder.config, pad_token_id=tokenizer.pad_id, cls_token_id=tokenizer.cls_id,
                                      sep_token_id=tokenizer.sep_id,
                                      context_length=min(77, text_encoder.config.max_position_embeddings))
        config.text = text_encoder.config
    elif args.text_init:
        import clip_text  # only for pretrained text towers

        text_encoder = clip_text.load_clip_text(args.text_init, trust_torchscript=args.trust_torchscript)
        config.text = replace(text_encoder.config)  # a copy: the checks below compare against the loaded one
    if not isinstance(config.text, bert_text.BertConfig):
        config.text.vocab_size = tokenizer.vocab_size
    loaded = repr(config.text)
    apply_overrides(config, beyond, args.set)
    if text_encoder is not None and repr(config.text) != loaded:
        raise TrainError(f"--set changes the text tower that --text-init loads ({loaded}) into {config.text}; "
                         "leave text.* alone with --text-init")
    if text_encoder is not None and text_encoder.config.vocab_size != tokenizer.vocab_size:
        raise TrainError(f"--text-init has a vocabulary of {text_encoder.config.vocab_size} ids but --bpe gives "
                         f"{tokenizer.vocab_size}; use the BPE file of that CLIP model")
    model = extensions.build(config, beyond, variant=args.variant)
    if text_encoder is not None:
        model.text_encoder.load_state_dict(text_encoder.state_dict(), strict=True)
    return model


def init_model(args) -> tuple[emage.Emage, Tokenizer | bert_text.WordPiece]:
    """--init CHECKPOINT: its weights, config (with --set applied on top) and vocabulary; the
    optimizer, schedule and step start afresh (fine-tuning, unlike --resume)."""
    source, info = extensions.load_checkpoint(args.init)
    if info["variant"] != args.variant:
        raise TrainError(f"--init {args.init} was trained as variant {info['variant']}, not --variant {args.variant}")
    beyond = extensions.Beyond(**source.beyond.to_dict()) if source.beyond is not None else extensions.Beyond()
    config, beyond = apply_overrides(emage.EmageConfig.from_dict(source.config.to_dict()), beyond, args.set)
    model = extensions.build(config, beyond, variant=args.variant)
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError:
        raise TrainError(f"--set changes the shape of {args.init}'s weights; with --init, set only training "
                         "fields (object_mask, caption_dropout, mirror_loss, ...)") from None
    return model, emage.load_tokenizer(info["tokenizer_path"])


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------


def shapes_tokens(args, rank: int, world: int) -> Path:
    """The tokenised shapes set, built on first use (all ranks encode a share of the shards)."""
    out = Path(args.shapes_cache)
    source = data.ShapesSource(args.shapes_examples, seed=args.shapes_seed, align=args.shapes_align, jitter=args.shapes_jitter)
    vqgan_dir = args.vqgan or SHAPES_VQGAN
    if (out / "meta.json").is_file():
        meta = data.TokenShards(out).meta
        if meta.get("source") != source.description:
            raise TrainError(f"{out} holds {meta.get('source')}, not {source.description}; pass "
                             f"--shapes-cache NEW_DIR, or match --shapes-examples/--shapes-seed")
        return out
    if rank == 0:
        print(f"tokenising {args.shapes_examples} shapes examples once into {out} (minutes on a CPU; kept for later runs)", flush=True)
    data.prepare(source, vqgan_dir, out, shard_size=10_000, rank=rank, world_size=world, device="cpu")
    if world > 1:
        dist.barrier()
    return out


def caption_vocabulary(args) -> Path | None:
    """--bpe; else the vocabulary inside the folder given to --text-init (a Hugging Face CLIP
    folder's merges.txt, or bpe_simple_vocab_16e6.txt.gz); else the
    shapes vocabulary (--preset shapes) or CLIP's own file found by clip_text.find_bpe."""
    if args.text_init and bert_text.is_bert_folder(args.text_init):  # Table 5: BERT reads its own WordPiece vocabulary
        if args.bpe:
            raise TrainError(f"--text-init {args.text_init} is a BERT folder, which reads its own vocab.txt; drop --bpe")
        return Path(args.text_init) / bert_text.VOCAB_FILE_NAME
    if args.bpe:
        return Path(args.bpe)
    import clip_text

    beside = clip_text.vocabulary_beside(args.text_init)
    if beside is not None:
        return beside
    return SHAPES_BPE if args.preset == "shapes" and not args.text_init else None


def check_vqgan(shards, vqgan_dir: Path, data_dir: Path) -> None:
    """The VQGAN a checkpoint will decode with must be the one that tokenised the shards."""
    recorded = shards.meta.get("vqgan_fingerprint")
    if recorded and vqgan_dir.exists() and data.vqgan_fingerprint(vqgan_dir) != recorded:
        raise TrainError(f"--vqgan {vqgan_dir} is not the VQGAN that tokenised {data_dir} ({shards.meta.get('vqgan')}); "
                         "pass that one, or prepare the data again with this one")


# ----------------------------------------------------------------------------------------
# Evaluation: sample grid and shapes accuracy
# ----------------------------------------------------------------------------------------


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


def evaluate(model, vq, tokenizer, captions, context_length, grid, device, seed, shapes_world: bool, temperature=1.0):
    """Generate one image per caption (the variant's own algorithm, 16 rounds); score them
    against SHAPES.md when training on the shapes world. Returns (metrics, images)."""
    from PIL import Image

    was_training = model.training
    model.eval()
    tokens = []
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in tqdm(range(0, len(captions), 16), desc="evaluating", unit="batch", leave=False):
        text = tokenizer(captions[start:start + 16], context_length=context_length).to(device)
        tokens.append(model.generate(text, steps=16, temperature=temperature, generator=generator))  # (b, n)
    model.train(was_training)
    with torch.no_grad():
        images = [Image.fromarray(a) for a in to_uint8(vq.decode(torch.cat(tokens).view(-1, *grid)))]
    metrics = {}
    if shapes_world:
        import shapes

        report = shapes.accuracy_report([(c, shapes.score(im, c)) for c, im in zip(captions, images)])
        metrics = {f"accuracy_{k}": v["accuracy"] for k, v in report.items()}
    return metrics, images


# ----------------------------------------------------------------------------------------
# Distributed training, signals
# ----------------------------------------------------------------------------------------


def setup_distributed(device_arg: str | None):
    """(rank, world_size, device). Under torchrun: one process per GPU with NCCL, gloo on CPUs."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise TrainError("WORLD_SIZE, RANK or LOCAL_RANK is not a number; unset them, or start with torchrun") from None
    if world > 1 and not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT")):
        raise TrainError(f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not: start with torchrun, "
                         "or unset WORLD_SIZE and RANK")
    if not (world >= 1 and 0 <= rank < world):
        raise TrainError(f"RANK={rank} does not fit WORLD_SIZE={world}; start with torchrun")
    cuda = torch.cuda.is_available() and device_arg in (None, "cuda")
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

    def forward(self, text_tokens, image_tokens, variant, generator, extra):
        return self.model.loss(text_tokens, image_tokens, variant, generator=generator, **extra)


def gather_rng(device, world: int) -> list[dict]:
    """Every rank's RNG states (all ranks take part), saved so that a resume repeats the run."""
    local = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [local]
    everyone = [None] * world
    dist.all_gather_object(everyone, local)
    return everyone


@contextmanager
def stop_on_signals():
    """Ctrl-C / SIGTERM ask the loop to finish its step, save and exit; a second Ctrl-C stops at once."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------
# One run: everything the loop needs, then the loop
# ----------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    shards: data.TokenShards
    tokenizer: Tokenizer | bert_text.WordPiece
    tokenizer_path: Path
    vqgan_dir: Path
    model: emage.Emage
    optimizer: torch.optim.Optimizer
    step_module: nn.Module
    start_step: int
    resume_dir: Path | None
    per_micro: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def checkpoint(self, step: int) -> Path | None:
        states = gather_rng(self.device, self.world)  # every rank takes part
        if not self.is_main:
            return None
        return save(self.out, self.model, self.optimizer, step, self.args, self.tokenizer_path, self.vqgan_dir,
                    states, self.args.keep)


def prepare(args, rank: int, world: int, device: torch.device) -> Run:
    """Data, tokenizer, model (fresh, --init or --resume), optimizer and RNG states."""
    per_micro, rest = divmod(args.batch_size, world * args.grad_accum)
    if rest or per_micro == 0:
        raise TrainError(f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum "
                         f"({world} x {args.grad_accum})")
    out = Path(args.out)
    data_dir = shapes_tokens(args, rank, world) if args.data == "shapes" else Path(args.data)
    shards = data.TokenShards(data_dir)
    vqgan_dir = Path(args.vqgan or shards.meta["vqgan"])
    if vqgan_dir.is_dir():
        vqgan.check_folder(vqgan_dir)  # config.json and the weights' header, before any model is built
    check_vqgan(shards, vqgan_dir, data_dir)
    tokenizer = None if args.resume else emage.load_tokenizer(caption_vocabulary(args))  # a resumed run reads its own

    torch.manual_seed(args.seed)
    start_step, resume_dir, state = 0, None, None
    if args.resume:
        resume_dir = find_resume(out, args.resume)
        state = read_train_state(resume_dir, world)
        model, info = extensions.load_checkpoint(resume_dir)
        if info["variant"] != args.variant:
            raise TrainError(f"{resume_dir} was trained as variant {info['variant']}, not --variant {args.variant}")
        start_step = info["step"]
        tokenizer = emage.load_tokenizer(info["tokenizer_path"])  # the vocabulary the run started with (in its checkpoint)
        tokenizer_path = out / tokenizer.path.name  # a copy in the run folder outlives pruned checkpoints
        if rank == 0 and tokenizer.path.resolve() != tokenizer_path.resolve():
            shutil.copyfile(tokenizer.path, tokenizer_path)
    elif args.init:
        model, tokenizer = init_model(args)
        tokenizer_path = tokenizer.path
    else:
        model = build_model(args, tokenizer, shards, vqgan_dir)
        tokenizer_path = tokenizer.path
    if model.beyond is not None and model.beyond.mirror_loss and args.variant != 3:
        raise TrainError("--set mirror_loss works on variant 3's second pass; train --variant 3 or leave it at 0")
    if (model.config.codebook_size, tuple(model.config.grid)) != (shards.codebook_size, tuple(shards.grid)):
        raise TrainError(f"the model expects {model.config.codebook_size} codes on a {model.config.grid} grid but "
                         f"{data_dir} holds {shards.codebook_size} codes on {shards.grid}")
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=1e-8)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError):
            raise TrainError(f"{resume_dir / 'train_state.pt'} holds an optimizer for another model") from None
        if state["schedule"]["steps"] != args.steps and rank == 0:
            print(f"note: --steps {args.steps} differs from the resumed run's {state['schedule']['steps']}; "
                  f"the learning-rate schedule changes from here", file=sys.stderr)
    if state is not None and len(state["rng"]) == world:
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if device.type == "cuda" and state["rng"][rank].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"], device)
    else:
        torch.manual_seed(args.seed + 1 + rank)
    step_module = LossModule(model)
    if world > 1:  # parameters the loss never reaches (CLIP's pooled projection) get no gradient
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return Run(args, rank, world, device, out, shards, tokenizer, tokenizer_path, vqgan_dir, model, optimizer,
               step_module, start_step, resume_dir, per_micro)


def accumulate_gradients(run: Run, step: int, stop: dict) -> tuple[float, float, bool]:
    """Forward and backward over this process's micro-batches, clip, and agree across ranks on
    (mean loss, gradient norm, whether to stop) in one all-reduce. A signal that arrived during
    this step is read here, so the step it interrupted is the one saved."""
    args, model, device = run.args, run.model, run.device
    indices = data.batch_indices(step, args.batch_size, len(run.shards), args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    loss_sum = torch.zeros((), device=device)
    for a in range(args.grad_accum):
        j = a * run.world + run.rank  # micro-batch index within the global batch
        captions, image_tokens = run.shards.batch(indices[j * run.per_micro:(j + 1) * run.per_micro])
        text_tokens = run.tokenizer(captions, context_length=model.config.text.context_length)
        extra = {} if model.beyond is None else model.beyond.batch_inputs(captions, run.tokenizer, model.config.text.context_length)
        generator = torch.Generator(device=device).manual_seed(micro_seed(args.seed, step, j))
        sync = run.world == 1 or a == args.grad_accum - 1
        with (nullcontext() if sync else run.step_module.no_sync()), autocast:
            loss = run.step_module(text_tokens.to(device), image_tokens.to(device), args.variant, generator,
                                   {k: v.to(device) for k, v in extra.items()})
        (loss / args.grad_accum).backward()
        loss_sum += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    flags = torch.stack([loss_sum / args.grad_accum, grad_norm.float().to(device), torch.tensor(float(stop["signal"] is not None), device=device)])
    flags = torch.nan_to_num(flags, nan=float("inf"))
    if run.world > 1:
        dist.all_reduce(flags)
        flags[:2] /= run.world  # mean loss; the norm of the (already averaged) gradient is the same on every rank
    mean_loss, norm, stop = flags.tolist()
    return mean_loss, norm, bool(stop)


def training_loop(run: Run, later_steps: int = 0) -> int:
    """Algorithm 2's outer loop (and every variant's): steps until --steps, logging, saving,
    evaluating, stopping cleanly on a signal and loudly on a non-finite loss."""
    args, model = run.args, run.model
    log = MetricsLog(run.out / "metrics.jsonl", run.start_step if run.resume_dir else None, run.is_main)
    evaluator = Evaluator(run) if run.is_main else None
    step, last_good, window = run.start_step, run.resume_dir, []
    history = [(r["step"], r["accuracy_all"]) for r in log.records() if "accuracy_all" in r]  # for --until-plateau
    bar = tqdm(total=args.steps, initial=step, disable=not run.is_main, dynamic_ncols=True, unit="step")
    try:
        with stop_on_signals() as stop:
            while step < args.steps:
                t0 = time.perf_counter()
                lr = lr_at(step, args.steps, args.lr, args.warmup, args.lr_schedule)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                loss, norm, stop_asked = accumulate_gradients(run, step, stop)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
                    raise TrainError(f"the loss or gradient norm became non-finite at step {step + 1} (loss {loss}, "
                                     f"grad norm {norm}); stopped without saving, {where}. Try a lower --lr, "
                                     "--dtype fp32, or --resume from that checkpoint")
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append((loss, time.perf_counter() - t0))
                bar.update(1)
                seconds = sum(t for _, t in window) / len(window)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False,
                                **({"recipe_eta": f"{(args.steps - step + later_steps) * seconds / 60:.0f} min"} if later_steps else {}))
                if step % args.log_every == 0 or step == args.steps:
                    tokens = args.batch_size * model.config.n * len(window)
                    log.write({"step": step, "loss": sum(v for v, _ in window) / len(window), "lr": lr, "grad_norm": norm,
                               "tokens_per_s": tokens / sum(t for _, t in window),
                               "steps_per_s": len(window) / sum(t for _, t in window), "time": time.time(),
                               "cpu_s": time.process_time()})  # this process's CPU so far: a killed run's cost
                    window = []
                if stop_asked:
                    last_good = run.checkpoint(step)
                    if run.is_main:
                        bar.write(f"stopped by signal at step {step}; checkpoint {last_good} (continue with --resume)",
                                  file=sys.stderr)
                    return 0
                if step % args.save_every == 0 or step == args.steps:
                    last_good = run.checkpoint(step) or last_good
                if (step % args.eval_every == 0 or step == args.steps) and evaluator is not None:
                    metrics = evaluator(step)
                    if metrics:
                        log.write({"step": step, **metrics})
                        bar.write(f"step {step}: " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
                        history.append((step, metrics.get("accuracy_all", 0.0)))
                if args.until_plateau is not None and step % args.eval_every == 0 and at_plateau(run, history, evaluator):
                    if step % args.save_every:
                        last_good = run.checkpoint(step) or last_good
                    log.write({"step": step, "plateau": True})
                    if run.is_main:
                        bar.write(f"step {step}: the accuracy has plateaued (--until-plateau); stopping")
                    break
    finally:
        bar.close()
        log.close()
    if run.is_main:
        print(f"done: {step} steps; checkpoint {run.out / checkpoint_name(step)}", file=sys.stderr)
    return 0


class Evaluator:
    """Sample grids (and shapes accuracy) of fixed captions, on rank 0."""

    def __init__(self, run: Run):
        self.run, self.vq = run, None
        self.shapes_world = run.shards.meta["source"].startswith("shapes(")  # scored against SHAPES.md
        if run.args.until_plateau is not None and not self.shapes_world:
            raise TrainError("--until-plateau needs an accuracy to watch, which only the shapes world has (--data shapes)")
        if run.vqgan_dir.exists():
            self.vq = vqgan.load_vqgan(run.vqgan_dir).to(run.device).eval()
        else:
            print(f"note: VQGAN {run.vqgan_dir} not found; no sample grids", file=sys.stderr)
        count = run.args.eval_captions
        if self.shapes_world:
            import shapes

            every = shapes.eval_captions()
            self.captions = every[:: max(1, len(every) // count)][:count]
        else:
            self.captions = [run.shards.caption(i) for i in range(min(count, len(run.shards)))]
        (run.out / "samples").mkdir(exist_ok=True)

    def __call__(self, step: int) -> dict | None:
        run = self.run
        if self.vq is None or not self.captions:
            return None
        metrics, images = evaluate(run.model, self.vq, run.tokenizer, self.captions, run.model.config.text.context_length,
                                   run.model.config.grid, run.device, run.args.seed, self.shapes_world,
                                   run.args.eval_temperature)
        path = run.out / "samples" / f"{checkpoint_name(step)}.png"
        image_grid(images, self.captions).save(path)
        return metrics


def at_plateau(run: Run, history: list[tuple[int, float]], evaluator) -> bool:
    """plateaued() on rank 0, which evaluates, told to every rank."""
    done = torch.tensor(float(run.is_main and plateaued(history, len(evaluator.captions), run.args.until_plateau)))
    if run.world > 1:
        dist.broadcast(done, 0)
    return bool(done.item())


def plateaued(history: list[tuple[int, float]], count: int, min_steps: int) -> bool:
    """--until-plateau's stopping rule. `history` holds (step, accuracy on `count` captions)
    of every evaluation so far. At the last one, step s >= min_steps, the run has plateaued
    when no evaluation in the second half of the run (after s / 2) beats the best one of the
    first half by more than that best's standard error, sqrt(p (1 - p) / count), and at least
    1 / count: doubling the training bought less than the noise of one evaluation. (Comparing
    the last quarter instead stopped a #1 model whose accuracy still rose by 0.004 to 0.01 per
    1,000 steps, each rise below one standard error; docs/results.md.)"""
    if not history or history[-1][0] < min_steps:
        return False
    last = history[-1][0]
    early = [a for step, a in history if step <= last / 2]
    late = [a for step, a in history if step > last / 2]
    if not early:
        return False
    best = max(early)
    return max(late) <= best + max(math.sqrt(best * (1 - best) / count), 1 / count)


def resolve_args(args) -> None:
    """Fill preset defaults and check the flags (before any work)."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variant = emage.parse_variant(args.variant)
    if args.out is None:
        args.out = str(ROOT / "runs" / f"{args.preset}-v{args.variant}")
    if args.save_every is None:
        args.save_every = args.eval_every
    limits = {"steps": 10**9, "batch_size": 2**16, "grad_accum": 2**16, "eval_every": 10**9, "save_every": 10**9,
              "log_every": 10**9, "keep": 10**6, "eval_captions": 1024, "shapes_examples": 10**8, "shapes_align": 8}
    for name, high in limits.items():
        value = getattr(args, name)
        if not 0 < value <= high:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive whole number up to {high:,}, got {value}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise TrainError(f"--threads must be between 1 and 1024, got {args.threads}")
    if not 0 < args.eval_temperature <= 100:  # nan fails too
        raise TrainError(f"--eval-temperature must be in (0, 100], got {args.eval_temperature}")
    if args.until_plateau is not None and not 0 <= args.until_plateau <= 10**9:
        raise TrainError(f"--until-plateau takes the fewest steps to train, from 0 to 10**9, got {args.until_plateau}")
    if args.init and args.resume:
        raise TrainError("--init starts a new run from a checkpoint's weights and --resume continues a run: pass one")
    if not (0 < args.lr < math.inf and 0 <= args.warmup <= 1):  # nan fails both
        raise TrainError(f"--lr must be positive and finite and --warmup a fraction in [0, 1], got {args.lr} and {args.warmup}")
    if not (0 <= args.weight_decay < 1 and 0 <= args.beta1 < 1 and 0 <= args.beta2 < 1 and 0 < args.grad_clip < math.inf):
        raise TrainError("--weight-decay, --beta1 and --beta2 must be in [0, 1) and --grad-clip positive and finite")
    if not 0 <= args.seed < 2**63 or not 0 <= args.shapes_seed < 2**63:
        raise TrainError(f"--seed and --shapes-seed must be between 0 and 2**63 - 1, got {args.seed} and {args.shapes_seed}")
    check_overrides(args)
    holder = lock_holder(Path(args.out))
    if holder is not None:  # another training writes there now: name it, whatever else the folder holds
        raise holder_error(Path(args.out), holder)
    if not args.resume and holds_a_run(Path(args.out)):
        raise TrainError(f"--out {args.out} holds an earlier run; continue it with --resume, or pass another --out")


def check_overrides(args) -> None:
    """--set values, before any data is read or model built: the field exists and parses, and
    (for a fresh model) the preset with every --set applied passes emage's config checks (types
    and ranges of _check_config: layers <= 256, width <= 65536, ...) and the extensions' own."""
    config = emage.EmageConfig.paper() if args.preset == "paper" else emage.EmageConfig.shapes()
    config, beyond = apply_overrides(config, extensions.Beyond(), args.set)
    try:
        beyond.check()
        if not (args.init or args.resume or args.text_init):
            emage._check_config(config)
    except emage.EmageError as e:
        raise TrainError(f"--set: {e}") from None


def train(args, later_steps: int = 0) -> int:
    resolve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    try:
        with run_lock(Path(args.out), enabled=rank == 0):
            code = training_loop(prepare(args, rank, world, device), later_steps)
        if world > 1:  # leave together: rank 0 may still be evaluating, and gloo torn down under it aborted rank 1
            dist.barrier()
        return code
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Recipes: files of flags, one table per stage
# ----------------------------------------------------------------------------------------


STAGE_KEYS = {"name", "variants"}  # recipe keys that are not flags


def load_recipe(path: Path, parser: argparse.ArgumentParser) -> list[dict]:
    """The stages of a TOML recipe ([[stage]] tables, or one table of flags), each key checked."""
    try:
        recipe = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainError(f"recipe {path} does not exist; see recipes/ for examples, or pass --recipe none") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"recipe {path} is not valid TOML ({e})") from None
    stages = recipe.get("stage", [dict(recipe, name="")])  # one table: one stage, written straight into --out
    dests = {a.dest for a in parser._actions} - {"help", "recipe", "list_fields"}
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise TrainError(f"recipe {path}: stage {i + 1} is not a table")
        stage.setdefault("name", f"stage{i + 1}")
        if not isinstance(stage["name"], str) or not re.fullmatch(r"[A-Za-z0-9_-]*", stage["name"]):
            raise TrainError(f"recipe {path}: stage name {stage['name']!r} must be letters, digits, _ or -")
        unknown = set(stage) - dests - STAGE_KEYS
        if unknown:
            raise TrainError(f"recipe {path}: unknown keys {sorted(unknown)} (keys are train.py's flags, "
                             "with _ for -)")
    return stages


def stage_argv(stage: dict) -> list[str]:
    """A stage's flags as command-line words (the user's own flags follow and override them)."""
    words = []
    for key, value in stage.items():
        if key in STAGE_KEYS:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return words


def run_recipe(recipe: Path, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """Every stage of the recipe in turn, each into --out/NAME; a finished stage is skipped and
    an interrupted one resumed, so running the same command again continues the recipe."""
    user = parser.parse_args(argv)
    base = Path(user.out or ROOT / "runs" / recipe.stem)
    stages, plans = load_recipe(recipe, parser), []
    for stage in stages:
        args = parser.parse_args(stage_argv(stage) + argv + ["--out", str(base / stage["name"])])
        if stage.get("variants") and emage.parse_variant(args.variant) not in [emage.parse_variant(v) for v in stage["variants"]]:
            continue  # e.g. the mirror loss, which needs variant 3
        plans.append((stage, args, args.steps or PRESETS[args.preset]["steps"]))
    print(f"recipe {recipe}: " + ", then ".join(f"{s['name'] or recipe.stem} ({n:,} steps)" for s, _, n in plans) + f" into {base}",
          file=sys.stderr)
    for i, (stage, args, steps) in enumerate(plans):
        out = Path(args.out)
        if args.init and not Path(args.init).exists() and (base / args.init).is_dir():  # "init = 'stage1'"
            args.init = str(find_resume(base / args.init, "latest"))
        if finished_step(out) >= steps:
            print(f"{stage['name'] or recipe.stem}: finished already ({out})", file=sys.stderr)
            continue
        if holds_a_run(out):
            args.resume, args.init = args.resume or "latest", None
            print(f"{stage['name'] or recipe.stem}: resuming {out}", file=sys.stderr)
        code = train(args, later_steps=sum(n for _, _, n in plans[i + 1:]))
        if code or finished_step(out) < steps:  # stopped by a signal: the rest waits for the next call
            return code
    return 0


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: flags whose help already explains theirs are left alone."""

    def _get_help_string(self, action):
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    shapes_defaults, paper = PRESETS["shapes"], PRESETS["paper"]
    preset_help = lambda key: f"(default: {shapes_defaults[key]} for --preset shapes, {paper[key]} for paper)"  # noqa: E731
    p.add_argument("--recipe", default=None,
                   help="a TOML file of flags, one [[stage]] table per stage (see recipes/); default: "
                        "recipes/shapes_demo.toml with --data shapes unless --resume or --init is given; 'none' for no recipe")
    p.add_argument("--list-fields", action="store_true", help="print every --set field with its default and exit")
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
    p.add_argument("--out", default=None, help="run directory (default: runs/PRESET-vVARIANT; with a recipe, runs/RECIPE/STAGE)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from the latest checkpoint in --out, or from the given checkpoint directory")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from an Emage checkpoint's weights, config and vocabulary with a fresh "
                        "optimizer and schedule (--set may change training fields such as mirror_loss)")
    p.add_argument("--text-init", default=None, help="initialise the text encoder from CLIP weights (OpenAI, Hugging Face or native; see clip_text.load_clip_text)")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="let --text-init read OpenAI's TorchScript release (ViT-L-14.pt), which can run code")
    p.add_argument("--bpe", default=None, help="BPE vocabulary of the captions: bpe_simple_vocab_16e6.txt.gz, a Hugging Face CLIP "
                   "folder (its merges.txt) or a folder holding either (default: the --text-init folder's own, else the shapes vocabulary for --preset shapes, "
                   "else CLIP's file from $EMAGE_CLIP_BPE or an installed open_clip)")
    p.add_argument("--vqgan", default=None, help="VQGAN checkpoint dir for sample grids and the checkpoint's reference (default: the one the token shards were prepared with)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. --set layers=2 --set text.layers=1 (repeatable; --list-fields lists them)")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between sample grids / shapes accuracy {preset_help('eval_every')}")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in --out (the newest ones)")
    p.add_argument("--log-every", type=int, default=None, help=f"steps per metrics.jsonl record {preset_help('log_every')}")
    p.add_argument("--eval-captions", type=int, default=16, help="captions generated at each evaluation")
    p.add_argument("--eval-temperature", type=float, default=1.0, help="token sampling temperature of those evaluations")
    p.add_argument("--until-plateau", type=int, default=None, metavar="MIN_STEPS",
                   help="shapes world: stop once the evaluation accuracy has plateaued (train.plateaued: nothing in the "
                        "second half of the run beats the best of the first half by a standard error), not before MIN_STEPS; "
                        "--steps is then the cap")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"),
                   help="after the warm-up: cosine decay to 0 at --steps (Section 4), or constant (for --until-plateau)")
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


def list_fields(args) -> str:
    config = emage.EmageConfig.paper() if args.preset == "paper" else emage.EmageConfig.shapes()
    rows = config_fields(config, extensions.Beyond())
    width = max(len(name) for name, _ in rows)
    return f"--set fields of --preset {args.preset} (text.*: the text tower; colours, object_mask, mirror_loss: extensions.py)\n" + \
        "\n".join(f"  {name:{width}s}  {value!r}" for name, value in rows)


def without_recipe(argv: list[str]) -> list[str]:
    """argv less --recipe and its value (either --recipe FILE or --recipe=FILE)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--recipe":
            skip = True
        elif not word.startswith("--recipe="):
            out.append(word)
    return out


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list_fields:
            print(list_fields(args))
            return 0
        recipe = args.recipe
        if recipe is None and args.data == "shapes" and not (args.resume or args.init):
            recipe = str(DEFAULT_RECIPE)
        if recipe is not None and recipe.lower() != "none":
            return run_recipe(Path(recipe), without_recipe(argv), parser)
        return train(args)
    except (TrainError, data.DataError, emage.EmageError, vqgan.VQGANError, ClipTextError, bert_text.BertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was pending
        print("interrupted twice: stopped without saving", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
