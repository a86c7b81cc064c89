"""Evaluation: FID with a from-scratch InceptionV3, the zero-shot COCO protocol, and shapes accuracy.

The paper's quality measure (Section 4) is zero-shot FID on 30k MS-COCO
validation captions: 16 candidates per caption, re-ranked by CLIP, the best one
kept. This file holds every piece of that protocol:

    InceptionV3 / load_inception(path)   the TensorFlow FID Inception (2048-d pool features; inception.py)
    frechet_distance(mu1, s1, mu2, s2)   FID in float64, robust to singular covariances
    image_stats / save_stats / load_stats    mean and covariance of images, cached as .npz
    coco_captions / read_captions        the sampled caption list of the protocol
    generate_folder(...)                 resumable generation, one PNG per caption
    shapes_accuracy(...)                 the shapes world's faithfulness (SHAPES.md)

Command line (the zero-shot COCO protocol is the first three, in any order of the first two):
    python eval_fid.py reference --captions captions_val2014.json --images val2014/ --out coco30k.npz --inception W
    python eval_fid.py generate --checkpoint DIR --captions captions_val2014.json --out samples/
    python eval_fid.py fid samples/ coco30k.npz --inception W --json fid.json
    python eval_fid.py stats DIR OUT.npz --inception W
    python eval_fid.py shapes --checkpoint checkpoints/shapes/emage

`generate` draws as sample.py does (sample.DEFAULT_TEMPERATURE, DEFAULT_GUIDANCE, the best of
DEFAULT_CANDIDATES by the generator's self-score); `--rerank clip --clip CKPT --candidates 16` is
the paper's ranking. On real data the self-score hides random halves of the tokens
(extensions.self_score's random_sets, 4 per candidate): `python eval_fid.py generate --help`
says what that costs and what is known of it. W is pt_inception-2015-12-05-6726825d.pth (its
SHA-256 is checked).
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import random
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin

import clip_image
import clip_text
import extensions
import files
import sample
import shapes
import vqgan
from inception import INCEPTION_SHA256, INPUT_SIZE, FIDError, InceptionV3, load_inception, resize_bilinear_tf1


PROJECT_MODULES = ("__main__", "eval_fid", "inception", "clip_text", "clip_image", "emage", "extensions", "vqgan",
                   "shapes", "data", "files", "sample")


# ---------------------------------------------------------------------------
# Fréchet distance and statistics
# ---------------------------------------------------------------------------

def _clip_noise(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with the rounding noise set to 0 (what `matrix_rank` counts as zero).

    A covariance of n < d samples has d - n + 1 zero eigenvalues that come out
    of `eigh` as +-1e-16 * max; their square roots (1e-8 * sqrt(max) each) would
    add up to a visible error, so values below the rank tolerance count as 0.
    """
    tol = max(eigenvalues.max(initial=0.0), 0.0) * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(_clip_noise(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, progress: bool = False) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1 S2,
    which equal those of A S2 A with A = S1^(1/2) (AB and BA share eigenvalues).
    A S2 A is symmetric positive semi-definite, so `eigvalsh` is exact where
    `scipy.linalg.sqrtm(S1 @ S2)` of a non-symmetric, possibly singular product
    returns complex parts or NaN depending on the SciPy version. With `progress` a bar on
    stderr follows the two eigendecompositions (2048 x 2048: seconds to a minute on a CPU).
    """
    from tqdm import tqdm

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"statistics do not match: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and "
                       f"{sigma2.shape}; compute both with the same feature extractor")
    with tqdm(total=2, desc=f"matrix square root ({d}x{d}, float64)", unit="eigh", disable=not progress) as bar:
        a = _sqrt_psd(sigma1)  # the first eigendecomposition
        bar.update()
        inner = a @ sigma2 @ a  # (D, D), symmetric PSD
        tr_covmean = np.sqrt(_clip_noise(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()  # the second
        bar.update()
    diff = mu1 - mu2
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return float(max(fid, 0.0))  # >= 0 exactly; only rounding can go below


class RunningStats:
    """Mean and covariance accumulated batch by batch in float64 (memory O(D^2), any number of samples).

    Sums are taken around the first batch's mean, which keeps the sum of
    outer products well conditioned when the features sit far from zero.
    """

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, features) -> None:
        x = np.asarray(features, dtype=np.float64)  # (B, D)
        if not np.isfinite(x).all():
            raise FIDError("the feature extractor produced non-finite values: check the weights and images")
        if self.shift is None:
            self.shift = x.mean(0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += x.shape[0]
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def result(self, allow_few: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), sigma with the unbiased 1/(n - 1) as `np.cov`."""
        d = 0 if self.shift is None else self.shift.shape[0]
        if self.n < 2:
            raise FIDError(f"{self.n} image(s): a covariance needs at least 2 (FID wants thousands)")
        if self.n <= d and not allow_few:
            raise FIDError(f"only {self.n} images for {d}-d features: the covariance is singular and FID is "
                           f"strongly biased; use more than {d} images (pass --allow-few to compute it anyway)")
        mean = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean + self.shift, (sigma + sigma.T) / 2


def save_stats(path, mu, sigma, n: int, sha256: str = "") -> None:
    """Write the statistics cache (.npz: mu, sigma, n, inception_sha256) atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(n), inception_sha256=np.str_(sha256))

    files.atomic_write(path, write)


MAX_STATS_BYTES = 64 << 20  # sigma of 2,048 Inception features in float64 is 32 MiB


def load_stats(path) -> dict:
    """{'mu', 'sigma', 'n', 'inception_sha256'} from a .npz cache (pytorch-fid's mu/sigma files work too)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            members = data.zip.infolist()  # sizes from the zip directory, before anything is inflated
            if len(members) > 16 or any(m.file_size > MAX_STATS_BYTES for m in members):
                raise ValueError(f"more than 16 arrays, or one over {MAX_STATS_BYTES >> 20} MiB unpacked")
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise FIDError(f"cannot read statistics from {path}: {error}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise FIDError(f"{path} has no 'mu' and 'sigma' arrays: write it with `python eval_fid.py stats`")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (mu.dtype.kind in "fi" and sigma.dtype.kind in "fi"):
        raise FIDError(f"{path}: mu must be a vector of d numbers and sigma d x d, got shapes {mu.shape} and "
                       f"{sigma.shape}; write it with `python eval_fid.py stats`")
    return {"mu": arrays["mu"].astype(np.float64), "sigma": arrays["sigma"].astype(np.float64),
            "n": int(arrays["n"]) if "n" in arrays else None,
            "inception_sha256": str(arrays.get("inception_sha256", ""))}


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder} is not a folder of images (or a .npz statistics file)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FIDError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, read with files.open_image (bounded; an unreadable file is a FIDError)."""
    try:
        return np.array(files.open_image(path))
    except files.FileError as error:
        raise FIDError(f"cannot read image: {error}") from None


class _InceptionInputs(torch.utils.data.Dataset):
    """Images of any size, each resized to 299x299 as the graph does (float, [0, 255])."""

    def __init__(self, items: list, load: Callable = read_rgb):
        self.items, self.load = items, load  # items: paths (read by `load`) or (H, W, 3) uint8 arrays

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        rgb = item if isinstance(item, np.ndarray) else self.load(item)
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        return x[0]  # (3, 299, 299)


@torch.no_grad()
def image_stats(model: InceptionV3, images: list, batch_size: int = 50, device="cpu", workers: int = 0,
                allow_few: bool = False, progress: bool = True, load: Callable = read_rgb, desc: str = "inception"):
    """Mean (D,) and covariance (D, D) of the pool_3 features of `images` (paths or (H, W, 3) uint8 arrays)."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(_InceptionInputs(images, load), batch_size=batch_size, num_workers=workers)
    stats = RunningStats()
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        stats.update(model(batch.to(device)).cpu().numpy())
    return stats.result(allow_few)


def stats_of(source, model: InceptionV3, **kw) -> dict:
    """Statistics of a folder of images, or read from a .npz cache."""
    source = Path(source)
    if source.suffix == ".npz":
        stats = load_stats(source)
        if stats["inception_sha256"] and stats["inception_sha256"] != model.sha256:
            raise FIDError(f"{source} was computed with Inception weights {stats['inception_sha256'][:12]}..., "
                           f"not these ({model.sha256[:12]}...): recompute it with `python eval_fid.py stats`")
        return stats
    paths = list_images(source)
    mu, sigma = image_stats(model, paths, desc=f"inception {source.name}", **kw)
    return {"mu": mu, "sigma": sigma, "n": len(paths), "inception_sha256": model.sha256}


# ---------------------------------------------------------------------------
# The COCO protocol: captions, reference images, generation
# ---------------------------------------------------------------------------

def _clean(caption: str) -> str:
    return " ".join(caption.split())


def coco_captions(path, num: int, seed: int = 0) -> list[dict]:
    """`num` images drawn at random from a COCO captions file, one of each image's captions drawn at random.

    Returns [{'caption', 'image_id', 'file_name'}] in drawing order. The paper
    samples 30k validation images; the same (path, num, seed) gives the same list
    for `generate` and `reference`.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        annotations, images = data["annotations"], data["images"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FIDError(f"{path} is not a COCO captions file (captions_val2014.json): {error}") from None
    names = {image["id"]: image["file_name"] for image in images}
    by_image: dict[int, list] = {}
    for ann in sorted(annotations, key=lambda a: a["id"]):
        if _clean(ann["caption"]):
            by_image.setdefault(ann["image_id"], []).append(_clean(ann["caption"]))
    ids = sorted(by_image)
    if num > len(ids):
        raise FIDError(f"{path} has captions for {len(ids)} images, fewer than --num-captions {num}")
    rng = random.Random(seed)
    chosen = rng.sample(ids, num)
    return [{"caption": rng.choice(by_image[i]), "image_id": i, "file_name": names.get(i, "")} for i in chosen]


def read_captions(path, num: int, seed: int = 0) -> list[dict]:
    """Captions from a COCO captions .json (sampled as `coco_captions`), or a text file, one per line (the first `num`)."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"captions file {path} not found")
    if path.suffix == ".json":
        return coco_captions(path, num, seed)
    try:
        lines = [_clean(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise FIDError(f"{path} is not UTF-8 text: save the captions as UTF-8, one per line") from None
    captions = [{"caption": line} for line in lines if line]
    if not captions:
        raise FIDError(f"{path} holds no captions (one per line expected)")
    return captions[:num]


def center_crop_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """files.center_crop_resize on an (H, W, 3) uint8 array: the largest centred square, resized to
    size x size with PIL's bicubic filter (antialiased)."""
    return np.array(files.center_crop_resize(Image.fromarray(np.asarray(rgb)), size))


def _read_cropped(path: Path, size: int) -> np.ndarray:
    return center_crop_resize(read_rgb(path), size)


def _write_png(path: Path, rgb: np.ndarray, text: dict) -> None:
    """PNG with text chunks (the caption travels with the image), written atomically."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, str(value))
    files.atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG", pnginfo=info))


def _load_generator(checkpoint, device, vqgan_dir=None):
    """(model, tokenizer, vqgan, info) from an Emage checkpoint directory, loaded as sample.py loads it
    (sample.Pipeline.load: extensions.load_checkpoint, the vocabulary it carries, the VQGAN it names
    relative to itself or `vqgan_dir` for a moved checkpoint, the codebook sizes checked)."""
    pipe = sample.Pipeline.load(checkpoint, device, vqgan_dir=vqgan_dir)
    return pipe.model.eval(), pipe.tokenizer, pipe.vqgan.eval(), pipe.info


@torch.no_grad()
def generate_images(model, tokenizer, vq, captions: list[str], generator: torch.Generator,
                    num_candidates: int = 1, **generate_kw) -> np.ndarray:
    """(B * num_candidates, H, W, 3) uint8 images, candidates of one caption adjacent."""
    return generate_scored(model, tokenizer, vq, captions, generator, num_candidates, score=False, **generate_kw)[0]


@torch.no_grad()
def generate_scored(model, tokenizer, vq, captions: list[str], generator: torch.Generator,
                    num_candidates: int = 1, score: bool = True, contrast: bool = False,
                    **generate_kw) -> tuple[np.ndarray, np.ndarray | None]:
    """generate_images and each candidate's extensions.self_score (B * C,), or None with one
    candidate (or score=False).

    With contrast=True a shapes caption with a relation is scored against its mirror
    (shapes.contrast_for), as sample.py --contrast mirror does; by default against nothing.
    The score's random hide-sets (codes without colours) come from `generator` after the images.
    """
    device = next(model.parameters()).device
    tokenize = lambda texts: tokenizer(texts, context_length=model.config.text.context_length).to(device)  # noqa: E731
    text = tokenize(captions)  # (B, L)
    tokens = model.generate(text, num_candidates=num_candidates, generator=generator, **generate_kw)  # (B * C, n)
    scores = None
    if score and num_candidates > 1:
        contrasts = [shapes.contrast_for(caption) if contrast else None for caption in captions]
        against = None
        if any(contrasts):  # a caption without a contrast is contrasted with itself: adds 0
            against = tokenize([c or caption for c, caption in zip(contrasts, captions)])
            against = against.repeat_interleave(num_candidates, 0)  # (B * C, L)
        rows = text.repeat_interleave(num_candidates, 0)  # (B * C, L)
        scores = extensions.self_score(model, rows, tokens, generator=generator, contrast_tokens=against)
        scores = scores.float().cpu().numpy()
    h, w = model.config.grid
    return files.to_uint8(vq.decode(tokens.view(-1, h, w))), scores


Reranker = Callable[[np.ndarray, str], np.ndarray]  # (C, H, W, 3) uint8 candidates, caption -> (C,) scores


def generate_folder(checkpoint, items: list[dict], out_dir, *, candidates: int = 1, batch_size: int = 16,
                    seed: int = 0, device="cpu", rerank: Reranker | None = None, progress: bool = True,
                    vqgan_dir=None, **generate_kw) -> int:
    """One PNG per caption in `out_dir` (`00000.png`, ...); returns how many were written.

    Resumable: images already present are skipped. Captions are processed in
    fixed batches [k*B, (k+1)*B), batch k with a generator seeded by (seed, k),
    so an interrupted run resumed with the same --batch-size writes the same
    images. With `candidates` > 1 the best candidate of each caption is kept: by
    `rerank` (CLIP, the paper's protocol) when given, else by extensions.self_score
    as sample.py ranks them (without a contrast caption; see SELF_SCORE_NOTE).
    `vqgan_dir` replaces the VQGAN the checkpoint names (a moved checkpoint).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "candidates": candidates, "seed": seed,
                "batch_size": batch_size, **{k: v for k, v in generate_kw.items() if v is not None}}
    if candidates > 1:
        settings["rerank"] = "self" if rerank is None else "clip"
    if vqgan_dir is not None:
        settings["vqgan"] = str(Path(vqgan_dir).resolve())
    manifest = {"settings": settings, "captions": [item["caption"] for item in items]}
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        if previous != manifest:
            raise FIDError(f"{out_dir} holds images of another caption list or settings (see its manifest.json): "
                           "choose a new --out folder, or rerun with the same arguments to resume")
    model, tokenizer, vq, info = _load_generator(checkpoint, device, vqgan_dir)  # a failure leaves no manifest behind
    if not manifest_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(manifest_path, manifest)

    width = max(5, len(str(len(items) - 1)))
    paths = [out_dir / f"{i:0{width}d}.png" for i in range(len(items))]
    batches = [range(k, min(k + batch_size, len(items))) for k in range(0, len(items), batch_size)]
    todo = [(b, rows) for b, rows in enumerate(batches) if not all(paths[i].exists() for i in rows)]
    written = 0
    for b, rows in tqdm(todo, desc="generate", unit="batch", disable=not progress):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        captions = [items[i]["caption"] for i in rows]
        images, own = generate_scored(model, tokenizer, vq, captions, generator, num_candidates=candidates,
                                      score=rerank is None, **generate_kw)  # (len(rows) * C, H, W, 3), (len(rows) * C,)
        images = images.reshape(len(rows), candidates, *images.shape[1:])
        for j, i in enumerate(rows):
            if paths[i].exists():
                continue
            if candidates == 1:
                best = 0
            elif rerank is None:  # the self-score, as sample.py ranks
                best = int(np.argmax(own[j * candidates:(j + 1) * candidates]))
            else:
                best = int(np.argmax(rerank(images[j], captions[j])))
            text = {"caption": captions[j], "index": i, "seed": seed, "checkpoint_step": info.get("step", "")}
            if "image_id" in items[i]:
                text["coco_image_id"] = items[i]["image_id"]
            _write_png(paths[i], images[j, best], text)
            written += 1
    return written


def clip_reranker(path, device, bpe=None, trust_torchscript: bool = False) -> Reranker:
    """The CLIP re-ranker of the paper's protocol, provided by `clip_image.load_reranker`. The
    captions' vocabulary: `bpe` (a file or a folder, clip_text.find_bpe), else the one the
    checkpoint folder ships (a Hugging Face folder's merges.txt), else CLIP's own file."""
    return clip_image.load_reranker(path, device=device, bpe=bpe or clip_text.vocabulary_beside(path),
                                    trust_torchscript=trust_torchscript)


RANDOM_SETS = inspect.signature(extensions.self_score).parameters["random_sets"].default
SELF_SCORE_NOTE = (
    "The self-score (extensions.self_score, sample.py's default re-ranker) asks the generator how well it "
    "predicts each part of a candidate from the rest and the caption. With the shapes tokenizer a part is one "
    "object (every token of one colour). With any other VQGAN, real data included, it hides a random half of the "
    f"tokens, random_sets={RANDOM_SETS} times per candidate, and sums the log-probabilities of the hidden tokens: a "
    f"pseudo-likelihood costing {RANDOM_SETS} decoder passes per candidate (16 guided rounds cost 32), drawn from "
    "the seeded generator, so the choice is reproducible. Its gain was measured on the shapes world only (1 -> 8 "
    "candidates: seen accuracy 0.738 -> 0.984); on real data it is unmeasured, and the paper's protocol ranks by "
    "CLIP instead (--clip CKPT)."
)


# ---------------------------------------------------------------------------
# Shapes-world accuracy
# ---------------------------------------------------------------------------

def shapes_accuracy(checkpoint, captions: list[str] | None = None, seeds: int = 2, batch_size: int = 64,
                    device="cpu", save_dir=None, progress: bool = True, candidates: int = 1, contrast: bool = False,
                    first_seed: int = 0, **generate_kw) -> dict:
    """Fraction of (caption, seed) pairs whose generated image passes `shapes.score`, seen and novel apart.

    Returns shapes.accuracy_report(...) plus 'failures' (shapes.failure_report: per split, the
    fraction failing by each kind of shapes.FAILURE_KINDS) and 'results':
    [{'caption', 'seed', 'passed', 'failure', 'any_passed'}].
    Seed s (first_seed .. first_seed + seeds - 1) runs the captions in batches with a generator
    seeded by (s, batch index).
    With `candidates` > 1 each pair keeps the best of its candidates by `extensions.self_score`,
    as sample.py does (against the mirrored caption with contrast=True); 'any_passed' says
    whether any candidate would have passed.
    """
    from tqdm import tqdm

    captions = shapes.eval_captions() if captions is None else captions
    model, tokenizer, vq, info = _load_generator(checkpoint, device)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    results = []
    jobs = [(s, k) for s in range(first_seed, first_seed + seeds) for k in range(0, len(captions), batch_size)]
    for s, k in tqdm(jobs, desc="shapes", unit="batch", disable=not progress):
        generator = torch.Generator(device=device).manual_seed(s * 1_000_003 + k // batch_size)
        batch = captions[k:k + batch_size]
        images, scores = generate_scored(model, tokenizer, vq, batch, generator, num_candidates=candidates,
                                         contrast=contrast, **generate_kw)  # (B * C, H, W, 3), (B * C,)
        images = images.reshape(len(batch), candidates, *images.shape[1:])
        best = scores.reshape(len(batch), candidates).argmax(1).tolist() if candidates > 1 else [0] * len(batch)
        for j, (caption, group) in enumerate(zip(batch, images)):
            rgb = group[best[j]]
            result = shapes.score_details(Image.fromarray(rgb), caption)
            others = (shapes.score(Image.fromarray(im), caption) for i, im in enumerate(group) if i != best[j])
            results.append({"caption": caption, "seed": s, "passed": result.passed, "failure": result.kind,
                            "any_passed": result.passed or any(others)})
            if save_dir is not None:
                _write_png(Path(save_dir) / f"s{s}_{k + j:04d}.png", rgb, {"caption": caption, "seed": s})
    report = shapes.accuracy_report([(r["caption"], r["passed"]) for r in results])
    report["failures"] = shapes.failure_report([(r["caption"], r["failure"]) for r in results])
    report["any_of_candidates"] = shapes.accuracy_report([(r["caption"], r["any_passed"]) for r in results])
    report["results"] = results
    report["settings"] = {"checkpoint": str(checkpoint), "variant": info.get("variant"), "step": info.get("step"),
                          "seeds": seeds, "first_seed": first_seed, "candidates": candidates, "contrast": contrast,
                          **{k: v for k, v in generate_kw.items() if v is not None}}
    return report


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, ValueError) as error:
        raise FIDError(f"device {name!r} is not usable here ({str(error).splitlines()[0]}): try --device cpu") from None
    return name


def _inception(args, device) -> InceptionV3:
    if str(device).startswith("cuda"):
        # TF32 convolutions (cuDNN's default on Ampere and later) round inputs to 10-bit
        # mantissas; FID is defined in full float32, and published numbers assume it.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = load_inception(args.inception, check_hash=not args.no_hash_check).to(device)
    verdict = ("the published FID weights" if model.sha256 == INCEPTION_SHA256 else
               "NOT the published FID weights: values are not comparable with published FIDs")
    print(f"inception weights {args.inception} sha256 {model.sha256} ({verdict})", file=sys.stderr)
    return model


def _stats_kw(args, device) -> dict:
    return {"batch_size": args.batch_size, "device": device, "workers": args.workers, "allow_few": args.allow_few}


def _check_source(path: Path) -> None:
    if not (path.is_dir() or (path.suffix == ".npz" and path.is_file())):
        raise FIDError(f"{path} is not a folder of images or a .npz statistics file")


def cmd_fid(args) -> None:
    _check_source(args.a)
    _check_source(args.b)
    device = _device(args.device)
    model = _inception(args, device)
    a = stats_of(args.a, model, **_stats_kw(args, device))
    b = stats_of(args.b, model, **_stats_kw(args, device))
    d = a["mu"].shape[0]
    print(f"Fréchet distance: two eigendecompositions of {d}x{d} float64 matrices on the CPU "
          "(seconds to a minute)", file=sys.stderr, flush=True)
    fid = frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"], progress=True)
    print(f"FID {fid:.4f}  ({args.a}: {a['n']} images, {args.b}: {b['n']} images)")
    if args.json:
        files.write_json(args.json, {"fid": fid, "a": str(args.a), "n_a": a["n"], "b": str(args.b), "n_b": b["n"],
                                "inception_sha256": model.sha256})


def cmd_stats(args) -> None:
    device = _device(args.device)
    model = _inception(args, device)
    paths = list_images(args.folder)
    mu, sigma = image_stats(model, paths, **_stats_kw(args, device))
    save_stats(args.out, mu, sigma, len(paths), model.sha256)
    print(f"wrote {args.out} ({len(paths)} images)")


def cmd_reference(args) -> None:
    device = _device(args.device)
    model = _inception(args, device)
    items = coco_captions(args.captions, args.num_captions, args.seed)
    paths = [Path(args.images) / item["file_name"] for item in items]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FIDError(f"{len(missing)} of {len(paths)} images are missing from {args.images} (first: {missing[0]}): "
                       "pass the folder of the COCO images that match --captions")
    load = functools.partial(_read_cropped, size=args.size)
    mu, sigma = image_stats(model, paths, load=load, **_stats_kw(args, device))
    save_stats(args.out, mu, sigma, len(paths), model.sha256)
    print(f"wrote {args.out} ({len(paths)} COCO images, centre-cropped to {args.size}x{args.size})")


def cmd_generate(args) -> None:
    device = _device(args.device)
    items = read_captions(args.captions, args.num_captions, args.seed)
    rerank = args.rerank or ("clip" if args.clip else "self")
    if rerank == "clip" and args.clip is None:
        raise FIDError("--rerank clip needs a CLIP checkpoint: pass --clip CKPT (the paper ranks 16 candidates by CLIP)")
    if rerank == "self" and args.clip is not None:
        raise FIDError("--clip is read only with --rerank clip; leave it out to rank by the self-score")
    if args.bpe is not None and rerank != "clip":
        raise FIDError("--bpe is the vocabulary of the --clip re-ranker; the generator's own travels with its checkpoint")
    scorer = None
    if rerank == "clip" and args.candidates > 1:
        print(f"loading the CLIP re-ranker {args.clip}", file=sys.stderr, flush=True)
        scorer = clip_reranker(args.clip, device, bpe=args.bpe, trust_torchscript=args.trust_torchscript)
    print(f"{len(items)} captions x {args.candidates} candidate(s)"
          + (f", the best by the {rerank} score" if args.candidates > 1 else "")
          + f"; temperature {args.temperature}, guidance {args.guidance}, {args.steps} rounds", file=sys.stderr)
    written = generate_folder(args.checkpoint, items, args.out, candidates=args.candidates,
                              batch_size=args.batch_size, seed=args.seed, device=device, rerank=scorer,
                              vqgan_dir=args.vqgan, steps=args.steps, algorithm=args.algorithm,
                              schedule=args.schedule, temperature=args.temperature, guidance_scale=args.guidance,
                              choice_temperature=args.choice_temperature)
    print(f"wrote {written} images to {args.out} ({len(items) - written} were already there)")


def cmd_shapes(args) -> None:
    device = _device(args.device)
    captions = shapes.eval_captions()[:args.limit]
    report = shapes_accuracy(args.checkpoint, captions, seeds=args.seeds, first_seed=args.first_seed,
                             batch_size=args.batch_size,
                             device=device, save_dir=args.save, candidates=args.candidates, contrast=args.contrast,
                             steps=args.steps, algorithm=args.algorithm,
                             schedule=args.schedule, temperature=args.temperature,
                             guidance_scale=args.guidance, choice_temperature=args.choice_temperature)
    summary = {k: report[k] for k in ("seen", "novel", "all")}
    print(f"shapes accuracy ({len(captions)} captions x {args.seeds} seeds, T={args.steps}): "
          + shapes.format_report(summary))
    for split, kinds in report["failures"].items():
        print(f"  {split} failures: " + ", ".join(f"{kind} {share:.3f}" for kind, share in kinds.items()))
    if args.candidates > 1:
        print(f"  any of the {args.candidates} candidates passes: "
              + shapes.format_report({k: report["any_of_candidates"][k] for k in ("seen", "novel", "all")}))
    if args.json:
        files.write_json(args.json, report)


def check_args(args) -> None:
    """Numbers in range (NaN and infinity refused) and outputs that would replace a file only with
    --overwrite, before any work."""
    for name in ("temperature", "guidance", "choice_temperature"):
        if getattr(args, name, None) is not None:
            files.check_float(f"--{name.replace('_', '-')}", getattr(args, name), 0.0, 1e3, FIDError)
    for name in ("seed", "first_seed"):
        if getattr(args, name, None) is not None:
            files.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 0, 2**63 - 1, FIDError)
    for name, high in (("num_captions", 10**7), ("seeds", 1024), ("limit", 10**7), ("candidates", 256),
                       ("batch_size", 4096), ("steps", 1024), ("size", 8192)):
        if getattr(args, name, None) is not None:
            files.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1, high, FIDError)
    if getattr(args, "workers", None) is not None:
        files.check_int("--workers", args.workers, 0, 256, FIDError)
    overwrite = getattr(args, "overwrite", False)
    for name, flag in (("json", "--json"), ("out", "--out")):
        path = getattr(args, name, None)
        if path is not None and args.command in ("fid", "stats", "reference", "shapes"):
            files.check_output(path, overwrite, "file", flag if args.command != "stats" else "OUT")
    if getattr(args, "save", None) is not None:
        files.check_output(args.save, overwrite, "folder", "--save")


def _user_error(error: Exception) -> bool:
    """OS errors, and the project's own error types (each module's `<Module>Error(ValueError)`)."""
    return isinstance(error, OSError) or type(error).__module__ in PROJECT_MODULES


def _algorithm(text: str):
    if text not in ("1", "3", "full", "ar"):
        raise argparse.ArgumentTypeError(f"must be 1, 3, full or ar, got {text!r}")
    return int(text) if text.isdigit() else text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_inception_args(p) -> None:
    p.add_argument("--inception", type=Path, required=True,
                   help="pt_inception-2015-12-05-6726825d.pth (from the pytorch-fid or torch-fidelity release)")
    p.add_argument("--no-hash-check", action="store_true", help="use weights whose SHA-256 is not the published one")
    p.add_argument("--batch-size", type=_positive, default=50, help="images per Inception batch")
    p.add_argument("--workers", type=int, default=0, help="image-loading worker processes")
    p.add_argument("--allow-few", action="store_true", help="compute even with fewer images than 2048 dimensions")
    p.add_argument("--device", default=None, help="torch device; unset: cuda if available, else cpu")


def _add_sampling_args(p, batch_size: int, temperature: float, guidance: float, why: str = "") -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="Emage checkpoint directory")
    p.add_argument("--steps", type=_positive, default=16, help="decoding rounds T")
    p.add_argument("--algorithm", type=_algorithm, default=None,
                   help="1, 3, full or ar; unset: the one of the variant the model was trained as")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "linear"), help="inference mask schedule")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature, 0 = argmax " + why)
    p.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float, default=guidance,
                   help="classifier-free guidance scale, 1 = off; --guidance-scale is the same flag " + why)
    p.add_argument("--choice-temperature", type=float, default=4.5,
                   help="scale of the Gumbel noise on the confidences that choose which tokens to commit")
    p.add_argument("--batch-size", type=_positive, default=batch_size, help="captions per batch")
    p.add_argument("--device", default=None, help="torch device; unset: cuda if available, else cpu")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once: not after a help that states it, nor an unset (None) or off one."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv=None) -> int:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[-2:]))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fid", help="FID between two image folders or .npz statistics", formatter_class=fmt)
    p.add_argument("a", type=Path, help="folder of images or .npz statistics")
    p.add_argument("b", type=Path, help="folder of images or .npz statistics")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    _add_inception_args(p)
    p.set_defaults(run=cmd_fid)

    p = sub.add_parser("stats", help="cache a folder's Inception statistics as .npz", formatter_class=fmt)
    p.add_argument("folder", type=Path, help="folder of images")
    p.add_argument("out", type=Path, help=".npz to write (mu, sigma, n, inception_sha256)")
    _add_inception_args(p)
    p.set_defaults(run=cmd_stats)

    p = sub.add_parser("reference", help="statistics of the COCO images the protocol samples", formatter_class=fmt)
    p.add_argument("--captions", type=Path, required=True, help="COCO captions_val2014.json")
    p.add_argument("--images", type=Path, required=True, help="folder of the COCO val2014 images")
    p.add_argument("--out", type=Path, required=True, help=".npz to write")
    p.add_argument("--num-captions", type=_positive, default=30000, help="images to sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (use the same for generate)")
    p.add_argument("--size", type=_positive, default=256, help="centre crop resized to this side (the generator's)")
    _add_inception_args(p)
    p.set_defaults(run=cmd_reference)

    p = sub.add_parser("generate", help="one PNG per caption, resumable", formatter_class=fmt,
                       description="One PNG per caption, drawn as sample.py draws it: the same temperature, guidance "
                                   "and number of candidates by default, the best candidate kept by the self-score "
                                   "(--rerank self) or by CLIP (--rerank clip --clip CKPT, the paper's protocol: "
                                   "--candidates 16). " + SELF_SCORE_NOTE)
    _add_sampling_args(p, batch_size=16, temperature=sample.DEFAULT_TEMPERATURE, guidance=sample.DEFAULT_GUIDANCE,
                       why="(default: %(default)s, sample.py's)")
    p.add_argument("--vqgan", type=Path, default=None,
                   help="VQGAN folder to decode with (default: the one the checkpoint names, relative to itself; "
                        "pass it for a moved checkpoint, as to sample.py)")
    p.add_argument("--captions", type=Path, required=True, help="COCO captions .json or text file, one per line")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--num-captions", type=_positive, default=30000,
                   help="captions to use (COCO: images sampled with --seed; text: the first N)")
    p.add_argument("--candidates", type=_positive, default=sample.DEFAULT_CANDIDATES,
                   help="images drawn per caption, the best kept; 1 draws one (default: %(default)s, sample.py's)")
    p.add_argument("--rerank", choices=("self", "clip"), default=None,
                   help="how candidates are ranked: the generator's self-score (random halves hidden on real data, "
                        "see above) or CLIP image-text similarity; unset: clip when --clip is given, else self")
    p.add_argument("--clip", type=Path, default=None,
                   help="whole CLIP checkpoint for --rerank clip (native, a Hugging Face CLIPModel folder, or OpenAI's "
                        ".pt with --trust-torchscript)")
    p.add_argument("--bpe", default=None,
                   help=f"the --clip re-ranker's caption vocabulary: {clip_text.BPE_FILE_NAME}, a Hugging Face CLIP "
                        f"folder (its {clip_text.HF_MERGES}) or a folder holding either (default: the --clip folder's "
                        f"own, else ${clip_text.BPE_ENV}, else the file open_clip ships)")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="let --clip read OpenAI's TorchScript release (ViT-L-14.pt), which can run code")
    p.add_argument("--seed", type=int, default=0, help="seed of caption sampling and generation")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("shapes", help="accuracy on the shapes evaluation captions", formatter_class=fmt)
    # The raw model by default (temperature 1, no guidance, one candidate): the measurements in
    # docs/results.md were taken so and name only the flags they change.
    _add_sampling_args(p, batch_size=64, temperature=1.0, guidance=1.0,
                       why=f"(default: %(default)s, the raw model as docs/results.md measures it; sample.py draws at "
                           f"--temperature {sample.DEFAULT_TEMPERATURE} --guidance {sample.DEFAULT_GUIDANCE} "
                           f"--candidates {sample.DEFAULT_CANDIDATES})")
    p.add_argument("--seeds", type=_positive, default=2, help="images per caption (seeds S..S+N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed S (fresh draws for a setting chosen on 0..N-1)")
    p.add_argument("--limit", type=_positive, default=None, help="use only the first N evaluation captions")
    p.add_argument("--candidates", type=_positive, default=1,
                   help="candidates per (caption, seed); the best by extensions.self_score is scored (sample.py's re-ranking)")
    p.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=False,
                   help="score each candidate against the mirrored caption, as sample.py --contrast mirror does")
    p.add_argument("--json", type=Path, default=None, help="write the report (with per-image results) here")
    p.add_argument("--save", type=Path, default=None, help="also write the generated PNGs here")
    p.set_defaults(run=cmd_shapes)

    for name in ("fid", "stats", "reference", "shapes"):
        sub.choices[name].add_argument("--overwrite", action="store_true",
                                       help="replace an existing output file (never replaced otherwise)")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        args.run(args)
    except (ValueError, OSError) as error:
        if not _user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
