"""Generate images from a caption with a trained Emage checkpoint.

    python sample.py "a red circle to the left of a blue square"

Caption -> CLIP text encoder -> T rounds of mask-predict over the image tokens
(Algorithm 3 of the paper for a #3 model, Algorithm 1 for #1/#2) -> VQGAN
decoder -> PNG. The default checkpoint is the shapes-world demo shipped in
`checkpoints/shapes/emage`, which only knows the captions of `shared/SHAPES.md`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parent
DEMO_CHECKPOINT = ROOT / "checkpoints" / "shapes" / "emage"
MAX_STEPS = 1024  # more rounds than any grid has tokens is never useful


class SampleError(ValueError):
    """A user error on the sampling command line."""


@dataclass
class Pipeline:
    """Everything sampling needs, loaded once: tokenizer, generator, VQGAN decoder."""

    model: "emage.Emage"  # noqa: F821
    vqgan: "vqgan.VQGAN"  # noqa: F821
    tokenizer: "clip_text.Tokenizer"  # noqa: F821
    info: dict
    checkpoint: Path
    device: torch.device

    @classmethod
    def load(cls, checkpoint: str | Path = DEMO_CHECKPOINT, device: str | torch.device = "cpu") -> "Pipeline":
        import clip_text
        import emage
        import vqgan

        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise SampleError(f"checkpoint folder {checkpoint} does not exist; pass --checkpoint DIR "
                              "(a folder with config.json and model.safetensors written by train.py)")
        device = torch.device(device)
        model, info = emage.load_checkpoint(checkpoint, map_location=device)
        tokenizer = clip_text.Tokenizer(info["tokenizer_path"])
        decoder = vqgan.load_vqgan(info["vqgan_dir"]).to(device).eval()
        return cls(model, decoder, tokenizer, info, checkpoint, device)

    @property
    def knows_only_shapes(self) -> bool:
        train_args = self.info.get("extra", {}).get("train_args", {})
        return str(train_args.get("data", "shapes")) == "shapes"

    def text_tokens(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, context_length=self.model.config.text.context_length).to(self.device)

    @torch.no_grad()
    def generate(self, prompt: str, *, seed: int = 0, num_images: int = 1, steps: int = 16,
                 negative_prompt: str | None = None, return_history: bool = False, **options):
        """Image tokens [num_images, n] (and the per-round history) for one prompt."""
        generator = torch.Generator(self.device).manual_seed(seed)
        negative = self.text_tokens([negative_prompt]) if negative_prompt is not None else None
        return self.model.generate(self.text_tokens([prompt]), steps=steps, num_candidates=num_images,
                                   negative_tokens=negative, generator=generator,
                                   return_history=return_history, **options)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """Token maps [B, n] -> RGB images."""
        h, w = self.model.config.grid
        images = self.vqgan.decode(tokens.reshape(-1, h, w).to(self.device)).float()  # (B, 3, H, W) in [-1, 1]
        array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a, "RGB") for a in array]

    def decode_history(self, history: torch.Tensor, index: int = 0) -> Image.Image:
        """A Figure-5-style strip: the image after each round, still-masked cells shown grey."""
        h, w = self.model.config.grid
        rounds = history[:, index]  # (T, n)
        masked = rounds == self.model.config.mask_id
        frames = self.decode(torch.where(masked, torch.zeros_like(rounds), rounds))
        out = []
        for frame, hole in zip(frames, masked.reshape(-1, h, w).cpu().numpy()):
            pixels = np.asarray(frame).copy()
            cell = pixels.shape[0] // h
            grey = np.kron(hole, np.ones((cell, cell), dtype=bool))
            pixels[grey] = (96, 96, 96)
            out.append(Image.fromarray(pixels))
        strip = Image.new("RGB", (sum(f.width for f in out) + 2 * (len(out) - 1), out[0].height), "white")
        for i, frame in enumerate(out):
            strip.paste(frame, (i * (frame.width + 2), 0))
        return strip


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def clean_prompt(prompt: str) -> str:
    """Refuse empty prompts; replace what UTF-8 cannot hold (lone surrogates) and NUL bytes."""
    prompt = prompt.encode("utf-8", "replace").decode("utf-8").replace("\x00", " ")
    if not prompt.strip():
        raise SampleError('the prompt is empty: pass a caption, e.g. python sample.py "a red circle"')
    return prompt


def upscale(image: Image.Image, factor: int) -> Image.Image:
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def save_png(image: Image.Image, path: Path, parameters: dict) -> None:
    """Write a PNG with the generation parameters in a `parameters` text chunk (atomically)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(parameters))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SampleError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def output_paths(args, count: int) -> list[Path]:
    if args.out is None:
        stem = Path("outputs") / f"{slug(args.prompt)}-{args.seed}"
        return [stem.with_suffix(".png")] if count == 1 else [Path(f"{stem}-{i}.png") for i in range(count)]
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        out = out / f"{slug(args.prompt)}-{args.seed}.png"  # a folder
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(count)]


