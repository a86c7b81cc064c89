"""The shapes world: Emage's embedded synthetic text-image data set.

A tiny world of coloured circles, squares and triangles on black, small enough
to train the whole pipeline on a CPU and exact enough that a program can say
whether a generated image shows what its caption asks for. It plays the role
that zero-shot MS-COCO FID plays in the paper (Section 4). The contract is
`SHAPES.md`; this file is its executable form:

    render(caption, seed)   -> 64x64 RGB PIL image
    parse(caption)          -> Caption (strict grammar, ShapesError otherwise)
    sample_caption(rng)     -> a caption from the grammar (held-out pairs excluded for "train")
    score(image, caption)   -> bool, and score_details(...) for debugging
    eval_captions()         -> the fixed evaluation list

Command line:
    python shapes.py grid --out grid.png      a labelled grid of random renders
    python shapes.py score DIR                accuracy of a folder of generated PNGs
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from files import FileError, atomic_write, check_output, open_image, png_text, read_json

IMAGE_SIZE = 64
COLORS = {  # exact RGB used when rendering (SHAPES.md, Palette)
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 22}  # bounding-box side in pixels
SIZE_JITTER = 1  # the renderer may vary a side by +-1 px
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
HELD_OUT = frozenset({("purple", "triangle"), ("yellow", "square"), ("cyan", "circle")})
MIN_GAP = 2  # px of background between two bounding boxes
RELATION_OFFSET = 16  # px between centres along the relation's axis when rendering
SCORE_MARGIN = 4  # px the scorer asks for along the relation's axis

# Scorer constants (SHAPES.md, "Scoring").
MAX_COLOR_DISTANCE = 90
MIN_BRIGHTNESS = 60
MIN_COMPONENT = 20
SQUARE_FILL = 0.86
CIRCLE_FILL = 0.66
SMALL_MAX_SIDE = 17

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (6, 3)
_COLOR_NAMES = list(COLORS)


class ShapesError(ValueError):
    """A caption outside the shapes grammar, or another user error in this module."""


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str | None = None  # None: the caption leaves the size open

    def __str__(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.color, self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Caption:
    objects: tuple[Obj, ...]  # one or two objects
    relation: str | None = None  # set iff there are two objects

    def __str__(self) -> str:
        if self.relation is None:
            return str(self.objects[0])
        return f"{self.objects[0]} {self.relation} {self.objects[1]}"

    @property
    def is_novel(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT for o in self.objects)


# ---------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace, no final period."""
    text = " ".join(text.split()).lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


class _Words:
    """A cursor over the words of a caption that reports the first unexpected one."""

    def __init__(self, text: str):
        self.words = text.split(" ") if text else []
        self.i = 0

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, allowed, what: str) -> str:
        word = self.peek()
        if word is None:
            raise ShapesError(f"caption ends early: expected {what} ({' | '.join(allowed)})")
        if word not in allowed:
            raise ShapesError(
                f"unexpected word {word!r} (word {self.i + 1}): expected {what} ({' | '.join(allowed)})")
        self.i += 1
        return word


def _parse_object(words: _Words) -> Obj:
    words.take(("a",), "the article")
    size = words.peek() if words.peek() in SIZES else None
    if size:
        words.i += 1
    color = words.take(tuple(COLORS), "a size or colour" if size is None else "a colour")
    shape = words.take(SHAPES, "a shape")
    return Obj(color, shape, size)


def _parse_relation(words: _Words) -> str:
    first = words.take(("to", "above", "below"), "a relation or the end of the caption")
    if first != "to":
        return first
    side = words.take(("the",), "'the'")
    side = words.take(("left", "right"), "'left' or 'right'")
    words.take(("of",), "'of'")
    return f"to the {side} of"


def parse(text: str) -> Caption:
    """Parse a caption strictly (SHAPES.md grammar); ShapesError names the first unexpected word."""
    if not isinstance(text, str):
        raise ShapesError(f"a caption must be a string, got {type(text).__name__}")
    words = _Words(normalise(text))
    if words.peek() is None:
        raise ShapesError("empty caption: write e.g. 'a red circle to the left of a blue square'")
    first = _parse_object(words)
    if words.peek() is None:
        return Caption((first,))
    relation = _parse_relation(words)
    second = _parse_object(words)
    if words.peek() is not None:
        raise ShapesError(f"unexpected word {words.peek()!r} (word {words.i + 1}): the caption should end here")
    if (first.color, first.shape) == (second.color, second.shape):
        raise ShapesError("the two objects of a caption must differ in colour or shape")
    return Caption((first, second), relation)


