"""Training data for Emage: the shapes stream, image-caption sources, and token shards.

Training reads images as VQGAN codes, never as pixels: images are tokenised once
(`prepare`) into shards that the training loop memory-maps. DESIGN.md: images ->
vqgan encoder (once, here) -> token shards -> train.py.

    shapes_example(seed, index)          the index-th (caption, image) of the shapes world
    ShapesSource / FolderSource / TarSource   image-caption sources (open_source picks one)
    prepare(source, vqgan, out_dir)      pre-tokenise a source into token shards
    write_token_shards(out_dir, captions, codes, ...)   the same format from codes made elsewhere
    TokenShards(dir)                     memory-mapped reader: dataset[i] -> (caption, codes)
    batch_indices(step, batch_size, n, seed)   the global batch of a training step

A token-shard directory holds, for shard k:

    tokens-0000k.npy      uint16 [m, h * w]: VQGAN codes of m images, row-major over the grid
    captions-0000k.jsonl  m lines {"key": ..., "caption": ...}, same order
    shard-0000k.json      {"count": m, "skipped": {...}}: written last, marks the shard complete
    meta.json             grid, codebook size, image size, VQGAN, source; written when all are done
    prepare.json          what `prepare` was asked for: a resumed prepare must ask for the same

Shard k holds the usable examples among source items [k * S, (k + 1) * S), S = shard
size, so an interrupted `prepare` resumes at the first incomplete shard, and ranks of
a `torchrun` prepare split the shards between them (k modulo world size).

Command line:
    python data.py prepare --source shapes --examples 30000 --out data/shapes-tokens
    python data.py prepare --source DIR_OR_TAR --vqgan CKPT --out DIR
    python data.py show DIR                   counts and a few examples of a shard directory
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import shapes
import vqgan
from files import (MAX_IMAGE_BYTES, FileError, atomic_write, center_crop_resize, check_int, is_whole, open_image, read_json,
                   shown, write_json)

FORMAT = "emage-token-shards"  # meta.json "format"; bump VERSION when the layout changes
VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # what folder and tar sources read
DEFAULT_VQGAN = Path(__file__).resolve().parent / "checkpoints" / "shapes" / "patterns"
MAX_CAPTION_BYTES = 64 * 1024  # a caption file or tar member larger than this counts as no caption (never read)
MAX_GRID_SIDE = 1024  # token grids of a shard directory (emage.MAX_GRID_SIDE)
MAX_SHARDS = 10**6
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)  # what reading a damaged (or compressed) tar raises


class DataError(ValueError):
    """A user error in this module: a missing source, a mismatched shard directory, ..."""


# ----------------------------------------------------------------------------------------
# The shapes world as a stream
# ----------------------------------------------------------------------------------------


def shapes_example(seed: int, index: int, align: int = 1, jitter: bool = True):
    """The `index`-th example of the shapes stream with this seed: (caption, 64x64 PIL image).

    align > 1 renders it with every object's corner on multiples of `align` px, and
    jitter=False without size jitter (shapes.render); the caption stays the same.

    Each example has its own random.Random, seeded from (seed, index), so any example can
    be produced without the ones before it (resuming, splitting between ranks), and
    different indices never share a random stream. Captions come from the "train" split
    of the grammar: no held-out colour-shape pair and no two-object evaluation caption
    (shapes.sample_caption); the `is_novel` check below makes the first guarantee local.
    """
    rng = random.Random(seed * 2**40 + index)
    while True:
        caption = shapes.sample_caption(rng, "train")
        if not shapes.is_novel(caption):
            break
    return caption, shapes.render(caption, rng.randrange(2**31), align, jitter)


class ShapesStream:
    """An infinite, seeded shapes stream: yields (caption, image) for indices rank, rank + world, ...

    Ranks with the same seed and world size read disjoint examples of one global stream.
    """

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start

    def __iter__(self):
        index = self.start * self.world_size + self.rank
        while True:
            yield shapes_example(self.seed, index)
            index += self.world_size


# ----------------------------------------------------------------------------------------
# Image-caption sources for `prepare`
# ----------------------------------------------------------------------------------------
# A source yields items (key, load) in a fixed order. Nothing is read until `load()` is
# called; it returns (caption or None, read) and `read()` returns a PIL image (files.open_image:
# bounded, RGB) or raises on a broken file. Skipping an item (another rank's shard, a finished shard)
# therefore costs nothing.


class ShapesSource:
    """`num` examples of the shapes stream (deterministic in seed)."""

    def __init__(self, num: int, seed: int = 0, align: int = 1, jitter: bool = True):
        if num <= 0:
            raise DataError(f"--examples must be positive for the shapes source, got {num}")
        if not 1 <= align <= 8:
            raise DataError(f"--shapes-align must be between 1 and 8 px, got {align}")
        self.num, self.seed, self.align, self.jitter = num, seed, align, jitter
        options = (f", align={align}" if align != 1 else "") + ("" if jitter else ", jitter=False")
        self.description = f"shapes(num={num}, seed={seed}{options})"

    def __len__(self) -> int:
        return self.num

    def items(self):
        for index in range(self.num):
            yield f"{index:09d}", (lambda index=index: self._load(index))

    def _load(self, index: int):
        caption, image = shapes_example(self.seed, index, self.align, self.jitter)
        return caption, lambda: image


def _read_caption(path: Path) -> str | None:
    """The caption in a .txt file, or None: missing, empty, not UTF-8, or over MAX_CAPTION_BYTES (not read)."""
    try:
        if path.stat().st_size > MAX_CAPTION_BYTES:
            return None
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class FolderSource:
    """Images under a folder (recursively, sorted), each captioned by a same-named `.txt` file."""

    def __init__(self, root):
        self.root = Path(root)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}; "
                            f"point --source at a folder of images with .txt captions")
        self.description = f"folder({self.root.resolve()})"

    def __len__(self) -> int:
        return len(self.paths)

    def items(self):
        for path in self.paths:
            key = path.relative_to(self.root).with_suffix("").as_posix()
            yield key, (lambda path=path: (_read_caption(path.with_suffix(".txt")), lambda: open_image(path)))


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/000001.jpg' -> ('dir/000001', 'jpg'); the key ends at the basename's first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class TarSource:
    """webdataset-style tar shards (img2dataset's output): consecutive members sharing a key
    form one example, an image member (jpg, png, ...) plus a `.txt` caption."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DataError("no .tar files given; point --source at a .tar file or a folder of them")
        self.description = "tar(" + ", ".join(str(p.resolve()) for p in self.paths) + ")"

    @staticmethod
    def _load(tar: tarfile.TarFile, members: dict):
        image = next((info for ext, info in members.items() if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        caption = None
        if "txt" in members and members["txt"].size <= MAX_CAPTION_BYTES:  # a larger one is never read
            try:
                caption = tar.extractfile(members["txt"]).read().decode("utf-8").strip() or None
            except (UnicodeDecodeError, *TAR_ERRORS):
                caption = None
        if image is None:
            return caption, lambda: None

        def read():
            name = f"{tar.name}:{image.name}"
            if image.size > MAX_IMAGE_BYTES:  # checked before the member is read into memory
                raise FileError(f"{name} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
            return open_image(tar.extractfile(image).read(), name)

        return caption, read

    def items(self):
        """Reads headers only while iterating; `load` seeks back to the members it needs."""
        for path in self.paths:
            try:
                tar = tarfile.open(path, "r")
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"cannot open tar shard {path}: {e}")
            with tar:
                key, members = None, {}
                try:
                    for info in tar:
                        if not info.isfile():
                            continue
                        k, ext = _tar_key(info.name)
                        if k != key and key is not None:
                            yield f"{path.stem}/{key}", (lambda m=members: self._load(tar, m))
                            members = {}
                        key = k
                        members[ext] = info
                except tarfile.TarError as e:  # a truncated or damaged shard ends mid-member
                    raise DataError(f"tar shard {path} is damaged after member {key!r} ({e}); download it again or leave it out") from None
                if key is not None:
                    yield f"{path.stem}/{key}", (lambda m=members: self._load(tar, m))


def open_source(spec: str, num: int = 0, seed: int = 0):
    """`shapes`, a .tar file, a folder of .tar files, or a folder of images with .txt captions."""
    if spec == "shapes":
        return ShapesSource(num, seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"source {spec} does not exist; give 'shapes', a .tar shard, or a folder")
    if path.is_file():
        if path.suffix != ".tar":
            raise DataError(f"source file {spec} is not a .tar shard; give a .tar or a folder")
        return TarSource([path])
    tars = sorted(path.glob("*.tar"))
    return TarSource(tars) if tars else FolderSource(path)


# ----------------------------------------------------------------------------------------
# Pixels -> VQGAN input
# ----------------------------------------------------------------------------------------


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor [3, H, W] in [-1, 1], the VQGAN's input range."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_example(load, size: int):
    """Run an item's `load` and preprocess: (caption, image), the caption None when there is
    none, the image None when it is missing, unreadable, truncated or too large (files.FileError)
    or when the item itself cannot be read."""
    try:
        caption, read = load()
    except (*TAR_ERRORS, ValueError):  # a damaged archive member: unreadable, not captionless
        return "", None
    if caption is None:
        return None, None
    try:
        image = read()
        if image is None:
            return caption, None
        image.load()  # a source's lazy PIL image: a file truncated after its header fails only here
        return caption, center_crop_resize(image.convert("RGB"), size)
    except (FileError, *TAR_ERRORS, ValueError, SyntaxError, Image.DecompressionBombError):
        return caption, None


# ----------------------------------------------------------------------------------------
# Writing token shards
# ----------------------------------------------------------------------------------------


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to a name
        np.save(f, array)


def shard_name(kind: str, k: int) -> str:
    return {"tokens": f"tokens-{k:05d}.npy", "captions": f"captions-{k:05d}.jsonl", "done": f"shard-{k:05d}.json"}[kind]


def write_shard(out_dir, k: int, keys, captions, codes: np.ndarray, skipped: dict) -> None:
    """Write shard k (tokens, captions, then its completion record), each file atomically."""
    out = Path(out_dir)
    codes = np.ascontiguousarray(codes, dtype=np.uint16)
    if codes.ndim != 2 or len(codes) != len(captions) or len(keys) != len(captions):
        raise ValueError(f"shard {k}: {len(keys)} keys, {len(captions)} captions, codes {codes.shape}")
    atomic_write(out / shard_name("tokens", k), lambda tmp: _save_npy(tmp, codes))
    lines = "".join(json.dumps({"key": key, "caption": c}, ensure_ascii=False) + "\n" for key, c in zip(keys, captions))
    atomic_write(out / shard_name("captions", k), lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    write_json(out / shard_name("done", k), {"count": len(captions), "skipped": skipped})


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def vqgan_fingerprint(vqgan_dir) -> str:
    """sha256 of the VQGAN's weights file: token shards are only valid for the VQGAN that wrote them."""
    d = Path(vqgan_dir)
    weights = d / "model.safetensors" if d.is_dir() else d
    if not weights.is_file():
        raise DataError(f"no VQGAN weights at {weights}; pass --vqgan a checkpoint directory")
    return _file_digest(weights)


def vqgan_image_size(model) -> int:
    """The square image size the VQGAN was trained at (its config's `resolution`)."""
    size = getattr(model.config, "resolution", None)
    if not size:
        raise DataError("the VQGAN config names no resolution; pass --image-size")
    return int(size)


def prepare(source, vqgan_dir, out_dir, *, shard_size: int = 10_000, batch_size: int = 64,
            image_size: int | None = None, device: str = "cpu", rank: int = 0, world_size: int = 1,
            progress: bool = True) -> dict | None:
    """Pre-tokenise `source` with the VQGAN at `vqgan_dir` into token shards under `out_dir`.

    Resumable: complete shards are kept, the others redone. Ranks of a torchrun job each
    encode the shards k with k % world_size == rank; rank 0 writes meta.json once all
    shards are complete and returns it (the other ranks return None).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = vqgan_fingerprint(vqgan_dir)
    model = vqgan.load_vqgan(vqgan_dir).to(device).eval()
    size = image_size or vqgan_image_size(model)
    grid = tuple(model.grid_size(size))
    header = {"format": FORMAT, "version": VERSION, "source": source.description, "vqgan": str(Path(vqgan_dir).resolve()),
              "vqgan_fingerprint": fingerprint, "image_size": size, "grid": list(grid),
              "codebook_size": int(model.config.n_embed), "shard_size": shard_size}
    if header["codebook_size"] > 2**16:
        raise DataError(f"a codebook of {header['codebook_size']} codes does not fit uint16 token shards")
    _check_or_claim(out, header)
    done = {int(p.stem.split("-")[1]) for p in out.glob("shard-*.json")}  # complete shards

    def encode(images) -> np.ndarray:  # list of PIL images -> codes uint16 [B, h * w]
        x = torch.stack([image_to_tensor(im) for im in images]).to(device)  # (B, 3, S, S)
        with torch.no_grad():
            codes = model.encode(x)  # (B, h, w)
        return codes.reshape(len(images), -1).cpu().numpy().astype(np.uint16)

    class Shard:  # the examples of one shard being encoded
        def __init__(self):
            self.keys, self.captions, self.codes, self.pending = [], [], [], []
            self.skipped = {"unreadable": 0, "no_caption": 0}

        def add(self, key, caption, image):
            self.keys.append(key)
            self.captions.append(caption)
            self.pending.append(image)
            if len(self.pending) == batch_size:
                self.codes.append(encode(self.pending))
                self.pending = []

        def write(self, k):
            if self.pending:
                self.codes.append(encode(self.pending))
            codes = np.concatenate(self.codes) if self.codes else np.zeros((0, grid[0] * grid[1]), np.uint16)
            write_shard(out, k, self.keys, self.captions, codes, self.skipped)

    total = len(source) if hasattr(source, "__len__") else None
    bar = tqdm(total=total, unit="img", desc=f"prepare {out.name}", disable=not progress or rank != 0, dynamic_ncols=True)
    mine = lambda k: k % world_size == rank and k not in done  # noqa: E731
    shard, num_items = None, 0
    for index, (key, load) in enumerate(source.items()):
        k = index // shard_size
        if index % shard_size == 0:
            if shard is not None:
                shard.write(k - 1)
            shard = Shard() if mine(k) else None
        num_items = index + 1
        bar.update(1)
        if shard is None:
            continue
        caption, image = load_example(load, size)
        if caption is None:
            shard.skipped["no_caption"] += 1
        elif image is None:
            shard.skipped["unreadable"] += 1
        else:
            shard.add(key, caption, image)
    if shard is not None:
        shard.write((num_items - 1) // shard_size)
    bar.close()

    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank != 0:
        return None
    return _finish(out, header, -(-num_items // shard_size))


def _check_or_claim(out: Path, header: dict) -> None:
    """Refuse to mix shards of another source, VQGAN or shard size into `out`, and to write
    into a folder that holds anything but an earlier prepare (its own prepare.json)."""
    claim = out / "prepare.json"
    if claim.is_file():
        try:
            previous = read_json(claim)
        except FileError as e:
            raise DataError(f"{e}; {out} is not a prepare this command can resume: choose a new --out") from None
        if not isinstance(previous, dict):
            raise DataError(f"{claim} is not a prepare record; choose a new --out")
        for field in ("source", "vqgan_fingerprint", "image_size", "shard_size", "version"):
            if previous.get(field) != header[field]:
                raise DataError(f"{out} holds shards prepared with another {field} ({shown(previous.get(field), 80)}); "
                                f"choose a new --out or delete it")
        return
    others = [p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))]
    if others:
        raise DataError(f"--out {out} holds other files ({shown(sorted(others)[:3], 80)}) and no prepare.json; "
                        "prepare writes only into a new or empty folder, or resumes its own: choose another --out")
    write_json(claim, header)


def _finish(out: Path, header: dict, num_shards: int) -> dict:
    """Collect the completion records of shards 0 .. num_shards - 1 into meta.json."""
    shards, skipped = [], {"unreadable": 0, "no_caption": 0}
    for k in range(num_shards):
        record = out / shard_name("done", k)
        if not record.is_file():
            raise DataError(f"shard {k} of {out} is missing; run prepare again to complete it")
        info = json.loads(record.read_text())
        shards.append({"tokens": shard_name("tokens", k), "captions": shard_name("captions", k), "count": info["count"]})
        for reason, count in info["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    meta = dict(header, shards=shards, num_examples=sum(s["count"] for s in shards), skipped=skipped)
    write_json(out / "meta.json", meta)
    return meta


def write_token_shards(out_dir, captions: list[str], codes: np.ndarray, *, grid: tuple[int, int], codebook_size: int,
                       vqgan_dir=None, image_size: int = 0, source: str = "arrays", shard_size: int = 10_000) -> dict:
    """Write already-tokenised examples (codes [N, h * w]) as a token-shard directory that
    TokenShards and train.py read: for codes made elsewhere, tests and benchmarks."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    codes = np.asarray(codes)
    if codes.shape != (len(captions), grid[0] * grid[1]) or codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise DataError(f"codes must be [{len(captions)}, {grid[0] * grid[1]}] with values below {codebook_size}, "
                        f"got shape {codes.shape}")
    header = {"format": FORMAT, "version": VERSION, "source": source, "vqgan": str(Path(vqgan_dir).resolve()) if vqgan_dir else "",
              "vqgan_fingerprint": "", "image_size": image_size, "grid": list(grid), "codebook_size": codebook_size,
              "shard_size": shard_size}
    num_shards = -(-len(captions) // shard_size)
    for k in range(num_shards):
        rows = slice(k * shard_size, (k + 1) * shard_size)
        write_shard(out, k, [f"{i:09d}" for i in range(len(captions))][rows], captions[rows], codes[rows],
                    {"unreadable": 0, "no_caption": 0})
    return _finish(out, header, num_shards)


# ----------------------------------------------------------------------------------------
# Reading token shards
# ----------------------------------------------------------------------------------------


def _plain_name(value) -> bool:
    """A file name inside the shard directory: no folder, no way out of it."""
    return isinstance(value, str) and 0 < len(value) <= 255 and "/" not in value and "\\" not in value \
        and value not in (".", "..") and "\0" not in value


def _check_meta(path: Path) -> dict:
    """meta.json, read bounded, every field checked: types, ranges, shard file names and counts."""
    try:
        meta = read_json(path)
    except FileError as e:
        raise DataError(f"{e}; prepare it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not is_whole(meta.get("version")) \
            or meta.get("version") != VERSION:
        raise DataError(f"{path} is not a version-{VERSION} {FORMAT} directory; prepare it again")
    try:
        grid = meta.get("grid")
        if not isinstance(grid, list) or len(grid) != 2:
            raise DataError(f"grid must be [rows, columns], got {shown(grid)}")
        for side in grid:
            check_int("each grid side", side, 1, MAX_GRID_SIDE, DataError)
        check_int("codebook_size", meta.get("codebook_size"), 1, 2**16, DataError)
        check_int("image_size", meta.get("image_size", 0), 0, 1 << 20, DataError)
        for field in ("source", "vqgan", "vqgan_fingerprint"):
            if not isinstance(meta.get(field, ""), str):
                raise DataError(f"{field} must be text, got {shown(meta.get(field))}")
        shards = meta.get("shards")
        if not isinstance(shards, list) or len(shards) > MAX_SHARDS:
            raise DataError(f"shards must be a list of at most {MAX_SHARDS:,} shards")
        for shard in shards:
            if not isinstance(shard, dict) or not _plain_name(shard.get("tokens")) or not _plain_name(shard.get("captions")):
                raise DataError(f"each shard must name its tokens and captions files in the folder, got {shown(shard, 80)}")
            check_int("a shard's count", shard.get("count"), 0, 2**40, DataError)
        total = sum(shard["count"] for shard in shards)
        if "num_examples" in meta:
            check_int("num_examples (the shards' counts summed)", meta["num_examples"], total, total, DataError)
        if not isinstance(meta.get("skipped", {}), dict):
            raise DataError("skipped must be an object of counts")
    except DataError as e:
        raise DataError(f"{path}: {e}; prepare it again") from None
    meta.setdefault("source", "")
    meta.setdefault("skipped", {})
    return meta


class TokenShards:
    """A token-shard directory, memory-mapped: `dataset[i] -> (caption, codes uint16[n])`.

    Codes stay on disk (np.load mmap_mode="r"), and so do the captions: the reader keeps
    only the byte offset of every caption line.
    """

    def __init__(self, root):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{self.root} has no meta.json; prepare it with `python data.py prepare --out {self.root}` (or finish an interrupted prepare)")
        self.meta = _check_meta(meta_path)
        self.grid = tuple(self.meta["grid"])
        self.codebook_size = int(self.meta["codebook_size"])
        self.tokens, self.captions, self.offsets, counts = [], [], [], []
        n = self.grid[0] * self.grid[1]
        for shard in self.meta["shards"]:
            tokens_path, captions_path, count = self.root / shard["tokens"], self.root / shard["captions"], shard["count"]
            try:
                tokens = np.load(tokens_path, mmap_mode="r")  # (m, n) uint16, on disk; the header is read, not the rows
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"{tokens_path} is missing or not a .npy array ({type(e).__name__}: {str(e)[:120]}); "
                                "prepare it again") from None
            if tokens.dtype != np.uint16 or tokens.shape != (count, n):
                raise DataError(f"{tokens_path} holds {tokens.dtype} {tuple(tokens.shape)}, meta.json says uint16 "
                                f"({count}, {n}); prepare it again")
            text, ends = self._caption_lines(captions_path, count)
            if len(ends) != count:
                raise DataError(f"{tokens_path} does not match meta.json ({len(tokens)} rows, {len(ends)} captions, "
                                f"{count} expected); prepare it again")
            self.tokens.append(tokens)
            self.captions.append(text)
            self.offsets.append(np.concatenate([[0], ends]))
            counts.append(count)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first row
        if self.starts[-1] == 0:
            raise DataError(f"{self.root} holds no examples")

    @staticmethod
    def _caption_lines(path: Path, count: int):
        """(the captions file memory-mapped, the end offset of every line), its size checked
        against `count` captions of at most MAX_CAPTION_BYTES and scanned in 16 MiB pieces."""
        if not count:
            return np.zeros(0, np.uint8), np.zeros(0, np.int64)
        try:
            size = path.stat().st_size
            if size > count * (MAX_CAPTION_BYTES + 256):
                raise DataError(f"{path} holds {size:,} bytes for {count} captions; prepare it again")
            text = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is missing or unreadable ({type(e).__name__}); prepare it again") from None
        piece = 16 << 20
        ends = [np.flatnonzero(text[i:i + piece] == ord("\n")) + (i + 1) for i in range(0, len(text), piece)]
        return text, np.concatenate(ends) if ends else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def caption(self, i: int) -> str:
        k, j = self._locate(i)
        line = self.captions[k][self.offsets[k][j]:self.offsets[k][j + 1]].tobytes()
        try:
            caption = json.loads(line)["caption"]
        except (ValueError, KeyError, TypeError, RecursionError):
            caption = None
        if not isinstance(caption, str):
            raise DataError(f"{self.root / self.meta['shards'][k]['captions']}: line {j + 1} is not a caption record; "
                            "prepare it again")
        return caption

    def __getitem__(self, i: int) -> tuple[str, np.ndarray]:
        k, j = self._locate(i)
        codes = np.asarray(self.tokens[k][j])
        if codes.size and int(codes.max()) >= self.codebook_size:
            raise DataError(f"{self.root / self.meta['shards'][k]['tokens']} holds code {int(codes.max())} in row {j}, "
                            f"beyond the codebook of {self.codebook_size}; prepare it again")
        return self.caption(i), codes

    def batch(self, indices) -> tuple[list[str], torch.Tensor]:
        """(captions, codes LongTensor[B, n]) for a list of global indices."""
        captions, rows = zip(*(self[int(i)] for i in indices))  # each row checked against the codebook
        return list(captions), torch.from_numpy(np.stack(rows).astype(np.int64))


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the examples (cached: a batch reads one or two epochs)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Global indices of the `step`-th batch (0-based): consecutive slices of a stream of
    epochs, each a fresh permutation seeded by (seed, epoch). A pure function of its
    arguments, so resuming at a step and splitting a batch between ranks need no state."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs = positions // num_examples
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = epoch_permutation(num_examples, seed, int(epoch))[positions[chosen] % num_examples]
    return out


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's variables, checked: stray ones are one clear error."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise DataError("WORLD_SIZE or RANK is not a number; unset them, or start with torchrun") from None
    if world > 1 and not all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT")):
        raise DataError(f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not: start with torchrun, "
                        "or unset WORLD_SIZE and RANK")
    if not (1 <= world <= 65536 and 0 <= rank < world):
        raise DataError(f"RANK={rank} does not fit WORLD_SIZE={world}; start with torchrun, or unset them")
    return rank, world


def check_prepare_args(args) -> None:
    """Every number of `prepare`, before any work."""
    check_int("--examples", args.examples, 1, 10**9, DataError)
    check_int("--seed", args.seed, 0, 2**63 - 1, DataError)
    if args.image_size is not None:
        check_int("--image-size", args.image_size, 1, 8192, DataError)
    check_int("--shard-size", args.shard_size, 1, 10**7, DataError)
    check_int("--batch-size", args.batch_size, 1, 4096, DataError)
    if args.threads is not None:
        check_int("--threads", args.threads, 1, 1024, DataError)


def cmd_prepare(args) -> None:
    check_prepare_args(args)
    rank, world = distributed_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError):
        raise DataError(f"--device {args.device!r} is not usable here; use cpu, cuda or cuda:N") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a new or empty folder")
    if world > 1:
        if args.device == "cuda":  # one GPU per process under torchrun
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.distributed.init_process_group("gloo")
    source = open_source(args.source, args.examples, args.seed)
    meta = prepare(source, args.vqgan, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                   image_size=args.image_size, device=args.device, rank=rank, world_size=world)
    if meta is not None:
        skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in meta["skipped"].items())
        print(f"{meta['num_examples']} examples in {len(meta['shards'])} shards at {args.out} "
              f"(grid {meta['grid'][0]}x{meta['grid'][1]}, {meta['codebook_size']} codes); skipped: {skipped}")
    if world > 1:
        torch.distributed.destroy_process_group()


def cmd_show(args) -> None:
    check_int("--count", args.count, 0, 10**6, DataError)
    data = TokenShards(args.dir)
    m = data.meta
    print(f"{len(data)} examples, {len(m['shards'])} shards, grid {m['grid']}, {m['codebook_size']} codes, "
          f"image size {m['image_size']}, source {m['source']}, skipped {m['skipped']}")
    for i in range(min(args.count, len(data))):
        caption, codes = data[i]
        print(f"{i}: {caption!r} codes[:8]={codes[:8].tolist()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="pre-tokenise images into token shards", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, help="'shapes', a .tar shard, a folder of .tar shards, or a folder of images with .txt captions")
    p.add_argument("--vqgan", default=str(DEFAULT_VQGAN), help="VQGAN checkpoint directory (or taming .ckpt) that tokenises the images")
    p.add_argument("--out", required=True, help="output directory of token shards")
    # Not --num: torchrun would take it for an abbreviation of its own --numa-binding.
    p.add_argument("--examples", type=int, default=30_000, help="examples to draw (shapes source only)")
    p.add_argument("--seed", type=int, default=0, help="shapes stream seed (shapes source only)")
    p.add_argument("--image-size", type=int, default=None, help="square size images are cropped and resized to (default: the VQGAN's resolution)")
    p.add_argument("--shard-size", type=int, default=10_000, help="source items per shard (the unit of resuming)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VQGAN encoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the VQGAN encoder")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice); on a busy shared CPU 1 is often faster")
    p.set_defaults(run=cmd_prepare)
    s = sub.add_parser("show", help="summarise a token-shard directory", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("dir", help="token-shard directory")
    s.add_argument("--count", type=int, default=5, help="examples to print")
    s.set_defaults(run=cmd_show)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (DataError, vqgan.VQGANError, FileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
