"""Files in and out, once for every script: atomic writes, bounded reads, checked values.

Every command that writes goes through `atomic_write` (a reader never sees half a file, a
kill never leaves one) into a place `check_output` allowed (nothing a user did not ask to
replace), and every file a user hands in is read bounded: images with `open_image`, PNG
text chunks with `png_text`, JSON with `read_json`, each checked value with `check_int`,
`check_float`, `check_bool` and `check_choice` (a hostile file is one clear error, in
bounded memory). Nothing here knows about models.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, PngImagePlugin

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 MP: 8k x 8k; larger images are refused before decoding
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # a file or archive member larger than this is not read
MAX_TEXT_CHUNK = 1024 * 1024  # PNG text chunks are inflated at most this far (Pillow's own guard)
MAX_TEXT_MEMORY = 4 * MAX_TEXT_CHUNK  # all text chunks of one PNG together
MAX_JSON_BYTES = 16 * 1024 * 1024  # a config.json / meta.json larger than this is not read
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024  # the paper's model has a header of ~60 KB

# Pillow's own guards, for every Image.open in a process that imports this file (also code
# that does not go through open_image): no image over 2 x MAX_IMAGE_PIXELS is decoded (Pillow
# raises DecompressionBombError), text chunks are inflated at most MAX_TEXT_CHUNK each and
# MAX_TEXT_MEMORY together, and a truncated file is an error, never half an image.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_MEMORY
ImageFile.LOAD_TRUNCATED_IMAGES = False


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
    An image within the limit is decoded once (an RGB file is not copied again), so no file
    costs more than ~7 bytes per pixel of the limit. Truncated, corrupt or non-image files
    raise FileError with the file's name.
    """
    name = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "image")
    try:
        if isinstance(source, (bytes, bytearray)):
            handle = io.BytesIO(source)
        else:
            if os.path.getsize(source) > MAX_IMAGE_BYTES:
                raise FileError(f"{name} is larger than {MAX_IMAGE_BYTES >> 20} MiB; pass a smaller image")
            handle = open(source, "rb")
        with handle, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(handle)
            width, height = image.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise FileError(f"{name} is {width} x {height} pixels, over the limit of {max_pixels:,}; "
                                "resize it first")
            image.load()  # every pixel, while the file is open; nothing is read from it afterwards
            return image if image.mode == "RGB" else image.convert("RGB")
    except FileError:
        raise
    except FileNotFoundError:
        raise FileError(f"{name} does not exist; check the path") from None
    except Image.DecompressionBombError:
        raise FileError(f"{name} claims more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, over the limit of "
                        f"{max_pixels:,}; resize it first") from None
    except (OSError, ValueError, SyntaxError, MemoryError, EOFError, struct.error, zlib.error,
            IndexError, TypeError, KeyError) as e:
        detail = one_line(e)
        raise FileError(f"{name} is not a readable image ({type(e).__name__}: {detail}); pass a PNG or JPEG") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text(source, name: str | None = None) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file (a path or bytes), without decoding a pixel.

    Image data is skipped, not read; a chunk that would inflate past MAX_TEXT_CHUNK, or
    text past MAX_TEXT_MEMORY in all, is left out (a text bomb costs what its file does
    and ~1 MiB). A file that is not a PNG, or whose chunk structure is damaged, raises
    FileError; text after a cut is lost, the text before it is kept.
    """
    name = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "image")
    text, total = {}, 0
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except FileNotFoundError:
        raise FileError(f"{name} does not exist; check the path") from None
    except OSError as e:
        raise FileError(f"{name} cannot be read ({one_line(e)})") from None
    with handle:
        if handle.read(8) != PNG_SIGNATURE:
            raise FileError(f"{name} is not a PNG file")
        while True:
            head = handle.read(8)
            if len(head) < 8:
                break  # cut short: keep what was read
            length, kind = struct.unpack(">I4s", head)
            if length > 2**31 - 1:
                raise FileError(f"{name} is a damaged PNG (a chunk claims {length:,} bytes)")
            if kind == b"IEND":
                break
            if kind not in (b"tEXt", b"zTXt", b"iTXt") or length > MAX_TEXT_CHUNK or total >= MAX_TEXT_MEMORY:
                handle.seek(length + 4, 1)  # image data and everything else: skipped, never read
                continue
            body = handle.read(length)
            handle.seek(4, 1)  # CRC
            entry = _png_text_chunk(kind, body)
            if entry is not None and total + len(entry[1]) <= MAX_TEXT_MEMORY:
                text.setdefault(entry[0], entry[1])
                total += len(entry[1])
    return text


def _inflate(data: bytes) -> bytes | None:
    """zlib data inflated to at most MAX_TEXT_CHUNK bytes; None if it is longer or damaged."""
    try:
        inflater = zlib.decompressobj()
        out = inflater.decompress(data, MAX_TEXT_CHUNK + 1)
    except zlib.error:
        return None
    return out if len(out) <= MAX_TEXT_CHUNK else None


def _png_text_chunk(kind: bytes, body: bytes) -> tuple[str, str] | None:
    """(keyword, text) of one tEXt / zTXt / iTXt chunk body, or None when it is malformed."""
    key, sep, rest = body.partition(b"\0")
    if not sep or not 1 <= len(key) <= 79:
        return None
    keyword = key.decode("latin-1")
    if kind == b"tEXt":
        return keyword, rest.decode("latin-1")
    if kind == b"zTXt":
        value = _inflate(rest[1:]) if rest[:1] == b"\0" else None
        return None if value is None else (keyword, value.decode("latin-1"))
    if len(rest) < 2:  # iTXt: compression flag, method, language\0, translated keyword\0, UTF-8 text
        return None
    compressed, method = rest[0], rest[1]
    parts = rest[2:].split(b"\0", 2)
    if len(parts) != 3:
        return None
    value = parts[2]
    if compressed:
        value = _inflate(value) if method == 0 else None
        if value is None:
            return None
    try:
        return keyword, value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_json(path, what: str | None = None, limit: int = MAX_JSON_BYTES):
    """A JSON file a user handed in, read bounded: at most `limit` bytes, UTF-8, any nesting
    depth refused cleanly. Raises FileError naming the file; the caller checks the values."""
    path = Path(path)
    what = what or str(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise FileError(f"{what} is {size:,} bytes, over the limit of {limit:,} for a JSON file; is it the right file?")
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileError:
        raise
    except FileNotFoundError:
        raise FileError(f"{what} does not exist") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FileError(f"{what} is not valid JSON ({type(e).__name__}: {one_line(e)})") from None
    except OSError as e:
        raise FileError(f"{what} cannot be read ({one_line(e)})") from None


def safetensors_header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors file from its header alone (the 8-byte length,
    checked first, then the JSON), no tensor read. safetensors checks that the header's
    offsets cover the file exactly, so a header never claims more than the file holds."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
            raise FileError(f"{path} is damaged or not a safetensors file (a header of {length:,} bytes)")
        with safe_open(str(path), "pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except FileError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise FileError(f"{path} is damaged or not a safetensors file ({type(e).__name__}: {one_line(e, 160)})") from None


class _SkipNormalInit(torch.overrides.TorchFunctionMode):
    """normal_ as a no-op: on the meta device there is nothing to fill, and torch's meta kernel
    for normal_ costs ~1.5 s and ~75 MB of imports on first use."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) == "normal_":  # Tensor.normal_(t, ...) or nn.init.normal_(tensor=t, ...)
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@contextmanager
def meta_device():
    """Build modules on the meta device: their parameter names and shapes, nothing allocated or
    initialised, to compare with a weights file's header before reading a weight."""
    with torch.device("meta"), _SkipNormalInit():
        yield