def is_novel(caption: str | Caption) -> bool:
    """True if the caption names a held-out colour-shape pair."""
    return (parse(caption) if isinstance(caption, str) else caption).is_novel


def mirrored(caption: str | Caption) -> str | None:
    """The caption with its relation reversed ("A to the left of B" -> "A to the right of B"),
    which the picture of the caption must not match; None for a one-object caption."""
    parsed = parse(caption) if isinstance(caption, str) else caption
    return None if parsed.relation is None else str(Caption(parsed.objects, OPPOSITE[parsed.relation]))


def contrast_for(text: str) -> str | None:
    """The caption a picture of `text` must not match, for re-ranking (extensions.self_score's
    contrast): the mirrored caption for a shapes caption with a relation, else None (any text)."""
    try:
        return mirrored(text)
    except ShapesError:
        return None


def _random_object(rng: random.Random, split: str) -> Obj:
    while True:
        obj = Obj(rng.choice(_COLOR_NAMES), rng.choice(SHAPES), rng.choice((None, "small", "large")))
        novel = (obj.color, obj.shape) in HELD_OUT
        if split != "train" or not novel:
            return obj


def sample_caption(rng: random.Random, split: str = "train") -> str:
    """Draw a caption from the grammar.

    split="train" never names a held-out pair and never yields a two-object
    evaluation caption; "novel" always names at least one held-out pair; "any"
    is the whole grammar.
    """
    if split not in ("train", "novel", "any"):
        raise ShapesError(f"unknown split {split!r}: use train, novel or any")
    while True:
        objects = [_random_object(rng, split)]
        relation = None
        if rng.random() < 0.5:
            objects.append(_random_object(rng, split))
            relation = rng.choice(RELATIONS)
            if (objects[0].color, objects[0].shape) == (objects[1].color, objects[1].shape):
                continue
        caption = Caption(tuple(objects), relation)
        if split == "novel" and not caption.is_novel:
            continue
        text = str(caption)
        if split == "train" and relation is not None and text in _eval_two_object():
            continue
        return text


def eval_captions() -> list[str]:
    """The fixed evaluation list: 240 captions (160 seen, 80 novel), one- and two-object.

    Two-object evaluation captions never occur in the training stream. The
    one-object grammar has only 45 seen captions, so those do occur in
    training; for them only the generated image is new.
    """
    return list(_eval_list())


_EVAL_CACHE: tuple[str, ...] | None = None


def _eval_list() -> tuple[str, ...]:
    global _EVAL_CACHE
    if _EVAL_CACHE is None:
        rng = random.Random(20230101)
        # (novel, objects) -> count. The one-object grammar holds only 45 seen and 9 novel captions.
        quotas = {(False, 1): 40, (False, 2): 120, (True, 1): 9, (True, 2): 71}
        chosen: list[str] = []
        seen: set[str] = set()
        while any(quotas.values()):
            objects = [_random_object(rng, "any")]
            if rng.random() < 0.5:
                objects.append(_random_object(rng, "any"))
            if len(objects) == 2 and (objects[0].color, objects[0].shape) == (objects[1].color, objects[1].shape):
                continue
            caption = Caption(tuple(objects), rng.choice(RELATIONS) if len(objects) == 2 else None)
            key = (caption.is_novel, len(objects))
            text = str(caption)
            if quotas[key] and text not in seen:
                quotas[key] -= 1
                seen.add(text)
                chosen.append(text)
        _EVAL_CACHE = tuple(chosen)
    return _EVAL_CACHE


def _eval_two_object() -> frozenset[str]:
    return frozenset(c for c in _eval_list() if " of " in c or " above " in c or " below " in c)


