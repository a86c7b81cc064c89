"""Generate images from a caption with a trained Emage checkpoint.

    python sample.py "a red circle to the left of a blue square"

Caption -> CLIP text encoder -> T rounds of mask-predict over the image tokens
(Algorithm 3 of the paper for a #3 model, Algorithm 1 for #1/#2) -> VQGAN
decoder -> PNG. The default checkpoint is the shapes-world demo shipped in
`checkpoints/shapes/emage`, which only knows the captions of `SHAPES.md`.

Beyond the paper, the same mask-predict loop edits images (as Muse and aMUSEd do):
the image is tokenised by the VQGAN, the tokens to redraw are set to [mask] and the
others are fixed from round 0, and the algorithm fills the rest:

    --init-image IMG --mask MASK.png      inpainting: redraw where the mask is white
    --init-image IMG --region x0,y0,x1,y1 inpainting: redraw a rectangle (pixels, x1/y1 exclusive)
    --init-image IMG --place x,y          outpainting: IMG pasted unscaled at (x, y) on a black
                                          canvas of the model's size; the rest is drawn around it
    --init-image IMG [--strength s]       variation: redraw a random fraction s of all tokens

A token is redrawn when any pixel of its cell is selected, so edits cover whole cells
(8 x 8 px for the shapes VQGAN). `--strength` redraws a random fraction of the selected
tokens (default: all of them; 0.5 for a variation).

Every image is the best of `--candidates` candidates drawn in one batch. The paper ranks 16
candidates by CLIP image-text similarity (Section 4, `--rerank clip`); by default they are
ranked by the generator itself (`--rerank self`, `extensions.self_score`: how well it predicts
each object of a candidate from the rest and the caption; `--contrast mirror` also asks how
much better the prompt explains its layout than the mirrored prompt does, "a red circle to
the right of a blue square"; the shipped demo, trained with the mirror loss, gains nothing
from it, so it is off by default).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

import bert_text
import clip_text
import emage
import extensions
import shapes
import vqgan
from files import MAX_IMAGE_PIXELS, FileError, atomic_write, open_image, png_text

ROOT = Path(__file__).resolve().parent
DEMO_CHECKPOINT = ROOT / "checkpoints" / "shapes" / "emage"
# Sampling defaults: the best of the README's sweep on the shapes demo (T = 16).
DEFAULT_TEMPERATURE = 0.7  # token sampling temperature; 1 draws from the model as it is
DEFAULT_GUIDANCE = 1.5  # classifier-free guidance scale; 1 turns it off and halves the work per round
DEFAULT_CANDIDATES = 8  # drawn per image and re-ranked by --rerank (--backend torch; ONNX draws 1)
MAX_STEPS = 1024  # more rounds than any grid has tokens is never useful
MAX_OUTPUT_PIXELS = MAX_IMAGE_PIXELS  # no PNG written is larger than the largest image the scripts read (64 MP)
MAX_STRIP_FRAMES_PIXELS = 16 * 1024 * 1024  # --show-steps decodes rounds x canvas pixels at most this many
MAX_PLACE = 65536  # --place offsets, in canvas pixels


class SampleError(ValueError):
    """A user error on the sampling command line."""


@dataclass
class Pipeline:
    """Everything sampling needs, loaded once: tokenizer, generator, VQGAN decoder."""

    model: emage.Emage  # or export_onnx.OnnxEmage (same generate)
    vqgan: vqgan.VQGAN  # or export_onnx.OnnxVQGAN (decode only)
    tokenizer: object  # clip_text.Tokenizer, or bert_text.WordPiece for a BERT tower
    info: dict
    checkpoint: Path
    device: torch.device

    @classmethod
    def load(cls, checkpoint: str | Path = DEMO_CHECKPOINT, device: str | torch.device = "cpu",
             vqgan_dir: str | Path | None = None) -> "Pipeline":
        """A checkpoint folder and the VQGAN it names (relative to itself), or `vqgan_dir`."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise SampleError(f"checkpoint folder {checkpoint} does not exist; pass --checkpoint DIR "
                              "(a folder with config.json and model.safetensors written by train.py)")
        device = torch.device(device)
        model, info = extensions.load_checkpoint(checkpoint, map_location=device)
        tokenizer = emage.load_tokenizer(info["tokenizer_path"])
        if vqgan_dir is None and not Path(info["vqgan_dir"]).is_dir():
            raise SampleError(f"{checkpoint} names its VQGAN as {info['vqgan_relative']!r} relative to itself, and "
                              f"{info['vqgan_dir']} does not exist (was the checkpoint moved?); pass --vqgan DIR")
        decoder = vqgan.load_vqgan(vqgan_dir or info["vqgan_dir"]).to(device).eval()
        if decoder.config.n_embed != model.config.codebook_size:
            raise SampleError(f"the VQGAN {vqgan_dir or info['vqgan_dir']} has {decoder.config.n_embed} codes but the "
                              f"generator {model.config.codebook_size}; pass the VQGAN it was trained with (--vqgan)")
        return cls(model, decoder, tokenizer, info, checkpoint, device)

    @classmethod
    def load_onnx(cls, onnx_dir: str | Path, device: str = "cpu", threads: int = 0) -> "Pipeline":
        """The same pipeline with the text encoder, the rounds and the VQGAN decoder on ONNX
        Runtime (graphs written by export_onnx.py); tokens, noise and images stay on the CPU."""
        import export_onnx  # only this backend needs onnxruntime

        if not Path(onnx_dir).is_dir():
            raise SampleError(f"no exported graphs in {onnx_dir}: run python export_onnx.py first "
                              "(or pass --onnx-dir DIR)")
        model, decoder, tokenizer, info = export_onnx.load_onnx(onnx_dir, device, threads)
        return cls(model, decoder, tokenizer, info, Path(onnx_dir), torch.device("cpu"))

    @property
    def knows_only_shapes(self) -> bool:
        train_args = self.info.get("extra", {}).get("train_args", {})
        return str(train_args.get("data", "shapes")) == "shapes"

    @property
    def render_options(self) -> dict:
        """shapes.render's align/jitter of the images the model was trained on (SHAPES.md's defaults if unrecorded)."""
        train_args = self.info.get("extra", {}).get("train_args", {})
        return {"align": int(train_args.get("shapes_align", 1)), "jitter": bool(train_args.get("shapes_jitter", True))}

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the model draws: the token grid times the VQGAN's downsampling factor."""
        h, w = self.model.config.grid
        f = self.vqgan.config.downsample_factor
        return h * f, w * f

    @torch.no_grad()
    def encode(self, image: Image.Image) -> torch.Tensor:
        """An RGB image of the model's size -> its VQGAN tokens [1, n] (for editing)."""
        if not hasattr(self.vqgan, "encode"):
            raise SampleError("editing needs the VQGAN encoder, which the exported ONNX graphs lack: use --backend torch")
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        tokens = self.vqgan.encode((pixels / 127.5 - 1).to(self.device))  # (1, h, w)
        return tokens.reshape(1, -1)

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
    def self_scores(self, prompt: str, tokens: torch.Tensor, seed: int = 0, contrast: str | None = None) -> np.ndarray:
        """extensions.self_score of each candidate [B, n] under the prompt, against `contrast` if
        given: (B,), higher is better."""
        text = self.text_tokens([prompt]).expand(len(tokens), -1)
        against = self.text_tokens([contrast]).expand(len(tokens), -1) if contrast is not None else None
        generator = torch.Generator(self.device).manual_seed(seed)  # random hide-sets of codes without colours
        scores = extensions.self_score(self.model, text, tokens, generator=generator, contrast_tokens=against)
        return scores.float().cpu().numpy()

    @torch.no_grad()
    def best_of(self, prompt: str, candidates: int, *, seed: int = 0, contrast: str | None = None,
                **options) -> torch.Tensor:
        """One image as sample.py draws it: the best of `candidates` by the self-score (against
        `contrast` if given); tokens [1, n]."""
        tokens = self.generate(prompt, seed=seed, num_images=candidates, **options)
        if candidates == 1:
            return tokens
        scores = self.self_scores(prompt, tokens, seed=seed, contrast=contrast)
        best = int(np.argmax(scores))
        return tokens[best:best + 1]

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


