"""PyTorch eager against ONNX Runtime: the whole sampling pipeline, side by side.

For each preset (random weights: the time does not depend on them) and batch, in one
process and with the same number of threads, the full path caption -> tokenizer -> text
encoder -> T rounds of mask-predict -> VQGAN decoder -> images runs through
`sample.Pipeline` (PyTorch eager) and through `sample.Pipeline.load_onnx` (the exported
graphs on ONNX Runtime). A batch is `num_images` candidates of one caption (the paper draws
16 per caption). The two backends alternate run by run, so a shared machine slows both
alike; a time is the median of --repeats runs after one warm-up (a one-round pass through
every graph at the same shapes). Each run also counts the tokens both backends commit
alike (same seed, same noise): all of them unless a sample falls within float rounding of
a CDF boundary, which random weights over 8192 codes make common (see export_onnx.py).

    python benchmarks/onnx_vs_torch.py                                    # shapes, batch 1 and 16
    python benchmarks/onnx_vs_torch.py --presets paper --batches 1        # ~15 min on 2 shared CPU cores
    python benchmarks/onnx_vs_torch.py --presets paper --device cuda      # on a GPU machine

Presets: "shapes" = EmageConfig.shapes() + shapes_tokenizers.vqgan_config() (64x64 images, 8x8 tokens);
"paper" = EmageConfig.paper() + VQGANConfig.gumbel_f8_8192() (256x256, 32x32 tokens).
Both read captions with the shapes vocabulary (any ids below the vocabulary size are valid
for random weights). The graphs are exported into --work-dir (reused when already there, replaced when
they are an earlier export of other weights).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/onnx_vs_torch.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

import clip_text  # noqa: E402
import emage  # noqa: E402
import export_onnx  # noqa: E402
import files  # noqa: E402
import sample  # noqa: E402
import shapes_tokenizers  # noqa: E402
import vqgan  # noqa: E402

PRESETS = {
    "shapes": (emage.EmageConfig.shapes, shapes_tokenizers.vqgan_config),
    "paper": (emage.EmageConfig.paper, vqgan.VQGANConfig.gumbel_f8_8192),
}
PROMPT = "a small red circle to the left of a large blue square"


def build(preset: str, work_dir: Path, device: str, threads: int, log):
    """(torch pipeline, ONNX pipeline, export seconds or None when reused) for one preset."""
    make_emage, make_vqgan = PRESETS[preset]
    vqgan_config = make_vqgan()
    emage_config = dataclasses.replace(make_emage(), codebook_size=vqgan_config.n_embed)  # one codebook
    torch.manual_seed(0)  # random weights, the same in every run (so an export can be reused)
    model = emage.Emage(emage_config, variant=3).eval()
    decoder = vqgan.VQGAN(vqgan_config).eval()
    folder = work_dir / preset
    try:
        meta = export_onnx.read_config(folder)
    except export_onnx.ExportError:
        meta = {}
    export_s = None
    if meta.get("config") != emage_config.to_dict() or meta.get("extra") != {"benchmark": preset}:
        started = time.perf_counter()
        export_onnx.export(model, decoder, folder, tokenizer_path=shapes_tokenizers.SHAPES_BPE_PATH, variant=3,
                           extra={"benchmark": preset}, check_batch=1 if preset == "paper" else 3, log=log,
                           overwrite=True)  # only ever an earlier export: export_onnx refuses other folders
        export_s = time.perf_counter() - started
    torch_device = torch.device(device)
    tokenizer = clip_text.Tokenizer(shapes_tokenizers.SHAPES_BPE_PATH)
    torch_pipe = sample.Pipeline(model.to(torch_device), decoder.to(torch_device), tokenizer,
                                 {"variant": 3, "extra": {}}, folder, torch_device)
    onnx_pipe = sample.Pipeline.load_onnx(folder, device, threads=threads)
    return torch_pipe, onnx_pipe, export_s


def run_once(pipe, batch: int, steps: int, seed: int = 0) -> tuple[float, torch.Tensor]:
    """Seconds for caption -> images (tokenizer included), and the tokens."""
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    tokens = pipe.generate(PROMPT, seed=seed, num_images=batch, steps=steps)
    pipe.decode(tokens)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, tokens


def measure(torch_pipe, onnx_pipe, batch: int, steps: int, repeats: int) -> dict:
    for pipe in (torch_pipe, onnx_pipe):  # warm-up: every graph and allocation at these shapes
        run_once(pipe, batch, 1)
    times = {"torch": [], "onnx": []}
    equal = 1.0
    for _ in range(repeats):
        t_torch, tokens_torch = run_once(torch_pipe, batch, steps)
        t_onnx, tokens_onnx = run_once(onnx_pipe, batch, steps)
        times["torch"].append(t_torch)
        times["onnx"].append(t_onnx)
        equal = min(equal, float((tokens_torch.cpu() == tokens_onnx.cpu()).float().mean()))
    torch_s, onnx_s = statistics.median(times["torch"]), statistics.median(times["onnx"])
    return {"batch": batch, "torch_s": torch_s, "onnx_s": onnx_s, "ratio": onnx_s / torch_s,
            "torch_s_per_image": torch_s / batch, "onnx_s_per_image": onnx_s / batch,
            "tokens_equal": equal, "runs": times}


def table(results: list[dict]) -> str:
    lines = ["| preset | batch | PyTorch eager (s) | ONNX Runtime (s) | ONNX / PyTorch | s per image (ORT) | tokens equal |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['preset']} | {r['batch']} | {r['torch_s']:.3f} | {r['onnx_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['onnx_s_per_image']:.3f} | {100 * r['tokens_equal']:.1f} % |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["shapes"], choices=tuple(PRESETS), help="model sizes")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="images per caption")
    parser.add_argument("--steps", type=int, default=16, help="mask-predict rounds T")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads of both backends (torch.set_num_threads and ONNX Runtime intra-op)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: PyTorch on the GPU and ONNX Runtime's CUDA provider")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "emage-onnx-benchmark",
                        help="where the exported graphs go (one folder per preset, reused)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.threads < 1 or min(args.batches) < 1:
        print("error: --repeats, --steps, --threads and --batches must be positive", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: PyTorch sees no CUDA GPU; run on a GPU machine or use --device cpu", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    import onnxruntime

    results = []
    try:
        for preset in args.presets:
            torch_pipe, onnx_pipe, export_s = build(preset, args.work_dir, args.device, args.threads, log)
            for batch in args.batches:
                log(f"{preset}, batch {batch}: {args.repeats} runs per backend, T = {args.steps}")
                result = {"preset": preset, **measure(torch_pipe, onnx_pipe, batch, args.steps, args.repeats),
                          "export_s": export_s}
                results.append(result)
                log(table([result]).splitlines()[-1])
            del torch_pipe, onnx_pipe
    except export_onnx.ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table(results))
    if args.json:
        report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                  "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "device": args.device,
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "load_average": os.getloadavg(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                  "opset": export_onnx.OPSET, "exporter": export_onnx.EXPORTER, "results": results}
        files.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
