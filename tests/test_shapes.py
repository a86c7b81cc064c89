"""The shapes world follows its contract, SHAPES.md."""
import json
import random
from collections import deque

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import shapes

N_RENDERS = 1000


@pytest.fixture(scope="module")
def renders():
    rng = random.Random(1234)
    captions = [shapes.sample_caption(rng, "any") for _ in range(N_RENDERS)]
    return [(c, shapes.render(c, seed=i)) for i, c in enumerate(captions)]


def test_scorer_passes_ground_truth(renders):
    passed = sum(shapes.score(image, caption) for caption, image in renders)
    assert passed / len(renders) >= 0.99


def test_scorer_rejects_other_captions(renders):
    rng = random.Random(99)
    wrong = 0
    for caption, image in renders:
        other = shapes.sample_caption(rng, "any")
        while other == caption:
            other = shapes.sample_caption(rng, "any")
        wrong += shapes.score(image, other)
    assert wrong / len(renders) <= 0.02


def test_render_is_deterministic_and_exact():
    a = np.asarray(shapes.render("a small red circle to the left of a blue square", seed=7))
    b = np.asarray(shapes.render("a small red circle to the left of a blue square", seed=7))
    c = np.asarray(shapes.render("a small red circle to the left of a blue square", seed=8))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    colours = {tuple(p) for p in a.reshape(-1, 3)}
    assert colours == {(0, 0, 0), shapes.COLORS["red"], shapes.COLORS["blue"]}


def _boxes(image, caption):
    """Bounding boxes (x0, y0, x1, y1 inclusive) of each caption object, found by its exact colour."""
    pixels = np.asarray(image)
    out = []
    for obj in shapes.parse(caption).objects:
        ys, xs = np.nonzero((pixels == shapes.COLORS[obj.color]).all(-1))
        out.append((xs.min(), ys.min(), xs.max(), ys.max()))
    return out


def test_placement_rules():
    rng = random.Random(5)
    for seed in range(300):
        objects = [shapes.Obj(rng.choice(list(shapes.COLORS)), s, rng.choice(["small", "large"]))
                   for s in rng.sample(shapes.SHAPES, 2)]  # distinct shapes: each colour region is one object
        if objects[0].color == objects[1].color:
            continue
        relation = rng.choice(shapes.RELATIONS)
        caption = str(shapes.Caption(tuple(objects), relation))
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _boxes(shapes.render(caption, seed), caption)
        gap = max(bx0 - ax1 - 1, ax0 - bx1 - 1, by0 - ay1 - 1, ay0 - by1 - 1)
        assert gap >= shapes.MIN_GAP, caption
        a = ((ax0 + ax1 + 1) / 2, (ay0 + ay1 + 1) / 2)
        b = ((bx0 + bx1 + 1) / 2, (by0 + by1 + 1) / 2)
        # Triangles lose at most their top row when sampled, so allow 1 px on the centre.
        assert shapes.relation_holds(a, b, relation, shapes.RELATION_OFFSET - 1), caption
        for x0, y0, x1, y1 in ((ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1)):
            assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64


@pytest.mark.parametrize("size, low, high", [("small", 11, 13), ("large", 21, 23)])
def test_sizes(size, low, high):
    for seed in range(30):
        (x0, y0, x1, y1), = _boxes(shapes.render(f"a {size} green square", seed), f"a {size} green square")
        assert low <= x1 - x0 + 1 <= high and x1 - x0 == y1 - y0