# ----------------------------------------------------------------------------------------
# Outputs: nothing a user did not ask to replace
# ----------------------------------------------------------------------------------------


def check_output(path, overwrite: bool, what: str = "file", flag: str = "--out", ours=None) -> Path:
    """`path` if a command may write there: it does not exist yet, is an empty folder, or
    `overwrite` says to replace it. With `ours` (path -> bool: is it an output of this
    command?), an existing output of another kind is refused even with `overwrite`."""
    path = Path(path)
    if what == "folder":
        if path.exists() and not path.is_dir():
            raise FileError(f"{flag} {path} is a file, not a folder; choose another {flag}")
        if not path.is_dir() or not any(path.iterdir()):
            return path
        if ours is not None and not ours(path):
            raise FileError(f"{flag} {path} holds other files; pass an empty or new folder")
    else:
        if path.is_dir():
            raise FileError(f"{flag} {path} is a folder; pass a file name")
        if not path.exists() and not path.is_symlink():
            return path
        if ours is not None and not ours(path):
            raise FileError(f"{flag} {path} is a file this command did not write; pass another {flag}")
    if not overwrite:
        raise FileError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another {flag}")
    return path


# ----------------------------------------------------------------------------------------
# Checked values: config fields and command-line numbers
# ----------------------------------------------------------------------------------------


def one_line(value, limit: int = 200) -> str:
    """A value or an error as one short line: the first line, cut at `limit` characters."""
    text = str(value).strip().splitlines()[0] if str(value).strip() else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value, limit: int = 40) -> str:
    """repr() of a user's value, on one line and cut short (a hostile value may be huge)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"{'-' if value < 0 else ''}an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_whole(value) -> bool:
    """An int that is not a bool (JSON true is not a layer count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, low: int, high: int, error=FileError) -> int:
    if not is_whole(value) or not low <= value <= high:
        raise error(f"{name} must be a whole number between {low:,} and {high:,}, got {shown(value)}")
    return value


def check_float(name: str, value, low: float, high: float, error=FileError, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """A finite real number in [low, high] (or with open ends); NaN and infinity fail."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise error(f"{name} must be a finite number in {interval}, got {shown(value)}")
    return float(value)


def check_bool(name: str, value, error=FileError) -> bool:
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {shown(value)}")
    return value


def check_choice(name: str, value, choices, error=FileError):
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in choices:
        raise error(f"{name} must be one of {', '.join(map(str, choices))}, got {shown(value)}")
    return value


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