# ---------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    x: int  # left column
    y: int  # top row
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x + self.side / 2, self.y + self.side / 2)

    def separated(self, other: "Box", gap: int = MIN_GAP) -> bool:
        """At least `gap` background pixels between the two boxes along some axis."""
        return (self.x + self.side + gap <= other.x or other.x + other.side + gap <= self.x
                or self.y + self.side + gap <= other.y or other.y + other.side + gap <= self.y)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """Does centre a stand in `relation` to centre b by at least `margin` px? (y grows downwards)"""
    (ax, ay), (bx, by) = a, b
    return {
        "to the left of": ax + margin <= bx,
        "to the right of": ax >= bx + margin,
        "above": ay + margin <= by,
        "below": ay >= by + margin,
    }[relation]


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a filled shape, sampled at pixel centres."""
    c = (np.arange(side) + 0.5)  # pixel centres
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        r = side / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    # Isosceles triangle: apex at the top middle, base along the bottom edge.
    half_width = yy / side * (side / 2)
    return np.abs(xx - side / 2) <= half_width + 0.25


def _draw_size(rng: random.Random, obj: Obj, jitter: bool = True) -> int:
    size = obj.size or rng.choice(tuple(SIZES))
    jittered = SIZES[size] + rng.randint(-SIZE_JITTER, SIZE_JITTER)  # drawn either way: same stream
    return jittered if jitter else SIZES[size]


def _place(rng: random.Random, caption: Caption, align: int = 1, jitter: bool = True) -> list[Box]:
    sides = [_draw_size(rng, o, jitter) for o in caption.objects]
    corner = lambda side: align * rng.randint(0, (IMAGE_SIZE - side) // align)  # noqa: E731
    for _ in range(10_000):
        boxes = [Box(corner(s), corner(s), s) for s in sides]
        if len(boxes) == 1:
            return boxes
        a, b = boxes
        if a.separated(b) and relation_holds(a.centre, b.centre, caption.relation, RELATION_OFFSET):
            return boxes
    raise AssertionError(f"could not place {caption}")  # unreachable for the grammar's sizes


def render(caption: str | Caption, seed: int, align: int = 1, jitter: bool = True) -> Image.Image:
    """Render a caption as a 64x64 RGB image; the same arguments give the same pixels.

    align > 1 puts every bounding box's top-left corner on multiples of `align` px (8 = the
    token grid of the shapes tokenizer), and jitter=False draws the sizes without their
    +-1 px jitter. Either way the image stays in this world and passes the scorer, but
    with both an object is the same block of tokens wherever it is (train.py
    --shapes-align, --no-shapes-jitter). The defaults are SHAPES.md's free placement.
    """
    parsed = parse(caption) if isinstance(caption, str) else caption
    return draw(parsed.objects, layout(parsed, seed, align, jitter))


def layout(caption: str | Caption, seed: int, align: int = 1, jitter: bool = True) -> list[Box]:
    """The bounding boxes `render` draws the caption's objects in, in caption order."""
    if not 1 <= align <= 8:
        raise ShapesError(f"align must be between 1 and 8 px, got {align}")
    parsed = parse(caption) if isinstance(caption, str) else caption
    return _place(random.Random(f"{seed}:{parsed}"), parsed, align, jitter)


