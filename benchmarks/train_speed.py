"""Training throughput of `train.py`: steps/s, image tokens/s and model FLOPs utilisation.

It runs the real training loop (`train.main`: token-shard reader, BPE tokenizer, Emage.loss,
backward, gradient clipping, AdamW) on synthetic token shards (shapes captions, random
codes: the speed does not depend on the data), drops the first --warmup steps, and
reports the rest. MFU = model FLOPs per second / the fp32 (or --dtype) matrix-multiply
peak (a 2048^3 product on CPU, 8192^3 on GPU) measured in the same process with the same
threads, before and after the run, the higher of the two. On a CPU shared with other
jobs both the peak and the step time move with the load, so compare MFUs of one run only.

Model FLOPs per example: 3x the forward FLOPs of everything that gets gradients (the
text encoder and the decoder pass the loss is taken on; backward ~ 2x forward) plus 1x
the forward of the no-grad first pass of #2 and #3; matrix products only (2 FLOPs per
multiply-add), from the analytic counts of benchmarks/latency.py.

    python benchmarks/train_speed.py --preset shapes --variant 3
    python benchmarks/train_speed.py --preset paper --batch-size 2 --steps 1 --warmup 1
    python benchmarks/train_speed.py --preset paper --batch-size 16 --device cuda --dtype bf16

One process: a multi-GPU run's throughput is this times the number of GPUs, less the
gradient all-reduce (train.py under torchrun logs its own tokens/s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/train_speed.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import train  # noqa: E402
from benchmarks.latency import decoder_flops, matmul_peak, text_flops  # noqa: E402
from shapes_tokenizers import SHAPES_BPE_PATH  # noqa: E402
from emage import EmageConfig, parse_variant  # noqa: E402


def train_flops(c: EmageConfig, variant, text_length: int) -> int:
    """Model FLOPs of one training example of `variant` (see the module docstring)."""
    n = c.n
    pairs = n * (n + 1) // 2 if variant == "ar" else n * n  # causal: the pairs a query may see
    decoder = decoder_flops(c, n, pairs, text_length, n)
    two_pass = variant in (2, 3)
    grad_decoder_passes = 1 + (two_pass and c.pass1_grad)
    return 3 * (text_flops(c, text_length) + grad_decoder_passes * decoder) + (two_pass and not c.pass1_grad) * decoder


def synthetic_shards(out: Path, config: EmageConfig, count: int, seed: int = 0) -> None:
    """`count` shapes captions with uniformly random codes on the preset's grid."""
    captions = [data.shapes_example(seed, i)[0] for i in range(count)]
    codes = np.random.default_rng(seed).integers(0, config.codebook_size, (count, config.n))
    data.write_token_shards(out, captions, codes, grid=config.grid, codebook_size=config.codebook_size, source="synthetic")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=("shapes", "paper"), help="model size (EmageConfig.shapes() or .paper())")
    p.add_argument("--variant", default="3", help="full, 1, 2, 3 or ar")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's, from train.PRESETS)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step and process")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="training dtype (and the peak it is compared with)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = parse_variant(args.variant)
    config = EmageConfig.paper() if args.preset == "paper" else EmageConfig.shapes()
    batch = args.batch_size or train.PRESETS[args.preset]["batch_size"]
    device = torch.device("cuda" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    peak_before = matmul_peak(device, dtype)

    with tempfile.TemporaryDirectory(prefix="emage-train-speed-") as tmp:
        tmp = Path(tmp)
        shards = tmp / "tokens"
        synthetic_shards(shards, config, max(4 * batch, 256))
        bpe = [] if args.preset == "shapes" else ["--bpe", str(SHAPES_BPE_PATH)]  # vocabulary size barely matters
        steps = args.warmup + args.steps
        code = train.main(["--preset", args.preset, "--variant", str(variant), "--data", str(shards), "--out", str(tmp / "run"),
                           "--steps", str(steps), "--batch-size", str(batch), "--grad-accum", str(args.grad_accum),
                           "--dtype", args.dtype, "--log-every", "1", "--eval-every", str(10 * steps),
                           "--save-every", str(10 * steps), "--keep", "1", "--vqgan", str(tmp / "no-vqgan"),
                           *(["--device", device.type]), *bpe])
        if code != 0:
            return code
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    peak = max(peak_before, matmul_peak(device, dtype))  # on a shared machine, the better of before and after
    timed = [r for r in records if "loss" in r and r["step"] > args.warmup]
    if not timed:  # train.py stops cleanly on SIGTERM (a timeout, say) with fewer steps
        print(f"error: the run ended after {len(records)} steps, before any timed step", file=sys.stderr)
        return 1
    seconds = sum(1 / r["steps_per_s"] for r in timed) / len(timed)
    text_length = config.text.context_length
    flops_per_step = batch * train_flops(config, variant, text_length)
    result = {
        "preset": args.preset, "variant": variant, "batch": batch, "dtype": args.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "steps_timed": len(timed), "seconds_per_step": seconds,
        "steps_per_s": 1 / seconds, "image_tokens_per_s": batch * config.n / seconds,
        "examples_per_s": batch / seconds, "model_gflop_per_step": flops_per_step / 1e9,
        "model_gflop_per_s": flops_per_step / seconds / 1e9, "matmul_peak_gflop_per_s": peak / 1e9,
        "mfu": flops_per_step / seconds / peak, "peak_memory_mb": peak_memory_mb(device),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    }
    print(f"{args.preset} preset, variant {variant}, batch {batch}, {args.dtype} on {device} ({result['threads']} threads):")
    print(f"  {seconds:.3f} s/step  {result['steps_per_s']:.3f} steps/s  {result['image_tokens_per_s']:,.0f} image tokens/s  "
          f"{result['examples_per_s']:.2f} examples/s")
    print(f"  {result['model_gflop_per_step']:.1f} model GFLOP/step  {result['model_gflop_per_s']:.1f} GFLOP/s  "
          f"matmul peak {result['matmul_peak_gflop_per_s']:.1f} GFLOP/s  MFU {result['mfu']:.1%}  peak memory {result['peak_memory_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