def parse_numbers(text: str, count: int, flag: str) -> tuple[int, ...]:
    """'x0,y0,x1,y1' -> (x0, y0, x1, y1): `count` integers separated by commas."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise SampleError(f"{flag} takes {count} integers separated by commas, got {text!r}")
    return values


def region_pixels(region: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Pixels [H, W] to redraw: True inside the rectangle x0 <= x < x1, y0 <= y < y1."""
    H, W = size
    x0, y0, x1, y1 = region
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise SampleError(f"--region {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} "
                          "(pixels of the model's canvas)")
    selected = np.zeros((H, W), dtype=bool)
    selected[y0:y1, x0:x1] = True
    return selected


def mask_pixels(path, size: tuple[int, int]) -> np.ndarray:
    """Pixels [H, W] to redraw from a mask image: white (grey level >= 128) is redrawn, black kept,
    the convention of diffusers' inpainting; the mask is resized (nearest) to the canvas."""
    H, W = size
    grey = open_image(path, "--mask").convert("L").resize((W, H), Image.NEAREST)
    return np.asarray(grey) >= 128


def cells_to_redraw(pixels: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel selection [H, W] -> token selection BoolTensor[n]: a token is redrawn when any
    pixel of its cell is selected, so the edit covers the whole selection."""
    h, w = grid
    H, W = pixels.shape
    cells = pixels.reshape(h, H // h, w, W // w).any(axis=(1, 3))  # (h, w)
    return torch.from_numpy(cells).reshape(-1)


def random_subset(selected: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """round(strength * count) of the selected positions (at least one), chosen uniformly at random."""
    positions = selected.nonzero()[:, 0]  # (count,)
    k = max(1, round(strength * len(positions)))
    chosen = positions[torch.randperm(len(positions), generator=generator)[:k]]
    out = torch.zeros_like(selected)
    out[chosen] = True
    return out


def edit_inputs(args, pipe: Pipeline) -> tuple[Image.Image, torch.Tensor, torch.Tensor]:
    """(canvas image, init_tokens[1, n], keep_mask[1, n]) for emage's generate from the editing flags."""
    H, W = pipe.image_size
    image = open_image(args.init_image, f"--init-image {args.init_image}")
    if args.place is not None:  # outpainting: the image unscaled on a black canvas, the rest redrawn
        x, y = parse_numbers(args.place, 2, "--place")
        canvas = Image.new("RGB", (W, H))
        canvas.paste(image, (x, y))
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + image.width, W), min(y + image.height, H)
        if x0 >= x1 or y0 >= y1:
            raise SampleError(f"--place {x},{y} puts the {image.width}x{image.height} image outside the {W}x{H} canvas")
        pixels = ~region_pixels((x0, y0, x1, y1), (H, W))
    else:
        canvas = image if image.size == (W, H) else image.resize((W, H), Image.BICUBIC)
        if args.mask is not None:
            pixels = mask_pixels(args.mask, (H, W))
        elif args.region is not None:
            pixels = region_pixels(parse_numbers(args.region, 4, "--region"), (H, W))
        else:  # image variation: every token may be redrawn
            pixels = np.ones((H, W), dtype=bool)
    selected = cells_to_redraw(pixels, pipe.model.config.grid)  # (n,)
    if not selected.any():
        raise SampleError("the mask selects no token to redraw: paint the part to change white")
    plain_edit = args.mask is not None or args.region is not None or args.place is not None
    strength = args.strength if args.strength is not None else (1.0 if plain_edit else 0.5)
    redraw = random_subset(selected, strength, torch.Generator().manual_seed(args.seed))
    return canvas, pipe.encode(canvas), ~redraw[None].to(pipe.device)