def draw(objects: tuple[Obj, ...], boxes: list[Box]) -> Image.Image:
    """Objects drawn filled in their boxes on the black canvas."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for obj, box in zip(objects, boxes):
        mask = _shape_mask(obj.shape, box.side)
        canvas[box.y:box.y + box.side, box.x:box.x + box.side][mask] = COLORS[obj.color]
    return Image.fromarray(canvas, "RGB")


# ---------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    area: int
    fill: float

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2)

    def matches(self, obj: Obj) -> bool:
        return self.color == obj.color and self.shape == obj.shape and obj.size in (None, self.size)


# What went wrong, by kind (ScoreResult.kind; score_details decides which).
FAILURE_KINDS = {
    "count": "too many or too few objects",
    "binding": "the caption's colours and shapes are all there, paired the other way",
    "colour": "an object has a colour the caption does not ask for (its shape may be off too)",
    "shape": "an object has a shape the caption does not ask for",
    "size": "colour and shape right, the size word wrong",
    "swapped": "the right objects, in the opposite relation (A left of B drawn as B left of A)",
    "relation": "the right objects, neither in the relation nor in its opposite",
}


@dataclass(frozen=True)
class ScoreResult:
    passed: bool
    detections: tuple[Detection, ...]
    reason: str  # why it failed, or "ok"
    kind: str = "ok"  # a key of FAILURE_KINDS, or "ok"


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        image = open_image(image)  # bounded; an unreadable file is a files.FileError
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
        return np.asarray(image)
    array = np.asarray(image)
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        return _as_array(Image.fromarray(array.astype(np.uint8)))
    return array


def detect(image) -> list[Detection]:
    """Objects in an image, by the rules of SHAPES.md ("Scoring", steps 1-3)."""
    pixels = _as_array(image).astype(np.float32)  # (64, 64, 3)
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (64, 64, 6)
    label = distance.argmin(-1)
    background = (distance.min(-1) > MAX_COLOR_DISTANCE) | (pixels.max(-1) < MIN_BRIGHTNESS)
    found = []
    for index, name in enumerate(_COLOR_NAMES):
        components, count = ndimage.label((label == index) & ~background)  # 4-connectivity
        for k, where in enumerate(ndimage.find_objects(components), start=1):
            area = int((components[where] == k).sum())
            if area < MIN_COMPONENT:
                continue
            h = where[0].stop - where[0].start
            w = where[1].stop - where[1].start
            fill = area / (w * h)
            shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"
            size = "small" if max(w, h) < SMALL_MAX_SIDE else "large"
            bbox = (where[1].start, where[0].start, where[1].stop - 1, where[0].stop - 1)
            found.append(Detection(name, shape, size, bbox, area, fill))
    return found


def score_details(image, caption: str | Caption) -> ScoreResult:
    """Score an image against its caption and say why it failed (SHAPES.md, step 4)."""
    parsed = parse(caption) if isinstance(caption, str) else caption
    found = tuple(detect(image))
    if len(found) != len(parsed.objects):
        return ScoreResult(False, found, f"found {len(found)} objects, the caption has {len(parsed.objects)}", "count")
    orders = [found] if len(found) == 1 else [found, found[::-1]]
    for order in orders:
        if not all(d.matches(o) for d, o in zip(order, parsed.objects)):
            continue
        if parsed.relation is None or relation_holds(order[0].centre, order[1].centre,
                                                     parsed.relation, SCORE_MARGIN):
            return ScoreResult(True, found, "ok")
        swapped = relation_holds(order[0].centre, order[1].centre, OPPOSITE[parsed.relation], SCORE_MARGIN)
        return ScoreResult(False, found, f"objects found but not {parsed.relation} each other",
                           "swapped" if swapped else "relation")
    wanted = ", ".join(str(o) for o in parsed.objects)
    got = ", ".join(f"a {d.size} {d.color} {d.shape}" for d in found)
    return ScoreResult(False, found, f"wanted {wanted}; found {got}", _attribute_failure(found, parsed.objects))


def _attribute_failure(found: tuple[Detection, ...], objects: tuple[Obj, ...]) -> str:
    """Which attribute is off when no pairing of detections and objects matches."""
    colours_right = sorted(d.color for d in found) == sorted(o.color for o in objects)
    shapes_right = sorted(d.shape for d in found) == sorted(o.shape for o in objects)
    pairs_right = sorted((d.color, d.shape) for d in found) == sorted((o.color, o.shape) for o in objects)
    if pairs_right:
        return "size"
    if colours_right and shapes_right:
        return "binding"
    return "shape" if colours_right else "colour"


def score(image, caption: str | Caption) -> bool:
    """True iff the image shows what the caption says (SHAPES.md, "Scoring")."""
    return score_details(image, caption).passed


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def caption_of_png(path: Path) -> str | None:
    """The caption of a generated PNG: its `caption` or `parameters` text chunk, or a sidecar JSON.
    Both are read bounded (files.png_text decodes no pixel and caps every text chunk;
    files.read_json caps the sidecar); a file that is not a PNG raises files.FileError."""
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        data = read_json(sidecar)
        caption = (data.get("caption") or data.get("prompt")) if isinstance(data, dict) else None
        return caption if isinstance(caption, str) else None
    text = png_text(path)
    if "caption" in text:
        return text["caption"]
    if "parameters" in text:
        try:
            caption = json.loads(text["parameters"]).get("prompt")
        except (ValueError, AttributeError, RecursionError):
            return None
        return caption if isinstance(caption, str) else None
    return None


def accuracy_report(results: list[tuple[str, bool]]) -> dict:
    """Accuracy for seen and novel captions from (caption, passed) pairs."""
    report = {}
    for split in ("seen", "novel", "all"):
        chosen = [ok for c, ok in results if split == "all" or is_novel(c) == (split == "novel")]
        report[split] = {"accuracy": sum(chosen) / len(chosen) if chosen else float("nan"), "count": len(chosen)}
    return report


def standard_error(accuracy: float, count: int) -> float:
    """One standard error of an accuracy measured on `count` pairs: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / count) if count else float("nan")