def check_args(args) -> None:
    if not 1 <= args.steps <= MAX_STEPS:
        raise SampleError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if not 1 <= args.num_images <= 256:
        raise SampleError(f"--num-images must be between 1 and 256, got {args.num_images}")
    if not 0 <= args.temperature < float("inf"):  # nan fails every comparison
        raise SampleError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.guidance < float("inf"):
        raise SampleError(f"--guidance must be a finite number >= 0 (1 = off), got {args.guidance}")
    if not 1 <= args.upscale <= 16:
        raise SampleError(f"--upscale must be between 1 and 16, got {args.upscale}")
    if not 0 <= args.seed < 2**63:
        raise SampleError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.backend == "onnx" and args.onnx_dir is None:
        raise SampleError("--backend onnx needs --onnx-dir DIR, a folder written by "
                          "python export_onnx.py --checkpoint DIR --out DIR")
    if args.backend == "onnx" and args.dtype != "fp32":
        raise SampleError("the exported ONNX graphs are fp32: use --dtype fp32 with --backend onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes PNG files.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", help="the caption to draw")
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="Emage checkpoint folder")
    parser.add_argument("--out", help="output PNG, or a folder (default: outputs/<prompt>-<seed>.png)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image)")
    parser.add_argument("--num-images", type=int, default=1, help="images to draw, in one batch")
    parser.add_argument("--steps", type=int, default=16, help="mask-predict rounds T (the paper uses 16)")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "linear"),
                        help="inference masking schedule tau() (Section 4.7: cosine is better)")
    parser.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature (0 = argmax)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--negative-prompt", help="caption to steer away from (used with --guidance > 1)")
    parser.add_argument("--algorithm", choices=("1", "3", "full", "ar"),
                        help="decoding algorithm (default: the one the checkpoint was trained for)")
    parser.add_argument("--show-steps", action="store_true",
                        help="also write <out>-steps.png: the image after every round (paper Fig. 5)")
    parser.add_argument("--upscale", type=int, default=4, help="nearest-neighbour enlargement of the saved PNG")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute precision")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                        help="run the model in PyTorch, or the graphs of export_onnx.py on ONNX Runtime")
    parser.add_argument("--onnx-dir", type=Path, help="folder written by export_onnx.py (with --backend onnx)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import clip_text
    import emage
    import export_onnx
    import shapes
    import vqgan

    user_errors = (SampleError, emage.EmageError, clip_text.ClipTextError, vqgan.VQGANError,
                   export_onnx.ExportError, OSError)
    try:
        args.prompt = clean_prompt(args.prompt)
        check_args(args)
        started = time.perf_counter()
        if args.backend == "onnx":  # tokens, noise and images on the host; the graphs where --device says
            pipe = export_onnx.OnnxPipeline.load(args.onnx_dir, args.device)
            device = pipe.device
        else:
            device = pick_device(args.device)
            pipe = Pipeline.load(args.checkpoint, device)
        loaded = time.perf_counter()
        if pipe.knows_only_shapes:
            try:
                shapes.parse(args.prompt)
            except shapes.ShapesError as error:
                warnings.warn(f"this model only knows the shapes world ({error}); generating anyway", stacklevel=1)
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
        options = dict(steps=args.steps, schedule=args.schedule, temperature=args.temperature,
                       guidance_scale=args.guidance, seed=args.seed, num_images=args.num_images,
                       negative_prompt=args.negative_prompt, return_history=args.show_steps)
        if args.algorithm:
            options["algorithm"] = emage.parse_algorithm(args.algorithm)
        with amp:
            result = pipe.generate(args.prompt, **options)
            tokens, history = result if args.show_steps else (result, None)
            images = pipe.decode(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampled = time.perf_counter()
        parameters = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "schedule": args.schedule,
                      "temperature": args.temperature, "guidance": args.guidance,
                      "negative_prompt": args.negative_prompt, "variant": pipe.info["variant"],
                      "algorithm": args.algorithm or "default", "backend": args.backend,
                      "checkpoint": str(args.onnx_dir if args.backend == "onnx" else args.checkpoint)}
        for i, (image, path) in enumerate(zip(images, output_paths(args, len(images)))):
            save_png(upscale(image, args.upscale), path, dict(parameters, index=i))
            print(path)
            if history is not None:
                steps_path = path.with_name(f"{path.stem}-steps.png")
                save_png(upscale(pipe.decode_history(history, i), args.upscale), steps_path, dict(parameters, index=i))
                print(steps_path)
        print(f"sampled {len(images)} image(s) in {sampled - loaded:.3f} s "
              f"({args.steps} rounds, {device.type}); loading took {loaded - started:.3f} s", file=sys.stderr)
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
