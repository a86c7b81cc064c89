"""Files in and out, once for every script: atomic writes, bounded image reads, pixel conversions.

Every command that writes goes through `atomic_write` (a reader never sees half a file, a
kill never leaves one), and every image a user hands in goes through `open_image` (a
hostile file is one clear error, in bounded memory). Nothing here knows about models.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 MP: 8k x 8k; larger images are refused before decoding
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # a file or archive member larger than this is not read
MAX_TEXT_CHUNK = 1024 * 1024  # PNG text chunks are inflated at most this far (Pillow's own guard)


class FileError(ValueError):
    """A file a user handed in cannot be used: the message says which and what to do."""


def atomic_write(path, write) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


def open_image(source, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file (a path or bytes) to RGB, refusing what would take unbounded memory.

    Pillow reads the header first: the size is checked before any pixel is decoded, so a
    decompression bomb (a small file that claims 100,000 x 100,000 pixels) costs kilobytes.
    Truncated, corrupt or non-image files raise FileError with the file's name.
    """
    name = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "image")
    Image.MAX_IMAGE_PIXELS = None  # our own check below, with our own message, replaces Pillow's warning
    try:
        if isinstance(source, (bytes, bytearray)):
            handle = io.BytesIO(source)
        else:
            if os.path.getsize(source) > MAX_IMAGE_BYTES:
                raise FileError(f"{name} is larger than {MAX_IMAGE_BYTES >> 20} MiB; pass a smaller image")
            handle = open(source, "rb")
        with handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from PIL import ImageFile, PngImagePlugin
            PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            with Image.open(handle) as image:
                width, height = image.size
                if width < 1 or height < 1 or width * height > max_pixels:
                    raise FileError(f"{name} is {width} x {height} pixels, over the limit of {max_pixels:,}; "
                                    "resize it first")
                return image.convert("RGB")
    except FileError:
        raise
    except FileNotFoundError:
        raise FileError(f"{name} does not exist; check the path") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError, EOFError) as e:
        raise FileError(f"{name} is not a readable image ({type(e).__name__}: {e}); pass a PNG or JPEG") from None


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], [B, 3, H, W] -> uint8 arrays [B, H, W, 3]."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to size x size (bicubic; a no-op at the right size)."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s))
    return image if s == size else image.resize((size, size), Image.BICUBIC)
