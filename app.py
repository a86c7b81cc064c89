"""A local browser demo of Emage that plays the mask-predict rounds.

    python app.py [--host 127.0.0.1] [--port 7860] [--checkpoint DIR]

then open the address it prints. The page draws an image from a caption, shows how the T
rounds filled the token grid (a player over the rounds: the token map, with masked, newly
committed, revised (Algorithm 3) and unchanged tokens in different colours, next to the
decoded image of each round with still-masked cells grey), redraws cells marked on the
result from a new prompt, and offers the PNG with its `parameters` text chunk.

Design
------
* One process, one model. main() loads the checkpoint once (sample.Pipeline.load) and
  serves with the standard library's ThreadingHTTPServer: no web framework, no extra
  dependency, nothing fetched from the network (the page has no external resources).
* The page is a single static HTML document with inline CSS and JavaScript (PAGE below);
  the server only fills in a JSON blob of defaults and ranges. Everything else is a JSON
  API: GET /api/config, POST /api/generate and POST /api/edit; images travel as base64
  PNG inside the JSON answer.
* The server keeps no state between requests. A result carries its tokens; an edit sends
  them back with the cells to redraw and a new prompt, and is generated with
  init_tokens = those tokens and keep_mask = the unmarked cells (sample.py's inpainting).
* Generation is sample.py's: the best of `candidates` candidates drawn in one batch and
  ranked by the generator's self-score (Pipeline.self_scores), the same draws as
  Pipeline.best_of, except that the history of the rounds (Y_obs after each round) is kept
  for the winner. The answer has the final tokens, the history [T][n] (the mask id where a
  cell is still masked), the state before round 1 and T + 1 decoded frames (round 0 = before
  the first round), so the page classifies the cells of every round itself.
* One generation at a time: a non-blocking lock. A request that finds it taken is answered
  at once with HTTP 503, Retry-After: 1 and {"error": "busy: ...", "busy": true}; the
  threads that serve the page and reject bad requests never wait for the model.
* Input is checked before the lock is taken, with sample.py's ranges (steps 1-1024,
  temperature and guidance finite >= 0, candidates 1-256, seed 0 to 2**63 - 1 or
  "random"), plus a prompt limit of MAX_PROMPT_CHARS characters and a request-body limit of
  MAX_BODY bytes (HTTP 413). Every error is a JSON {"error": message} the page shows; an
  unexpected exception becomes HTTP 500 with a short message and one line on stderr, never
  a traceback. POSTs must be `Content-Type: application/json`, which a foreign web page
  cannot send without a CORS preflight this server never grants.
* It binds to 127.0.0.1 by default: a demo, not a public service.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import re
import secrets
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sample

MAX_BODY = 64 * 1024  # bytes of a request body; more is answered with 413
MAX_DRAIN = 1024 * 1024  # an oversized body up to this size is read (and dropped) before the 413
MAX_PROMPT_CHARS = 1000  # far beyond the text encoder's context; refuses pasted novels early
MAX_STEPS = 1024  # sample.py's check_args ranges
MAX_CANDIDATES = 256
MAX_SEED = 2**63 - 1
DEFAULT_STEPS = 16  # sample.py's --steps default (the paper's T)
SCHEDULES = ("cosine", "linear")
MASKED_GREY = (96, 96, 96)  # still-masked cells in the decoded frames (as sample.py's --show-steps)
DOWNLOAD_UPSCALE = 4  # the downloaded PNG is enlarged like sample.py's default --upscale 4
DECODE_BATCH = 64  # round frames decoded per VQGAN call
BUSY_MESSAGE = "busy: another image is being generated; try again in a moment"


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message for the page, extra JSON fields."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def log(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(f"app: {message}\n")  # one write, so that lines of concurrent requests do not mix
    sys.stderr.flush()


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return (text[:limit] + "...") if len(text) > limit else text


# ---------------------------------------------------------------------------
# Request fields
# ---------------------------------------------------------------------------

def shown(value) -> str:
    """A short repr of a bad value for an error message."""
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        value = int(value)
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        extra = ' or "random"' if name == "seed" else ""
        raise RequestError(400, f"{name} must be a whole number between {low} and {high}{extra}, got {shown(value)}")
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be between {low} and {high}, got {shown(value)}")
    return value


def number(body: dict, name: str, default: float, hint: str = "") -> float:
    """A finite number >= 0 (sample.py's rule for --temperature and --guidance)."""
    value = body.get(name, default)
    if isinstance(value, str) and len(value) <= 40:
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{name} must be a number >= 0{hint}, got {shown(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        value = float("inf")
    if not 0 <= value < float("inf"):  # nan fails every comparison
        raise RequestError(400, f"{name} must be a finite number >= 0{hint}, got {value}")
    return value


def prompt_of(body: dict, name: str = "prompt") -> str:
    value = body.get(name, "")
    if not isinstance(value, str):
        raise RequestError(400, f"the {name} must be text, got {shown(value)}")
    if not value.strip():
        raise RequestError(400, f'the {name} is empty: type a caption, e.g. "a red circle"')
    if len(value) > MAX_PROMPT_CHARS:
        raise RequestError(400, f"the {name} has {len(value):,} characters; at most {MAX_PROMPT_CHARS:,} are allowed")
    try:
        return sample.clean_prompt(value)
    except sample.SampleError as error:
        raise RequestError(400, str(error)) from None


def drawing_options(body: dict) -> dict:
    """The fields both endpoints share, checked: prompt, seed, steps, guidance, temperature,
    candidates, schedule."""
    options = {"prompt": prompt_of(body)}
    seed = body.get("seed", 0)
    if seed is None or (isinstance(seed, str) and seed.strip().lower() in ("", "random")):
        options["seed"] = secrets.randbelow(2**32)
        options["random_seed"] = True
    else:
        options["seed"] = integer(body, "seed", 0, 0, MAX_SEED)
        options["random_seed"] = False
    options["steps"] = integer(body, "steps", DEFAULT_STEPS, 1, MAX_STEPS)
    options["guidance"] = number(body, "guidance", sample.DEFAULT_GUIDANCE, " (1 = off)")
    options["temperature"] = number(body, "temperature", sample.DEFAULT_TEMPERATURE, " (0 = argmax)")
    options["candidates"] = integer(body, "candidates", sample.DEFAULT_CANDIDATES, 1, MAX_CANDIDATES)
    schedule = body.get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise RequestError(400, f"schedule must be one of {', '.join(SCHEDULES)}, got {shown(schedule)}")
    options["schedule"] = schedule
    return options


def edit_selection(body: dict, grid: tuple[int, int], size: tuple[int, int], token_limit: int):
    """(init tokens [n], the cells to redraw as BoolTensor[n], the cells as [row, col] pairs)
    from an edit request: `tokens` (the result's token map) and `cells` ([row, col] pairs on
    the token grid) or `region` ([x0, y0, x1, y1] canvas pixels, x1/y1 exclusive)."""
    h, w = grid
    H, W = size
    n = h * w
    tokens = body.get("tokens")
    if (not isinstance(tokens, list) or len(tokens) != n
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < token_limit for t in tokens)):
        raise RequestError(400, f"tokens must be the result's token map: {n} integers between 0 and "
                                f"{token_limit - 1}; generate an image first")
    pixels = np.zeros((H, W), dtype=bool)
    if body.get("region") is not None:
        region = body["region"]
        if (not isinstance(region, list) or len(region) != 4
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in region)):
            raise RequestError(400, f"region must be four integers [x0, y0, x1, y1], got {shown(region)}")
        x0, y0, x1, y1 = region
        if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
            raise RequestError(400, f"the edit region {region} is outside the {W} x {H} canvas: it needs "
                                    f"0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H}")
        pixels = sample.region_pixels((x0, y0, x1, y1), (H, W))
    else:
        cells = body.get("cells")
        if not isinstance(cells, list) or len(cells) > 4 * n:
            raise RequestError(400, "cells must be a list of [row, column] pairs of the token grid")
        if not cells:
            raise RequestError(400, "no cell is marked: click or drag over the result image to mark the cells to redraw")
        fh, fw = H // h, W // w
        for cell in cells:
            if (not isinstance(cell, list) or len(cell) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in cell)):
                raise RequestError(400, f"cells must be [row, column] pairs of integers, got {shown(cell)}")
            row, col = cell
            if not (0 <= row < h and 0 <= col < w):
                raise RequestError(400, f"the edit cell [{row}, {col}] is outside the {h} x {w} token grid "
                                        f"(rows 0-{h - 1}, columns 0-{w - 1})")
            pixels[row * fh:(row + 1) * fh, col * fw:(col + 1) * fw] = True
    selected = sample.cells_to_redraw(pixels, grid)  # (n,)
    if not bool(selected.any()):
        raise RequestError(400, "the edit selects no cell to redraw")
    chosen = [[i // w, i % w] for i in selected.nonzero()[:, 0].tolist()]
    return torch.tensor(tokens, dtype=torch.long), selected, chosen


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------

def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_with_parameters(image: Image.Image, parameters: dict) -> str:
    """sample.save_png's file (the `parameters` text chunk), as base64."""
    with tempfile.TemporaryDirectory(prefix="emage-app-") as folder:
        path = Path(folder) / "image.png"
        sample.save_png(image, path, parameters)
        return base64.b64encode(path.read_bytes()).decode("ascii")


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def round_frames(pipe, states: torch.Tensor, mask_id: int) -> list[str]:
    """Token maps [R, n] -> R base64 PNGs of the decoded images, still-masked cells grey."""
    h, w = pipe.model.config.grid
    frames = []
    for start in range(0, len(states), DECODE_BATCH):
        chunk = states[start:start + DECODE_BATCH]
        masked = chunk == mask_id
        images = pipe.decode(torch.where(masked, torch.zeros_like(chunk), chunk))
        for image, hole in zip(images, masked.reshape(-1, h, w).cpu().numpy()):
            pixels = np.asarray(image).copy()
            grey = np.kron(hole, np.ones((pixels.shape[0] // h, pixels.shape[1] // w), dtype=bool))
            pixels[grey] = MASKED_GREY
            frames.append(png_base64(Image.fromarray(pixels)))
    return frames


class Demo:
    """The loaded pipeline, the generation lock and the drawing itself (no HTTP here)."""

    def __init__(self, pipe, checkpoint: str | Path = sample.DEMO_CHECKPOINT):
        self.pipe = pipe
        self.checkpoint = str(checkpoint)
        self.lock = threading.Lock()
        config = pipe.model.config
        self.grid = tuple(int(v) for v in config.grid)
        self.mask_id = int(config.mask_id)
        self.token_limit = int(getattr(config, "codebook_size", self.mask_id))
        codes = getattr(getattr(getattr(pipe, "vqgan", None), "config", None), "n_embed", None)
        if isinstance(codes, int):  # the VQGAN may know fewer codes than the generator's vocabulary
            self.token_limit = min(self.token_limit, codes)
        self.image_size = tuple(int(v) for v in pipe.image_size)
        self.device = getattr(pipe, "device", torch.device("cpu"))
        info = getattr(pipe, "info", None) or {}
        self.variant = info.get("variant") if isinstance(info, dict) else None

    def config(self) -> dict:
        """What the page needs: defaults, ranges, the grid and canvas sizes."""
        return {
            "defaults": {"seed": 0, "steps": DEFAULT_STEPS, "guidance": sample.DEFAULT_GUIDANCE,
                         "temperature": sample.DEFAULT_TEMPERATURE, "candidates": sample.DEFAULT_CANDIDATES,
                         "schedule": "cosine"},
            "limits": {"steps": [1, MAX_STEPS], "candidates": [1, MAX_CANDIDATES], "seed": [0, str(MAX_SEED)],
                       "max_prompt_chars": MAX_PROMPT_CHARS, "max_body": MAX_BODY},
            "schedules": list(SCHEDULES),
            "grid": list(self.grid),
            "image_size": list(self.image_size),
            "mask_id": self.mask_id,
            "checkpoint": Path(self.checkpoint).name or self.checkpoint,
            "variant": self.variant,
        }

    def warning_for(self, prompt: str) -> str | None:
        if not getattr(self.pipe, "knows_only_shapes", False):
            return None
        import shapes

        try:
            shapes.parse(prompt)
        except ValueError as error:
            return f"this model only knows the shapes world ({one_line(error)}); generated anyway"
        return None

    def draw(self, options: dict, edit: tuple | None = None) -> dict:
        """Generate (or redraw the selected cells of `edit` = (tokens [n], selected [n], cells))
        and return the JSON answer. The caller holds the lock."""
        pipe, M = self.pipe, self.mask_id
        prompt, seed, C = options["prompt"], options["seed"], options["candidates"]
        kwargs = dict(steps=options["steps"], temperature=options["temperature"],
                      guidance_scale=options["guidance"], schedule=options["schedule"])
        n = self.grid[0] * self.grid[1]
        if edit is not None:
            init, selected, cells = edit
            kwargs["init_tokens"] = init[None].to(self.device)
            kwargs["keep_mask"] = (~selected)[None].to(self.device)
            initial = torch.where(selected, torch.full_like(init, M), init)  # (n,)
            kept = (~selected).tolist()
        else:
            initial = torch.full((n,), M, dtype=torch.long)
            kept = None
        started = time.perf_counter()
        tokens, history = pipe.generate(prompt, seed=seed, num_images=C, return_history=True, **kwargs)
        best = 0
        if C > 1:  # Pipeline.best_of's choice, keeping the winner's rounds
            best = int(np.argmax(pipe.self_scores(prompt, tokens, seed=seed)))
        final = tokens[best].cpu()  # (n,)
        rounds = history[:, best].cpu()  # (T, n)
        image = pipe.decode(final[None])[0]
        drawn = time.perf_counter()
        states = torch.cat([initial[None], rounds])  # (T + 1, n): round 0 = before the first round
        frames = round_frames(pipe, states, M)
        decoded = time.perf_counter()

        parameters = {"prompt": prompt, "seed": seed, "steps": options["steps"], "schedule": options["schedule"],
                      "temperature": options["temperature"], "guidance": options["guidance"],
                      "negative_prompt": None, "variant": self.variant, "algorithm": "default",
                      "backend": "torch", "checkpoint": self.checkpoint}
        if C > 1:
            parameters.update(candidates=C, rerank="self")
        if edit is not None:
            parameters.update(init_tokens=init.tolist(), redraw_cells=cells)
        H, W = image.height, image.width
        big = image.resize((W * DOWNLOAD_UPSCALE, H * DOWNLOAD_UPSCALE), Image.NEAREST)
        return {
            "image": png_base64(image),
            "download": png_with_parameters(big, dict(parameters, index=0)),
            "filename": f"{slug(prompt)}-{seed}{'-edit' if edit is not None else ''}.png",
            "tokens": final.tolist(),
            "initial": initial.tolist(),
            "history": rounds.tolist(),
            "kept": kept,
            "frames": frames,
            "grid": list(self.grid),
            "mask_id": M,
            "seed": str(seed),
            "random_seed": options["random_seed"],
            "candidates": C,
            "edit": edit is not None,
            "parameters": {**parameters, "seed": str(seed)},  # a JavaScript number would round a 63-bit seed
            "seconds": round(drawn - started, 4),
            "decode_seconds": round(decoded - drawn, 4),
            "warning": self.warning_for(prompt),
        }

    def handle(self, endpoint: str, body: dict) -> dict:
        """Check the request, then draw under the lock (busy -> RequestError 503)."""
        options = drawing_options(body)
        edit = None
        if endpoint == "edit":
            edit = edit_selection(body, self.grid, self.image_size, self.token_limit)
        if not self.lock.acquire(blocking=False):
            raise RequestError(503, BUSY_MESSAGE, busy=True)
        try:
            return self.draw(options, edit)
        except ValueError as error:  # the project's user errors (SampleError, EmageError, ...) are ValueErrors
            raise RequestError(400, one_line(error)) from None
        finally:
            self.lock.release()


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    server_version = "EmageDemo/1.0"
    timeout = 30  # seconds a client may take to send its request

    # -- answers --------------------------------------------------------------
    def send_body(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to tell it

    def send_json(self, status: int, data: dict, headers: dict | None = None) -> None:
        self.send_body(status, json.dumps(data).encode("utf-8"), "application/json; charset=utf-8", headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, unknown method, ...) as JSON, too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.send_json(code, {"error": message or phrase})

    def log_message(self, format, *args):
        log(f"{self.client_address[0]} {format % args}")

    # -- GET ------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        demo: Demo = self.server.demo
        if path in ("/", "/index.html"):
            self.send_body(200, self.server.page, "text/html; charset=utf-8", {
                "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                           "script-src 'unsafe-inline'; connect-src 'self'"})
        elif path == "/api/config":
            self.send_json(200, demo.config())
        elif path == "/favicon.ico":
            self.send_body(204, b"", "image/x-icon")
        elif path.startswith("/api/"):
            self.send_json(405 if path in ("/api/generate", "/api/edit") else 404,
                           {"error": f"{path} takes a POST with a JSON body" if path in ("/api/generate", "/api/edit")
                            else f"no such endpoint: {path}"})
        else:
            self.send_json(404, {"error": f"no such page: {path}"})

    do_HEAD = do_GET

    # -- POST -----------------------------------------------------------------
    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "the request needs a Content-Length header")
        if not re.fullmatch(r"\s*\d{1,15}\s*", length):
            raise RequestError(400, f"bad Content-Length header: {shown(length)}")
        length = int(length)
        if length > MAX_BODY:
            self.close_connection = True
            if length <= MAX_DRAIN:  # read it, so that the client gets the answer, not a reset connection
                try:
                    self.connection.settimeout(5)
                    remaining = length
                    while remaining > 0:
                        chunk = self.rfile.read(min(remaining, 65536))
                        if not chunk:
                            break
                        remaining -= len(chunk)
                except OSError:
                    pass
            raise RequestError(413, f"the request is too large ({length:,} bytes; the limit is {MAX_BODY:,}): "
                                    f"prompts may have at most {MAX_PROMPT_CHARS:,} characters")
        content_type = self.headers.get("Content-Type", "")
        raw = self.rfile.read(length)
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "send the fields as JSON (Content-Type: application/json)")
        if len(raw) != length:
            raise RequestError(400, "the request body ended early")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object of fields")
        return body

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        endpoints = {"/api/generate": "generate", "/api/edit": "edit"}
        try:
            if path not in endpoints:
                self.close_connection = True
                raise RequestError(404, f"no such endpoint: {path}")
            body = self.read_json()
            answer = self.server.demo.handle(endpoints[path], body)
        except RequestError as error:
            headers = {"Retry-After": "1"} if error.status == 503 else None
            self.send_json(error.status, {"error": error.message, **error.extra}, headers)
            return
        except Exception as error:  # never a traceback to the client
            log(f"POST {path} failed: {type(error).__name__}: {one_line(error)}")
            self.send_json(500, {"error": f"internal error ({type(error).__name__}); the server logged it and "
                                          "keeps serving"})
            return
        self.send_json(200, answer)

    def do_PUT(self):
        self.send_json(405, {"error": f"{self.command} is not supported: use GET for the page, POST for the API"})

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: a burst of clients is answered, not reset

    def __init__(self, address, demo: Demo):
        self.demo = demo
        self.page = PAGE.replace("__CONFIG__", json.dumps(demo.config()).replace("</", "<\\/")).encode("utf-8")
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        """socketserver prints a traceback here; one line instead."""
        error = sys.exc_info()[1]
        log(f"request from {client_address[0]} failed: {type(error).__name__}: {one_line(error)}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(pipe, host: str = "127.0.0.1", port: int = 0,
                checkpoint: str | Path = sample.DEMO_CHECKPOINT) -> DemoServer:
    """A ready server around a loaded pipeline (port 0: a free port); call serve_forever()."""
    return DemoServer((host, port), Demo(pipe, checkpoint))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (the default is reachable from this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port (0 = any free port)")
    parser.add_argument("--checkpoint", type=Path, default=sample.DEMO_CHECKPOINT, help="Emage checkpoint folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"error: --port must be between 0 and 65535, got {args.port}", file=sys.stderr)
        return 1
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pipe = sample.Pipeline.load(checkpoint=args.checkpoint, device=device)
    except Exception as error:  # a missing folder, a broken file, an unknown device: one line
        print(f"error: cannot load {args.checkpoint}: {one_line(error)}", file=sys.stderr)
        return 1
    try:
        server = make_server(pipe, args.host, args.port, args.checkpoint)
    except (OSError, OverflowError) as error:
        print(f"error: cannot listen on {args.host}:{args.port} ({one_line(error)}); pass another --port or --host",
              file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: other machines may reach this demo", file=sys.stderr)
    print(f"Emage demo on {server.url} (checkpoint {args.checkpoint}); Ctrl+C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Emage demo: mask-predict rounds</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1rem 1.2rem; color: #222; max-width: 1240px; }
  h1 { font-size: 1.35rem; margin: 0 0 .2rem; }
  h2 { font-size: 1.02rem; margin: 0 0 .5rem; }
  .muted { color: #666; font-size: .88rem; }
  form { display: flex; flex-wrap: wrap; gap: .55rem .9rem; align-items: flex-end; margin: .8rem 0 .6rem; }
  label { display: flex; flex-direction: column; font-size: .82rem; gap: .15rem; }
  label.wide { flex: 1 1 100%; }
  label.check { flex-direction: row; align-items: center; gap: .3rem; padding-bottom: .35rem; }
  input[type=text], select { font: inherit; padding: .32rem .4rem; border: 1px solid #bbb; border-radius: 4px; }
  input.num { width: 5.6rem; }
  button { font: inherit; padding: .35rem .8rem; border-radius: 4px; border: 1px solid #888; background: #f4f4f4; cursor: pointer; }
  button.primary { background: #1f6feb; border-color: #1f6feb; color: #fff; }
  button:disabled { opacity: .55; cursor: wait; }
  #message { min-height: 1.3rem; padding: .35rem .6rem; border-radius: 4px; margin-bottom: .8rem; }
  #message.error { background: #fde8e8; color: #8a1010; }
  #message.busy, #message.warn { background: #fff4d6; color: #6b4e00; }
  #message.ok { background: #e8f6ec; color: #14532d; }
  .panels { display: flex; flex-wrap: wrap; gap: .9rem; align-items: flex-start; }
  .panel { border: 1px solid #ddd; border-radius: 6px; padding: .75rem; }
  .stack { position: relative; width: 256px; height: 256px; }
  .stack > * { position: absolute; left: 0; top: 0; width: 256px; height: 256px; }
  img.pixels { image-rendering: pixelated; background: #eee; width: 256px; height: 256px; display: block; }
  #select-grid { cursor: crosshair; touch-action: none; }
  .row { display: flex; gap: .6rem; }
  .controls { display: flex; flex-wrap: wrap; gap: .3rem; align-items: center; margin-top: .5rem; }
  .controls input[type=range] { flex: 1; min-width: 6rem; }
  .legend { font-size: .8rem; margin: .4rem 0 0; }
  .legend i { display: inline-block; width: .85rem; height: .85rem; vertical-align: -2px; border: 1px solid #999; margin: 0 .2rem 0 .55rem; }
  .legend i:first-child { margin-left: 0; }
  #round-label { font-variant-numeric: tabular-nums; margin: .35rem 0 0; font-size: .9rem; }
</style>
</head>
<body>
<h1>Emage: non-autoregressive text-to-image, round by round</h1>
<p class="muted" id="about"></p>
<form id="form" autocomplete="off">
  <label class="wide">Prompt <input type="text" id="prompt" value="a red circle" spellcheck="false"></label>
  <label>Seed <input type="text" class="num" id="seed" inputmode="numeric"></label>
  <label class="check"><input type="checkbox" id="seed-random"> random</label>
  <label>Steps (T) <input type="text" class="num" id="steps" inputmode="numeric"></label>
  <label>Guidance <input type="text" class="num" id="guidance" inputmode="decimal"></label>
  <label>Temperature <input type="text" class="num" id="temperature" inputmode="decimal"></label>
  <label>Candidates <input type="text" class="num" id="candidates" inputmode="numeric"></label>
  <label>Schedule <select id="schedule"></select></label>
  <button type="submit" class="primary" id="generate">Generate</button>
</form>
<div id="message" role="status" aria-live="polite"></div>
<div class="panels" id="panels" hidden>
  <section class="panel" style="width: 256px">
    <h2>Result</h2>
    <div class="stack">
      <img id="result-image" class="pixels" alt="the generated image">
      <canvas id="select-grid" width="256" height="256" title="drag to mark cells to redraw"></canvas>
    </div>
    <p class="muted" id="timing"></p>
    <p><a id="download" href="#" download="emage.png">Download PNG</a> <span class="muted">(parameters in its text chunk)</span></p>
  </section>
  <section class="panel">
    <h2>Rounds</h2>
    <div class="row">
      <canvas id="token-map" width="256" height="256" title="the token map of the shown round"></canvas>
      <img id="round-image" class="pixels" alt="the image after the shown round">
    </div>
    <div class="controls">
      <button type="button" id="first" title="before the first round">|&#x25C0;</button>
      <button type="button" id="prev" title="previous round">&#x25C0; prev</button>
      <button type="button" id="play">&#x25B6; play</button>
      <button type="button" id="next" title="next round">next &#x25B6;</button>
      <button type="button" id="last" title="the last round">&#x25B6;|</button>
      <input type="range" id="round" min="0" max="1" value="0" aria-label="round">
    </div>
    <p id="round-label"></p>
    <p class="legend"><i style="background:#8a8a8a"></i>masked <i style="background:#2f9e44"></i>new this round
      <i style="background:#e8590c"></i>revised <i style="background:#a5d8ff"></i>unchanged
      <i style="background:#e5dbff"></i>kept (edit)</p>
  </section>
  <section class="panel" style="width: 250px">
    <h2>Redraw a region</h2>
    <p class="muted">Click cells of the result, or drag a rectangle over it, to mark token cells; they are redrawn from this prompt, the rest is kept.</p>
    <label>New prompt <input type="text" id="edit-prompt" spellcheck="false"></label>
    <p id="selection-label" class="muted">no cell marked</p>
    <div class="controls">
      <button type="button" class="primary" id="edit">Redraw marked cells</button>
      <button type="button" id="select-clear">Clear</button>
      <button type="button" id="select-all">All</button>
    </div>
  </section>
</div>
<script>
"use strict";
const CONFIG = __CONFIG__;
const $ = id => document.getElementById(id);
const GH = CONFIG.grid[0], GW = CONFIG.grid[1], N = GH * GW, M = CONFIG.mask_id;
const COLOUR = {masked: "#8a8a8a", new: "#2f9e44", revised: "#e8590c", unchanged: "#a5d8ff", kept: "#e5dbff"};
let current = null;      // the last answer of /api/generate or /api/edit
let states = [];         // states[t][i]: class of cell i after round t (t = 0: before round 1)
let counts = [];
let shown = 0, timer = null, pending = false;
const selected = new Uint8Array(N);
let dragValue = null, dragStart = -1, dragBase = null;

function markRectangle(end) {
  const r0 = Math.floor(dragStart / GW), c0 = dragStart % GW, r1 = Math.floor(end / GW), c1 = end % GW;
  selected.set(dragBase);
  for (let r = Math.min(r0, r1); r <= Math.max(r0, r1); r++)
    for (let c = Math.min(c0, c1); c <= Math.max(c0, c1); c++) selected[r * GW + c] = dragValue;
  drawSelection();
}

function setMessage(text, kind) {
  const box = $("message");
  box.textContent = text || "";
  box.className = text ? (kind || "error") : "";
}

function setPending(on) {
  pending = on;
  for (const id of ["generate", "edit"]) $(id).disabled = on;
}

function fields() {
  return {
    prompt: $("prompt").value,
    seed: $("seed-random").checked ? "random" : $("seed").value.trim(),
    steps: $("steps").value.trim(),
    guidance: $("guidance").value.trim(),
    temperature: $("temperature").value.trim(),
    candidates: $("candidates").value.trim(),
    schedule: $("schedule").value,
  };
}

function promptProblem(text, what) {
  if (!text.trim()) return `the ${what} is empty: type a caption, e.g. "a red circle"`;
  const limit = CONFIG.limits.max_prompt_chars;
  if (text.length > limit)
    return `the ${what} has ${text.length.toLocaleString("en")} characters; at most ${limit.toLocaleString("en")} are allowed`;
  return null;
}

async function call(url, body, doing) {
  if (pending) {
    setMessage("busy: the previous request is still running; try again when it is done", "busy");
    return null;
  }
  setPending(true);
  setMessage(doing + "\u2026", "ok");
  const started = performance.now();
  try {
    let response;
    try {
      response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                   body: JSON.stringify(body)});
    } catch (e) {
      setMessage("the server did not answer: is app.py still running?", "error");
      return null;
    }
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok || !data) {
      const text = (data && data.error) || `the server answered HTTP ${response.status}`;
      setMessage(text, response.status === 503 || response.status === 429 ? "busy" : "error");
      return null;
    }
    data.roundTrip = (performance.now() - started) / 1000;
    return data;
  } finally {
    setPending(false);
  }
}

async function generate() {
  const body = fields();
  const problem = promptProblem(body.prompt, "prompt");
  if (problem) { setMessage(problem, "error"); return; }
  const data = await call("/api/generate", body, "Generating");
  if (data) show(data);
}

async function redraw() {
  if (!current) { setMessage("generate an image first, then mark cells on it to redraw", "error"); return; }
  const cells = [];
  for (let i = 0; i < N; i++) if (selected[i]) cells.push([Math.floor(i / GW), i % GW]);
  if (!cells.length) { setMessage("no cell is marked: click or drag over the result image to mark the cells to redraw", "error"); return; }
  const body = fields();
  body.prompt = $("edit-prompt").value;
  const problem = promptProblem(body.prompt, "new prompt");
  if (problem) { setMessage(problem, "error"); return; }
  body.tokens = current.tokens;
  body.cells = cells;
  const data = await call("/api/edit", body, "Redrawing " + cells.length + " cell" + (cells.length > 1 ? "s" : ""));
  if (data) show(data);
}

function classify(data) {
  const T = data.history.length, kept = data.kept;
  states = []; counts = [];
  let previous = data.initial;
  const first = previous.map((v, i) => (kept && kept[i]) ? "kept" : (v === M ? "masked" : "unchanged"));
  states.push(first);
  for (let t = 0; t < T; t++) {
    const now = data.history[t];
    states.push(now.map((v, i) => {
      if (kept && kept[i]) return "kept";
      if (v === M) return "masked";
      if (previous[i] === M) return "new";
      return v !== previous[i] ? "revised" : "unchanged";
    }));
    previous = now;
  }
  for (const s of states) {
    const c = {masked: 0, new: 0, revised: 0, unchanged: 0, kept: 0};
    for (const k of s) c[k]++;
    counts.push(c);
  }
}

function show(data) {
  stopPlaying();
  current = data;
  $("panels").hidden = false;
  $("result-image").src = "data:image/png;base64," + data.image;
  $("download").href = "data:image/png;base64," + data.download;
  $("download").download = data.filename;
  if (data.random_seed) $("seed").value = data.seed;
  if (!$("edit-prompt").value) $("edit-prompt").value = data.parameters.prompt;
  const T = data.history.length;
  $("timing").textContent = `${data.edit ? "redrawn" : "drawn"} in ${data.seconds.toFixed(2)} s: seed ${data.seed}, ` +
    `${T} round${T > 1 ? "s" : ""} \u00d7 ${data.candidates} candidate${data.candidates > 1 ? "s" : ""}` +
    ` (rounds decoded in ${data.decode_seconds.toFixed(2)} s, ${data.roundTrip.toFixed(2)} s in all)`;
  classify(data);
  $("round").max = String(T);
  setRound(T);
  drawSelection();
  if (data.warning) setMessage(data.warning, "warn");
  else setMessage(`done in ${data.roundTrip.toFixed(2)} s`, "ok");
}

function setRound(t) {
  if (!current) return;
  const T = current.history.length;
  shown = Math.max(0, Math.min(T, t));
  $("round").value = String(shown);
  $("round-image").src = "data:image/png;base64," + current.frames[shown];
  drawTokenMap(shown);
  const c = counts[shown];
  let text = `round ${shown} / ${T}`;
  if (shown === 0) text += current.edit ? `: before round 1, ${c.kept} kept, ${c.masked} masked`
                                        : ": before round 1, every cell masked";
  else text += `: ${c.new} new, ${c.revised} revised, ${c.unchanged} unchanged, ${c.masked} still masked` +
               (current.edit ? `, ${c.kept} kept` : "");
  $("round-label").textContent = text;
}

function drawTokenMap(t) {
  const canvas = $("token-map"), ctx = canvas.getContext("2d");
  const cell = Math.floor(canvas.width / Math.max(GH, GW));
  const values = t === 0 ? current.initial : current.history[t - 1];
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.font = `${Math.max(8, Math.floor(cell / 3.2))}px system-ui, sans-serif`;
  for (let i = 0; i < N; i++) {
    const r = Math.floor(i / GW), c = i % GW, kind = states[t][i];
    ctx.fillStyle = COLOUR[kind];
    ctx.fillRect(c * cell + 1, r * cell + 1, cell - 2, cell - 2);
    if (cell >= 22 && values[i] !== M) {
      ctx.fillStyle = kind === "new" || kind === "revised" ? "#fff" : "#333";
      ctx.fillText(String(values[i]), c * cell + cell / 2, r * cell + cell / 2);
    }
  }
}

function drawSelection() {
  const canvas = $("select-grid"), ctx = canvas.getContext("2d");
  const ch = canvas.height / GH, cw = canvas.width / GW;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "rgba(255,255,255,0.28)";
  ctx.lineWidth = 1;
  for (let r = 1; r < GH; r++) { ctx.beginPath(); ctx.moveTo(0, r * ch + .5); ctx.lineTo(canvas.width, r * ch + .5); ctx.stroke(); }
  for (let c = 1; c < GW; c++) { ctx.beginPath(); ctx.moveTo(c * cw + .5, 0); ctx.lineTo(c * cw + .5, canvas.height); ctx.stroke(); }
  let count = 0;
  for (let i = 0; i < N; i++) {
    if (!selected[i]) continue;
    count++;
    const r = Math.floor(i / GW), c = i % GW;
    ctx.fillStyle = "rgba(255,0,90,0.22)";
    ctx.fillRect(c * cw, r * ch, cw, ch);
    ctx.strokeStyle = "rgba(255,0,90,0.9)";
    ctx.strokeRect(c * cw + 1, r * ch + 1, cw - 2, ch - 2);
  }
  $("selection-label").textContent = count ? `${count} of ${N} cells marked` : "no cell marked";
}

function cellAt(event) {
  const box = $("select-grid").getBoundingClientRect();
  const c = Math.floor((event.clientX - box.left) / box.width * GW);
  const r = Math.floor((event.clientY - box.top) / box.height * GH);
  return (r >= 0 && r < GH && c >= 0 && c < GW) ? r * GW + c : -1;
}

function stopPlaying() {
  if (timer !== null) clearInterval(timer);
  timer = null;
  $("play").innerHTML = "&#x25B6; play";
}

function togglePlay() {
  if (!current) return;
  if (timer !== null) { stopPlaying(); return; }
  const T = current.history.length;
  if (shown >= T) setRound(0);
  $("play").innerHTML = "&#x25A0; pause";
  timer = setInterval(() => { if (shown >= T) stopPlaying(); else setRound(shown + 1); }, Math.max(60, Math.min(500, 6000 / T)));
}

function init() {
  const d = CONFIG.defaults;
  $("seed").value = String(d.seed);
  for (const k of ["steps", "guidance", "temperature", "candidates"]) $(k).value = String(d[k]);
  for (const s of CONFIG.schedules) { const o = document.createElement("option"); o.textContent = s; $("schedule").appendChild(o); }
  $("schedule").value = d.schedule;
  $("about").textContent = `Checkpoint ${CONFIG.checkpoint} (variant ${CONFIG.variant ?? "?"}): ` +
    `${CONFIG.image_size[1]} \u00d7 ${CONFIG.image_size[0]} px from a token grid of ${GH} \u00d7 ${GW}, ` +
    `filled in T parallel rounds; the image is the best of the candidates by the model's self-score.`;
  $("form").addEventListener("submit", e => { e.preventDefault(); generate(); });
  $("edit").addEventListener("click", redraw);
  $("first").addEventListener("click", () => { stopPlaying(); setRound(0); });
  $("prev").addEventListener("click", () => { stopPlaying(); setRound(shown - 1); });
  $("next").addEventListener("click", () => { stopPlaying(); setRound(shown + 1); });
  $("last").addEventListener("click", () => { stopPlaying(); if (current) setRound(current.history.length); });
  $("play").addEventListener("click", togglePlay);
  $("round").addEventListener("input", () => { stopPlaying(); setRound(Number($("round").value)); });
  $("select-clear").addEventListener("click", () => { selected.fill(0); drawSelection(); });
  $("select-all").addEventListener("click", () => { selected.fill(1); drawSelection(); });
  const grid = $("select-grid");
  grid.addEventListener("pointerdown", e => {  // a click toggles a cell; a drag sets the rectangle it spans
    const i = cellAt(e);
    if (i < 0) return;
    dragValue = selected[i] ? 0 : 1;
    dragStart = i;
    dragBase = selected.slice();
    grid.setPointerCapture(e.pointerId);
    markRectangle(i);
    e.preventDefault();
  });
  grid.addEventListener("pointermove", e => {
    if (dragValue === null) return;
    const i = cellAt(e);
    if (i >= 0) markRectangle(i);
  });
  for (const type of ["pointerup", "pointercancel"]) grid.addEventListener(type, () => { dragValue = null; });
  drawSelection();
}
init();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
