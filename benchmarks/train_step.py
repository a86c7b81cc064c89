"""Training-step throughput: image tokens per second and model FLOPs utilisation.

One step is what train.py does per batch: `Emage.loss` for a variant, backward, gradient
clipping at 4.0 and an AdamW update with the paper's hyper-parameters (Section 4). The
script times the median of --steps steps after --warmup steps, on random weights and
random tokens (the cost does not depend on their values), for the model sizes of
benchmarks/latency.py, and compares the analytic training FLOPs with the matrix-multiply
peak measured in the same process right before and after each variant (their mean), per
wall-clock second and per CPU second (MFU-CPU: see benchmarks/latency.py).

This is the model's step alone, at the three sizes of the latency table and for several
variants at once (what pass 1 of #2 / #3 costs on top of #1); benchmarks/train_speed.py
measures the whole train.py loop (data reader, tokenizer) at the shapes and paper sizes.
Both count model FLOPs with `train_speed.train_flops`: 3x the forward FLOPs of what gets
gradients plus 1x the forward of the no-grad pass 1 of #2 and #3, matrix products only.

    python benchmarks/train_step.py --preset shapes
    python benchmarks/train_step.py --preset mid --batch 8 --variants 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/train_step.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from benchmarks.latency import (  # noqa: E402
    DTYPES,
    PRESETS,
    BenchmarkError,
    Timing,
    machine_description,
    matmul_rates,
    peak_memory,
    preset_config,
    reset_peak_memory,
    text_tokens,
    time_call,
    write_json,
)
from benchmarks.train_speed import train_flops  # noqa: E402
from emage import Emage, EmageError, parse_variant  # noqa: E402

DEFAULT_BATCH = {"shapes": 64, "mid": 8, "paper": 2}  # what fits a 2-core CPU in seconds per step


def time_steps(model: Emage, variant, text, images, args, device) -> tuple[list, float]:
    """(wall, CPU) seconds of --steps optimizer steps after --warmup, and the peak memory (MB) over them."""
    opt = torch.optim.AdamW(model.parameters(), lr=4.5e-4, betas=(0.9, 0.96), weight_decay=4.5e-2)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        loss = model.loss(text, images, variant, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    base = reset_peak_memory(device)
    times = [time_call(step, device) for _ in range(args.steps)]
    peak = peak_memory(device)
    return times, max(peak, base) / 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=PRESETS, help="model size, as in benchmarks/latency.py")
    p.add_argument("--variants", nargs="+", default=["1", "3", "ar"], help="variants of Fig. 2: full, 1, 2, 3, ar")
    p.add_argument("--batch", type=int, default=None, help=f"captions per step (default per preset: {DEFAULT_BATCH})")
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, AdamW state)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="autocast dtype of the forward pass (weights stay fp32)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch.set_num_threads)")
    p.add_argument("--peak-size", type=int, default=None, help="side of the square matmul that measures the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/train_step_<preset>_<device>_<dtype>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
        if args.steps < 1 or args.warmup < 0:
            raise BenchmarkError("--steps must be at least 1 and --warmup at least 0")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda but torch sees no GPU; run on a GPU machine or use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise BenchmarkError(f"unsupported device {args.device!r}; use cpu or cuda")
        config = preset_config(args.preset)
    except (BenchmarkError, EmageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    batch = args.batch or DEFAULT_BATCH[args.preset]
    torch.manual_seed(0)
    model = Emage(config).train().to(device)
    text = text_tokens(config, batch, device, torch.Generator().manual_seed(0))
    images = torch.randint(0, config.codebook_size, (batch, config.n), generator=torch.Generator().manual_seed(1)).to(device)
    L = text.shape[1]
    machine = machine_description(device)
    print(f"Emage preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"n = {config.n}, batch {batch}; {machine}; torch {torch.__version__}; {args.threads} threads; {args.dtype}")
    print(f"{'variant':>7} {'s/step':>8} {'CPU s':>8} {'tokens/s':>9} {'captions/s':>10} {'TFLOP/step':>10} {'GFLOP/s':>8} "
          f"{'MFU':>6} {'MFU-CPU':>7} {'peak MB':>8}")
    rows = []
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for variant in variants:
        before = matmul_rates(device, dtype, size=args.peak_size)
        with autocast:
            times, mb = time_steps(model, variant, text, images, args, device)
        after = matmul_rates(device, dtype, size=args.peak_size)
        peak, cpu_peak = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2  # the load may change during the steps
        t = Timing.median(times)
        cpu = t.cpu if device.type == "cpu" else float("nan")  # host time says nothing of a GPU's work
        flops = train_flops(config, variant, L) * batch
        row = {
            "variant": variant,
            "seconds_per_step": t.wall,
            "cpu_seconds_per_step": cpu,
            "steps": times,
            "image_tokens_per_s": batch * config.n / t.wall,
            "captions_per_s": batch / t.wall,
            "train_flops_per_step": flops,
            "matmul_peak_flops": peak,
            "matmul_peak_flops_per_cpu_second": cpu_peak,
            "mfu": flops / t.wall / peak,
            "mfu_cpu": flops / cpu / cpu_peak,
            "peak_memory_mb": mb,
        }
        rows.append(row)
        print(f"{str(variant):>7} {t.wall:>8.3f} {cpu:>8.3f} {row['image_tokens_per_s']:>9.0f} {row['captions_per_s']:>10.2f} "
              f"{flops / 1e12:>10.3f} {flops / t.wall / 1e9:>8.1f} {row['mfu']:>6.1%} {row['mfu_cpu']:>7.1%} {mb:>8.0f}", flush=True)
    path = args.json or ROOT / "benchmarks" / "results" / f"train_step_{args.preset}_{device.type}_{args.dtype}.json"
    write_json(path, {
        "preset": args.preset,
        "config": config.to_dict(),
        "batch": batch,
        "machine": machine,
        "torch": torch.__version__,
        "device": str(device),
        "dtype": args.dtype,
        "threads": args.threads,
        "results": rows,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