@pytest.mark.parametrize("caption, message", [
    ("", "empty caption"),
    ("   ", "empty caption"),
    ("a red circle left of a blue square", "unexpected word 'left' (word 4)"),
    ("a huge red circle", "unexpected word 'huge' (word 2)"),
    ("a red hexagon", "unexpected word 'hexagon' (word 3)"),
    ("an red circle", "unexpected word 'an' (word 1)"),
    ("a red circle above", "caption ends early"),
    ("a red circle above a blue square and more", "unexpected word 'and' (word 8)"),
    ("a red circle to the top of a blue square", "unexpected word 'top' (word 6)"),
    ("a red circle above a small red circle", "must differ"),
])
def test_parse_rejects(caption, message):
    with pytest.raises(shapes.ShapesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shapes.parse(caption)


@pytest.mark.parametrize("text", [
    "A RED Circle to the LEFT of a blue square.",
    "  a red   circle to the left of a blue square  ",
    "a red circle to the left of a blue square .",
])
def test_parse_normalises(text):
    assert str(shapes.parse(text)) == "a red circle to the left of a blue square"


def test_mirrored_caption_is_drawn_by_the_swapped_layout():
    caption = "a small red circle above a blue square"
    assert shapes.mirrored(caption) == "a small red circle below a blue square"
    assert shapes.mirrored(shapes.mirrored("A red circle to the LEFT of a blue square")) == \
        "a red circle to the left of a blue square"
    assert shapes.mirrored("a red circle") is None
    for seed in range(5):  # a picture of the mirrored caption is the caption's swapped failure
        assert shapes.score_details(shapes.render(shapes.mirrored(caption), seed), caption).kind == "swapped"
    with pytest.raises(shapes.ShapesError):
        shapes.mirrored("a red banana")


def test_train_stream_never_names_held_out_pairs():
    rng = random.Random(0)
    evaluation = set(shapes.eval_captions())
    for _ in range(100_000):
        caption = shapes.parse(shapes.sample_caption(rng, "train"))
        assert not caption.is_novel
        if caption.relation:
            assert str(caption) not in evaluation


def test_eval_captions_fixed_and_balanced():
    captions = shapes.eval_captions()
    assert captions == shapes.eval_captions() and len(captions) >= 200 and len(set(captions)) == len(captions)
    kinds = {(shapes.is_novel(c), len(shapes.parse(c).objects)) for c in captions}
    assert kinds == {(False, 1), (False, 2), (True, 1), (True, 2)}


# An independent scorer written from SHAPES.md alone: pure Python flood fill, no scipy.
PALETTE = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
           "yellow": (240, 220, 40), "purple": (160, 60, 210), "cyan": (40, 210, 220)}


def independent_score(image: Image.Image, caption: str) -> bool:
    px = np.asarray(image.convert("RGB").resize((64, 64), Image.NEAREST)).astype(int).tolist()
    names = list(PALETTE)
    cls = [[None] * 64 for _ in range(64)]
    for y in range(64):
        for x in range(64):
            r, g, b = px[y][x]
            d = [((r - c[0]) ** 2 + (g - c[1]) ** 2 + (b - c[2]) ** 2) ** 0.5 for c in PALETTE.values()]
            if min(d) <= 90 and max(r, g, b) >= 60:
                cls[y][x] = names[d.index(min(d))]
    seen, comps = set(), []
    for y in range(64):
        for x in range(64):
            if cls[y][x] is None or (x, y) in seen:
                continue
            queue, cells = deque([(x, y)]), []
            seen.add((x, y))
            while queue:
                cx, cy = queue.popleft()
                cells.append((cx, cy))
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    if 0 <= nx < 64 and 0 <= ny < 64 and (nx, ny) not in seen and cls[ny][nx] == cls[cy][cx]:
                        seen.add((nx, ny))
                        queue.append((nx, ny))
            if len(cells) < 20:
                continue
            xs, ys = [c[0] for c in cells], [c[1] for c in cells]
            w, h = max(xs) - min(xs) + 1, max(ys) - min(ys) + 1
            fill = len(cells) / (w * h)
            comps.append({"color": cls[y][x], "size": "small" if max(w, h) < 17 else "large",
                          "shape": "square" if fill >= 0.86 else "circle" if fill >= 0.66 else "triangle",
                          "cx": min(xs) + w / 2, "cy": min(ys) + h / 2})
    words = caption.split(" ")
    objects, relation, i = [], None, 0
    while i < len(words):
        if words[i] == "a":
            size = words[i + 1] if words[i + 1] in ("small", "large") else None
            j = i + (2 if size else 1)
            objects.append((size, words[j], words[j + 1]))
            i = j + 2
        else:
            relation = "left" if words[i + 2:i + 3] == ["left"] else "right" if words[i + 2:i + 3] == ["right"] \
                else words[i]
            i += 4 if words[i] == "to" else 1
    if len(comps) != len(objects):
        return False

    def fits(c, o):
        return c["color"] == o[1] and c["shape"] == o[2] and (o[0] is None or o[0] == c["size"])

    pairs = [(comps[0],)] if len(objects) == 1 else [(comps[0], comps[1]), (comps[1], comps[0])]
    for pair in pairs:
        if all(fits(c, o) for c, o in zip(pair, objects)):
            if len(objects) == 1:
                return True
            a, b = pair
            if {"left": a["cx"] + 4 <= b["cx"], "right": a["cx"] >= b["cx"] + 4,
                    "above": a["cy"] + 4 <= b["cy"], "below": a["cy"] >= b["cy"] + 4}[relation]:
                return True
    return False