def edit_strip(canvas: Image.Image, keep: torch.Tensor, output: Image.Image, grid: tuple[int, int]) -> Image.Image:
    """input | mask (redrawn cells white) | output, side by side."""
    h, w = grid
    cells = (~keep.reshape(h, w).cpu().numpy()).astype(np.uint8) * 255
    mask = Image.fromarray(cells, "L").resize(canvas.size, Image.NEAREST).convert("RGB")
    strip = Image.new("RGB", (3 * canvas.width + 4, canvas.height), "white")
    for i, image in enumerate((canvas, mask, output)):
        strip.paste(image, (i * (canvas.width + 2), 0))
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
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


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


def is_sample_png(path: Path) -> bool:
    """Whether `path` is a PNG that sample.py wrote: a `parameters` text chunk holding its JSON
    (read with files.png_text: bounded, no pixel decoded). Only such a file is replaced
    without --overwrite."""
    try:
        parameters = json.loads(png_text(path).get("parameters", ""))
    except (FileError, ValueError, RecursionError):
        return False
    return isinstance(parameters, dict) and "prompt" in parameters and "seed" in parameters


def planned_outputs(args) -> list[Path]:
    """Every file this command will write: the images, and their -steps / -edit strips."""
    paths = []
    for path in output_paths(args, args.num_images):
        paths.append(path)
        if args.show_steps:
            paths.append(path.with_name(f"{path.stem}-steps.png"))
        if args.show_edit:
            paths.append(path.with_name(f"{path.stem}-edit.png"))
    return paths