def failure_report(results: list[tuple[str, str]]) -> dict:
    """From (caption, ScoreResult.kind) pairs: per split, the fraction of pairs failing by each kind."""
    report = {}
    for split in ("seen", "novel"):
        kinds = [kind for c, kind in results if is_novel(c) == (split == "novel")]
        report[split] = {k: sum(kind == k for kind in kinds) / len(kinds) for k in FAILURE_KINDS} if kinds else {}
    return report


def format_report(report: dict) -> str:
    return "  ".join(f"{k}: {v['accuracy']:.3f} (n={v['count']})" for k, v in report.items())


def cmd_grid(args) -> None:
    check_output(args.out, args.overwrite)
    rng = random.Random(args.seed)
    cell, label_h, cols = 64 * args.scale, 40, args.cols
    rows = math.ceil(args.n / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i in range(args.n):
        caption = sample_caption(rng, args.split)
        image = render(caption, seed=rng.randrange(2**31)).resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        sheet.paste(image, (x, y))
        draw.multiline_text((x + 3, y + cell + 2), _wrap(caption, 30), fill="black", font=font)
    atomic_write(args.out, lambda tmp: sheet.save(tmp, format="PNG"))
    print(f"wrote {args.out} ({args.n} captions, split {args.split})")


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def cmd_score(args) -> None:
    if not args.dir.is_dir():
        raise ShapesError(f"{args.dir} is not a folder of PNG files")
    results, skipped = [], 0
    for path in sorted(args.dir.glob("*.png")):
        caption = caption_of_png(path)
        if caption is None:
            skipped += 1
            continue
        result = score_details(path, caption)
        results.append((caption, result.passed))
        if args.verbose and not result.passed:
            print(f"{path.name}: FAIL {caption!r}: {result.reason}")
    if not results:
        raise ShapesError(f"no PNG in {args.dir} carries a caption (text chunk 'caption'/'parameters' or a sidecar .json)")
    print(format_report(accuracy_report(results)) + (f"  (skipped {skipped} without caption)" if skipped else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    grid = sub.add_parser("grid", help="a labelled grid of random renders",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    grid.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG to write")
    grid.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    grid.add_argument("--n", type=int, default=16, help="number of captions")
    grid.add_argument("--cols", type=int, default=4, help="images per row")
    grid.add_argument("--scale", type=int, default=3, help="pixel upscaling for viewing")
    grid.add_argument("--seed", type=int, default=0, help="random seed")
    grid.add_argument("--split", default="any", choices=("train", "novel", "any"), help="caption split")
    grid.set_defaults(run=cmd_grid)
    scorer = sub.add_parser("score", help="accuracy of a folder of generated PNGs",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scorer.add_argument("dir", type=Path, help="folder of PNGs carrying their captions")
    scorer.add_argument("--verbose", action="store_true", help="print why each failing image failed")
    scorer.set_defaults(run=cmd_score)
    args = parser.parse_args(argv)
    if getattr(args, "n", 1) < 1 or getattr(args, "cols", 1) < 1 or getattr(args, "scale", 1) < 1:
        parser.error("--n, --cols and --scale must be positive")
    try:
        args.run(args)
    except (ShapesError, FileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
