"""How long the CLIP text tower takes to read a batch of captions.

The paper's generator encodes every caption once with CLIP ViT-L/14's text tower (width
768, 12 layers, context 77) before its mask-predict rounds. This script times, for each
--towers preset of `clip_text.TextConfig` with random weights (the time does not depend on
them): the tokenizer on --batch captions, then `TextEncoder(tokens)` on the padded
[batch, 77] tensor, as the median and the minimum of --repeats runs after --warmup runs.
Beside each time it gives the analytic FLOPs (matrix multiplies: 24 D^2 + 4 L D per token
and layer, plus the projection) and the rate they imply.

    python benchmarks/clip_text_speed.py                          # ViT-L/14 size, 16 captions, fp32 CPU
    python benchmarks/clip_text_speed.py --towers vit_l14 vit_b32 shapes --repeats 10
    python benchmarks/clip_text_speed.py --device cuda --dtype bf16

A shared machine makes single runs noisy: read the minimum as "what the hardware can do"
and the median as "what a run met"; the header line records threads, CPUs and the load
average when the run started (on 2 cores shared with other jobs, 1 thread can beat 2).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/clip_text_speed.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

import shapes  # noqa: E402
from clip_text import ClipTextError, TextConfig, TextEncoder, Tokenizer  # noqa: E402
from shapes_tokenizers import SHAPES_BPE_PATH, text_config  # noqa: E402

TOWERS = {"vit_l14": TextConfig.vit_l14, "vit_b32": TextConfig.vit_b32, "shapes": text_config}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CAPTIONS = [  # varied lengths, as a batch of real prompts would be
    "a photo of a cat",
    "A red double-decker bus driving down a rainy London street at night.",
    "two dogs playing with a frisbee on the beach",
    "an oil painting of a lighthouse in a storm, dramatic clouds, crashing waves",
    "a bowl of ramen",
    "a small red circle to the left of a large blue square",
    "A man in a suit riding a bicycle past a row of colourful houses on a sunny morning.",
    "close-up of a hummingbird drinking from a pink flower",
    "the Eiffel Tower made of chocolate",
    "a kitchen with wooden cabinets, a steel fridge and a bowl of green apples on the counter",
    "an astronaut",
    "a watercolour map of an imaginary island with mountains, rivers, forests and three small villages",
    "a teddy bear on a skateboard in Times Square",
    "a cyan triangle above a yellow circle",
    "snow-covered pine trees under a starry sky",
    "a plate of sushi next to a cup of green tea",
]


def flops_per_caption(config: TextConfig, length: int) -> float:
    """Matrix-multiply FLOPs of one caption of `length` tokens (2 per multiply-add)."""
    d = config.width
    per_token_layer = 2 * (3 * d * d + d * d + 8 * d * d) + 2 * 2 * length * d  # qkv, out, mlp; QK^T and AV
    return length * config.layers * per_token_layer + 2 * d * config.embed_dim


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--towers", nargs="+", choices=list(TOWERS), default=["vit_l14"], help="TextConfig presets to time")
    parser.add_argument("--batch", type=int, default=16, help="captions per batch (cycled from a fixed list)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tower")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations (LayerNorm stays fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--bpe", default=None, help="CLIP vocabulary for the 49408-id towers (default: found as Tokenizer does)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, device {args.device}, {args.dtype}, "
          f"batch {args.batch}")
    print("| tower | params | tokenize ms | encode median ms | encode min ms | GFLOP/batch | GFLOP/s (min) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.towers:
        config = TOWERS[name]()
        try:
            tokenizer = Tokenizer(SHAPES_BPE_PATH if name == "shapes" else args.bpe)
        except ClipTextError as e:
            sys.exit(f"error: {e}")
        pool = shapes.eval_captions() if name == "shapes" else CAPTIONS  # shapes captions fit its 24 positions
        captions = [pool[i % len(pool)] for i in range(args.batch)]
        tokenize = [timed(lambda: tokenizer(captions, context_length=config.context_length), "cpu") for _ in range(args.repeats)]
        tokens = tokenizer(captions, context_length=config.context_length).to(args.device)  # (B, L)
        torch.manual_seed(0)
        model = TextEncoder(config).to(args.device, DTYPES[args.dtype]).eval()
        with torch.inference_mode():
            for _ in range(args.warmup):
                model(tokens)
            times = [timed(lambda: model(tokens), args.device) for _ in range(args.repeats)]
        gflop = args.batch * flops_per_caption(config, tokens.shape[1]) / 1e9
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.1f} M | {1e3 * statistics.median(tokenize):.1f} | {1e3 * statistics.median(times):.0f} "
              f"| {1e3 * min(times):.0f} | {gflop:.3g} | {gflop / min(times):.3g} |", flush=True)


if __name__ == "__main__":
    main()