def test_independent_scorer_agrees(renders):
    rng = random.Random(3)
    for caption, image in renders[:150]:
        other = shapes.sample_caption(rng, "any")
        for text in (caption, other):
            assert independent_score(image, text) == shapes.score(image, text), (caption, text)


def test_scorer_on_damaged_images():
    caption = "a large blue square above a small red triangle"
    image = np.asarray(shapes.render(caption, 3)).copy()
    assert shapes.score(image, caption)
    noisy = image.copy()
    noisy[:3, :3] = (255, 255, 255)  # a 9-pixel blob is noise, ignored
    assert shapes.score(noisy, caption)
    blank = np.zeros_like(image)
    result = shapes.score_details(blank, caption)
    assert not result.passed and "found 0 objects" in result.reason


def test_failures_are_sorted_by_kind():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[10:22, 10:22] = shapes.COLORS["red"]
    image[40:52, 10:22][shapes._shape_mask("circle", 12)] = shapes.COLORS["blue"]  # below, same column
    kinds = {caption: shapes.score_details(image, caption).kind for caption in [
        "a red square above a blue circle", "a red square below a blue circle",
        "a red square to the left of a blue circle", "a blue square above a red circle",
        "a red triangle above a blue circle", "a green square above a blue circle",
        "a large red square above a blue circle", "a red square"]}
    assert list(kinds.values()) == ["ok", "swapped", "relation", "binding", "shape", "colour", "size", "count"]
    assert set(kinds.values()) - {"ok"} == set(shapes.FAILURE_KINDS)
    report = shapes.failure_report([("a red square", "ok"), ("a blue circle", "count"),
                                    ("a green circle", "count"), ("a cyan circle", "binding")])
    assert report["seen"]["count"] == 2 / 3 and report["seen"]["binding"] == 0
    assert report["novel"]["binding"] == 1.0 and sum(report["novel"].values()) == 1.0


def test_score_cli(tmp_path, capsys):
    captions = ["a red circle", "a yellow square above a green triangle", "a purple triangle"]
    for i, caption in enumerate(captions):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps({"prompt": caption}))
        shapes.render(caption, i).save(tmp_path / f"{i}.png", pnginfo=info)
    shapes.render("a blue circle", 0).save(tmp_path / "sidecar.png")
    (tmp_path / "sidecar.json").write_text(json.dumps({"caption": "a green square"}))
    assert shapes.main(["score", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seen: 0.500 (n=2)" in out and "novel: 1.000 (n=2)" in out
    assert shapes.main(["score", str(tmp_path / "missing")]) == 1


def test_score_reads_user_files_bounded_and_fails_in_one_line(tmp_path, capsys):
    """A path handed to the scorer is read with files.open_image: an image over the pixel limit is
    refused from its header, and `shapes.py score` reports it in one line."""
    import files

    Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")  # 72 MP, a small file
    (tmp_path / "huge.json").write_text(json.dumps({"caption": "a red circle"}))
    with pytest.raises(files.FileError, match="over the limit"):
        shapes.score(tmp_path / "huge.png", "a red circle")
    assert shapes.main(["score", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "huge.png" in err and err.count("\n") == 1
    shapes.render("a red circle", 0).save(tmp_path / "ok.png")
    assert shapes.score(tmp_path / "ok.png", "a red circle") and not shapes.score(tmp_path / "ok.png", "a blue circle")


def test_grid_writes_a_new_file_and_replaces_one_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert shapes.main(["grid", "--out", str(out), "--n", "2"]) in (0, None)
    first = out.read_bytes()
    out.write_bytes(b"the user's own picture")
    assert shapes.main(["grid", "--out", str(out), "--n", "2"]) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"the user's own picture"
    assert shapes.main(["grid", "--out", str(out), "--n", "2", "--overwrite"]) in (0, None)
    assert out.read_bytes() == first