def check_outputs(args) -> None:
    """No file is replaced unless sample.py wrote it (a re-run with other settings replaces its
    own PNG) or --overwrite is given; a folder where a PNG belongs is refused."""
    for path in planned_outputs(args):
        if path.is_dir():
            raise SampleError(f"{path} is a folder; pass --out a PNG name or another folder")
        if path.exists() and not args.overwrite and not is_sample_png(path):
            raise SampleError(f"{path} exists and was not written by sample.py; pass --overwrite to replace it, "
                              "or choose another --out")


def check_output_size(args, image_size: tuple[int, int]) -> None:
    """Refuse absurd outputs before any work: no PNG over MAX_OUTPUT_PIXELS (the image, the
    --show-steps strip of every round, the --show-edit strip, each upscaled), and no
    --show-steps that would decode more than MAX_STRIP_FRAMES_PIXELS."""
    H, W = image_size
    up = args.upscale
    sizes = {"the image": (W * up, H * up)}
    if args.show_steps:
        rounds = args.steps  # at most one frame per round ("full" and "ar" give one)
        if rounds * H * W > MAX_STRIP_FRAMES_PIXELS:
            raise SampleError(f"--show-steps would decode {rounds} rounds of {W}x{H} pixels, over the limit of "
                              f"{MAX_STRIP_FRAMES_PIXELS:,} pixels; pass fewer --steps")
        sizes["the --show-steps strip"] = ((rounds * (W + 2) - 2) * up, H * up)
    if args.show_edit:
        sizes["the --show-edit strip"] = ((3 * W + 4) * up, H * up)
    for what, (width, height) in sizes.items():
        if width * height > MAX_OUTPUT_PIXELS:
            raise SampleError(f"{what} would be {width}x{height} pixels, over the limit of {MAX_OUTPUT_PIXELS:,}; "
                              "pass a smaller --upscale" + (" or fewer --steps" if "steps" in what else ""))


def check_args(args) -> None:
    if not 1 <= args.steps <= MAX_STEPS:
        raise SampleError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if not 1 <= args.num_images <= 256:
        raise SampleError(f"--num-images must be between 1 and 256, got {args.num_images}")
    if not 0 <= args.temperature < float("inf"):  # nan fails every comparison
        raise SampleError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.guidance < float("inf"):
        raise SampleError(f"--guidance must be a finite number >= 0 (1 = off), got {args.guidance}")
    if args.upscale is not None and not 1 <= args.upscale <= 16:
        raise SampleError(f"--upscale must be between 1 and 16, got {args.upscale}")
    if not 0 <= args.seed < 2**63:
        raise SampleError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.backend == "onnx" and args.dtype != "fp32":
        raise SampleError("the exported ONNX graphs are fp32: use --dtype fp32 with --backend onnx")
    if args.candidates is None:
        args.candidates = DEFAULT_CANDIDATES if args.backend == "torch" else 1
    if args.backend == "onnx" and args.rerank == "self" and args.candidates > 1:
        raise SampleError("--rerank self needs the PyTorch generator: use --backend torch, --rerank clip "
                          "or --candidates 1")
    if not 1 <= args.candidates <= 256 or args.candidates * args.num_images > 1024:
        raise SampleError(f"--candidates must be between 1 and 256 (and --num-images x --candidates <= 1024), "
                          f"got {args.candidates}")
    editing = (args.mask, args.region, args.place, args.strength)
    if args.init_image is None and (any(v is not None for v in editing) or args.show_edit):
        raise SampleError("--mask, --region, --place, --strength and --show-edit edit an image: pass --init-image IMG")
    if sum(v is not None for v in editing[:3]) > 1:
        raise SampleError("pass one of --mask, --region and --place")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise SampleError(f"--strength is the fraction of tokens to redraw, in (0, 1], got {args.strength}")
    if args.region is not None:
        parse_numbers(args.region, 4, "--region")  # its bounds are checked against the canvas
    if args.place is not None and any(abs(v) > MAX_PLACE for v in parse_numbers(args.place, 2, "--place")):
        raise SampleError(f"--place x,y must be within {MAX_PLACE} pixels of the canvas, got {args.place}")
    if args.init_image is not None and args.algorithm in ("full", "ar"):
        raise SampleError(f"editing needs algorithm 1 or 3 (mask-predict), not --algorithm {args.algorithm}")
    if args.init_image is not None and args.backend == "onnx":
        raise SampleError("editing needs the VQGAN encoder, which the exported ONNX graphs lack: use --backend torch")
    check_outputs(args)


def contrast_caption(args) -> str | None:
    """--contrast as the self-score uses it: 'none' = off (the default), 'mirror' = the prompt
    mirrored (shapes.contrast_for; off for a prompt without a relation), else a caption."""
    choice = args.contrast.strip().lower()
    if choice == "none":
        return None
    if choice == "mirror":
        return shapes.contrast_for(args.prompt)
    if not choice:
        raise SampleError("--contrast is empty: pass a caption the image must not match, or 'none'")
    return clean_prompt(args.contrast)


def rerank_scores(args, pipe, clip, tokens: torch.Tensor, images: list) -> np.ndarray | None:
    """One score per candidate (higher is better), or None with a single candidate."""
    if args.candidates == 1:
        return None
    if args.rerank == "clip":
        return np.asarray(clip(np.stack([np.asarray(im) for im in images]), args.prompt))
    return pipe.self_scores(args.prompt, tokens, seed=args.seed, contrast=args.contrast)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes PNG files.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("prompt", help="the caption to draw")
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="Emage checkpoint folder")
    parser.add_argument("--vqgan", type=Path, default=None,
                        help="VQGAN folder to decode with (default: the one the checkpoint names, relative to itself)")
    parser.add_argument("--out", help="output PNG, or a folder (default: outputs/<prompt>-<seed>.png); an existing "
                        "file is replaced only if sample.py wrote it, or with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing files at the output paths even if sample.py did not write them")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same image)")
    parser.add_argument("--num-images", type=int, default=1, help="images to draw, in one batch")
    parser.add_argument("--steps", type=int, default=16, help="mask-predict rounds T (the paper uses 16)")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "linear"),
                        help="inference masking schedule tau() (Section 4.7: cosine is better)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="token sampling temperature (0 = argmax); the default was the best of the README's sweep")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale (1 = off); the default was the best of the README's sweep")
    parser.add_argument("--negative-prompt", help="caption to steer away from (used with --guidance > 1)")
    parser.add_argument("--algorithm", choices=("1", "3", "full", "ar"),
                        help="decoding algorithm (default: the one the checkpoint was trained for)")
    parser.add_argument("--show-steps", action="store_true",
                        help="also write <out>-steps.png: the image after every round (paper Fig. 5)")
    parser.add_argument("--upscale", type=int, default=None,
                        help="nearest-neighbour enlargement of the saved PNG (default: up to at least 256 px, so 4 "
                             "for the 64 px shapes demo and 1 for a 256 px model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="compute precision")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                        help="run the model in PyTorch, or the graphs of export_onnx.py on ONNX Runtime")
    parser.add_argument("--onnx-dir", type=Path, default=ROOT / "exports" / "shapes-demo",
                        help="folder written by export_onnx.py (with --backend onnx; the default is its default --out)")
    edit = parser.add_argument_group("editing (see the top of this file)")
    edit.add_argument("--init-image", type=Path, help="image to edit (resized to the model's canvas unless --place)")
    edit.add_argument("--mask", type=Path, help="inpainting mask: white = redraw, black = keep")
    edit.add_argument("--region", help="inpainting rectangle x0,y0,x1,y1 in canvas pixels (x1, y1 exclusive)")
    edit.add_argument("--place", help="outpainting: paste --init-image unscaled at x,y on a black canvas, draw the rest")
    edit.add_argument("--strength", type=float,
                      help="fraction of the selected tokens redrawn, at random; unset: 1 with --mask/--region/--place, "
                           "0.5 for a variation")
    edit.add_argument("--show-edit", action="store_true", help="also write <out>-edit.png: input | mask | output")
    rank = parser.add_argument_group("re-ranking (each image is the best of --candidates; the paper ranks 16 by CLIP)")
    rank.add_argument("--candidates", type=int,
                      help=f"candidates drawn per image, in one batch; the best is kept (default: "
                           f"{DEFAULT_CANDIDATES} with --backend torch, 1 with onnx)")
    rank.add_argument("--rerank", default="self", choices=("self", "clip"),
                      help="how candidates are scored: by the generator itself (extensions.self_score, beyond "
                           "the paper; with colour-factored codes it hides one object at a time, otherwise random "
                           "halves of the tokens, 4 times per candidate: measured on the shapes world only) or by "
                           "CLIP image-text similarity (the paper's)")
    rank.add_argument("--contrast", default="none",
                      help="with --rerank self: a caption the image must not match; candidates whose layout it "
                           "explains as well as the prompt score lower. 'mirror' = the prompt with its relation "
                           "mirrored (a shapes prompt with a relation); 'none' = off (the shipped demo gains "
                           "nothing from it, see docs/results.md)")
    rank.add_argument("--clip", type=Path, default=ROOT / "checkpoints" / "shapes" / "clip",
                      help="whole CLIP checkpoint for --rerank clip (clip_image.load_reranker reads it)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    user_errors = (SampleError, FileError, emage.EmageError, clip_text.ClipTextError, bert_text.BertError, vqgan.VQGANError,
                   OSError)
    if args.backend == "onnx":
        import export_onnx  # only this backend needs onnxruntime

        user_errors += (export_onnx.ExportError,)
    try:
        args.prompt = clean_prompt(args.prompt)
        check_args(args)
        args.contrast = contrast_caption(args)
        started = time.perf_counter()
        if args.backend == "onnx" and args.vqgan is not None:
            raise SampleError("--vqgan is for --backend torch: an export carries its own VQGAN decoder")
        if args.backend == "onnx":  # tokens, noise and images on the host; the graphs where --device says
            pipe = Pipeline.load_onnx(args.onnx_dir, args.device)
            device = pipe.device
        else:
            device = pick_device(args.device)
            pipe = Pipeline.load(args.checkpoint, device, vqgan_dir=args.vqgan)
        if args.upscale is None:
            args.upscale = max(1, -(-256 // pipe.image_size[1]))
        check_output_size(args, pipe.image_size)
        clip = None
        if args.candidates > 1 and args.rerank == "clip":
            import clip_image  # the paper's re-ranker, off by default

            clip = clip_image.load_reranker(args.clip, device=device)
        loaded = time.perf_counter()
        if pipe.knows_only_shapes:
            try:
                shapes.parse(args.prompt)
            except shapes.ShapesError as error:
                print(f"warning: this model only knows the shapes world ({error}); generating anyway", file=sys.stderr)
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
        C = args.candidates
        options = dict(steps=args.steps, schedule=args.schedule, temperature=args.temperature,
                       guidance_scale=args.guidance, seed=args.seed, num_images=args.num_images * C,
                       negative_prompt=args.negative_prompt, return_history=args.show_steps)
        if args.algorithm:
            options["algorithm"] = emage.parse_algorithm(args.algorithm)
        with amp:
            if args.init_image is not None:
                canvas, options["init_tokens"], keep = edit_inputs(args, pipe)
                options["keep_mask"] = keep
            result = pipe.generate(args.prompt, **options)
            tokens, history = result if args.show_steps else (result, None)
            images = pipe.decode(tokens)  # candidates of one image adjacent
            scores = rerank_scores(args, pipe, clip, tokens, images)  # (num_images * C,) or None
        rows = list(range(len(images)))
        if scores is not None:  # keep the best-scoring candidate of each image
            rows = [i * C + int(np.argmax(scores[i * C:(i + 1) * C])) for i in range(args.num_images)]
            for i, row in enumerate(rows):
                print(f"image {i}: {args.rerank} scores of the {C} candidates "
                      + " ".join(f"{s:.3f}" for s in scores[i * C:(i + 1) * C]) + f"; kept {row - i * C}",
                      file=sys.stderr)
            images = [images[r] for r in rows]
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampled = time.perf_counter()
        parameters = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps, "schedule": args.schedule,
                      "temperature": args.temperature, "guidance": args.guidance,
                      "negative_prompt": args.negative_prompt, "variant": pipe.info["variant"],
                      "algorithm": args.algorithm or "default", "backend": args.backend,
                      "checkpoint": str(Path(args.onnx_dir if args.backend == "onnx" else args.checkpoint).resolve()),
                      "step": pipe.info["step"]}
        if C > 1:
            parameters.update(candidates=C, rerank=args.rerank)
            if args.rerank == "clip":
                parameters.update(clip=str(args.clip))
            else:
                if args.contrast is not None:
                    parameters.update(contrast=args.contrast)
        if args.init_image is not None:
            parameters.update(init_image=str(args.init_image), mask=args.mask and str(args.mask), region=args.region,
                              place=args.place, strength=args.strength)
        for i, (image, path) in enumerate(zip(images, output_paths(args, len(images)))):
            save_png(upscale(image, args.upscale), path, dict(parameters, index=i))
            print(path)
            if history is not None:
                steps_path = path.with_name(f"{path.stem}-steps.png")
                save_png(upscale(pipe.decode_history(history, rows[i]), args.upscale), steps_path,
                         dict(parameters, index=i))
                print(steps_path)
            if args.show_edit and args.init_image is not None:
                edit_path = path.with_name(f"{path.stem}-edit.png")
                strip = edit_strip(canvas, keep[0], image, pipe.model.config.grid)
                save_png(upscale(strip, args.upscale), edit_path, dict(parameters, index=i))
                print(edit_path)
        print(f"sampled {len(images)} image(s) in {sampled - loaded:.3f} s "
              f"({args.steps} rounds, {device.type}); loading took {loaded - started:.3f} s", file=sys.stderr)
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
