"""Hostile inputs outside the catalogue of tests/test_reliability.py, generated (hypothesis).

One test per class of hostile input; each example is handed to every command-line entry
point that can meet it:

1. config.json of a generator checkpoint (sample.py, export_onnx.py, train.py --init and
   --resume, app.py, eval_fid.py shapes), of a VQGAN folder (vqgan.py reconstruct /
   convert, sample.py --vqgan, data.py prepare, train.py --vqgan, export_onnx.py through
   its checkpoint, shapes_tokenizers.py eval / train --resume), of an ONNX export
   (sample.py --backend onnx), of a converted CLIP (clip_image.py score / convert, sample.py
   --rerank clip) and meta.json and files of token shards (train.py --data, data.py show):
   fields of the wrong type, out of range (ten million layers, a 100,000 x
   100,000 grid), NaN and infinity, strings outside their choice set, missing and unknown
   fields, garbage JSON, and in-range values that do not fit the weights.
2. images: decompression bombs (PNG, GIF, BMP, JPEG headers claiming up to 2**31 pixels a
   side), PNG zTXt / iTXt text bombs, garbage bytes behind real magic numbers, truncated
   real files (sample.py --init-image / --mask / an existing --out, vqgan.py reconstruct,
   clip_image.py score, shapes.py score, data.py prepare of a folder and of a tar).
3. numbers on the command line: NaN, infinity, negative, zero and huge values of every
   numeric flag of sample.py, train.py (with --set fields), data.py, export_onnx.py,
   vqgan.py, clip_image.py, shapes_tokenizers.py and app.py.

A refusal is a non-zero exit, exactly one stderr line, starting "error:", and no traceback
(data.py prepare skips a bad image and counts it instead; train.py, which finds a code out
of range only when a batch reads it, may have drawn its progress bar). An image that
files.open_image accepts (a cut that lost only the end marker) may also be used: exit 0 or
one line. Classes 1 and 2 run each command
in a forked child and measure its peak RSS growth with resource.getrusage: it must stay
under MEMORY_BOUND_MB (README, Reliability), and a config must be refused within
CONFIG_SECONDS. Class 3 calls main(argv) in-process. With -s the largest growth per class is
printed; HOSTILE_DEBUG=1 also prints every command's seconds, growth and error line.
"""
from __future__ import annotations

import io
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

import app
import clip_image
import clip_text
import data
import emage
import eval_fid
import export_onnx
import files
import sample
import shapes
import shapes_tokenizers
import train
import vqgan
from shapes_tokenizers import SHAPES_BPE_PATH

MEMORY_BOUND_MB = 200  # peak RSS growth of one refused command (README, Reliability)
CONFIG_SECONDS = 10  # a hostile config is refused in well under a second; the margin is for a shared CPU
HOSTILE = settings(max_examples=20, deadline=None, database=None, derandomize=False,
                   suppress_health_check=list(HealthCheck))
PEAKS: dict[str, float] = {}  # the largest growth seen per class, printed with -s


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models (and a shared CPU): one thread, which also keeps forked children free of thread pools."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if PEAKS:
        print("\npeak RSS growth (MB) per class: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(PEAKS.items())))


# ----------------------------------------------------------------------------------------
# A tiny world: VQGAN, generator checkpoint, token shards, an export folder, images
# ----------------------------------------------------------------------------------------


def tiny_vqgan() -> vqgan.VQGAN:
    config = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, n_embed=32, quantizer="vector", norm_groups=4)
    return vqgan.VQGAN(config)


def tiny_emage(vocab_size: int) -> emage.Emage:
    text = clip_text.TextConfig(vocab_size=vocab_size, context_length=24, width=32, heads=2, layers=1, embed_dim=32)
    return emage.Emage(emage.EmageConfig(text=text, codebook_size=32, grid=(4, 4), width=32, layers=1, heads=2), variant=3)


def png_bytes(image: Image.Image, **text) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    vqgan.save_vqgan(tiny_vqgan(), root / "vqgan")
    tokenizer = clip_text.Tokenizer(SHAPES_BPE_PATH)
    model = tiny_emage(tokenizer.vocab_size)
    emage.save_checkpoint(model, root / "emage", variant=3, step=0, tokenizer_path=SHAPES_BPE_PATH,
                          vqgan_dir=root / "vqgan")
    import random

    rng = random.Random(0)
    captions = [shapes.sample_caption(rng) for _ in range(16)]
    codes = np.random.default_rng(0).integers(0, 32, size=(16, 16))
    data.write_token_shards(root / "tokens", captions, codes, grid=(4, 4), codebook_size=32, vqgan_dir=root / "vqgan",
                            image_size=32, shard_size=8)
    export = root / "export"  # an export folder's config.json; the graphs are placeholders
    export.mkdir()
    for name in export_onnx.GRAPHS.values():
        (export / name).write_bytes(b"not a graph")
    shutil.copyfile(SHAPES_BPE_PATH, export / SHAPES_BPE_PATH.name)
    files.write_json(export / "config.json", {
        "format": export_onnx.FORMAT, "graphs": export_onnx.GRAPHS, "opset": export_onnx.OPSET,
        "config": model.config.to_dict(), "vqgan_config": tiny_vqgan().config.__dict__ | {"ch_mult": [1, 1, 1, 1],
                                                                                        "attn_resolutions": [],
                                                                                        "palette": []},
        "variant": 3, "step": 0, "tokenizer": SHAPES_BPE_PATH.name, "extra": {}})
    shapes.render("a red circle", 0).resize((32, 32)).save(root / "good.png")
    return root


def good_meta(world, kind: str) -> dict:
    name = {"generator": "emage/config.json", "vqgan": "vqgan/config.json", "export": "export/config.json",
            "shards": "tokens/meta.json"}[kind]
    return json.loads((world / name).read_text())


# ----------------------------------------------------------------------------------------
# Running a command in a forked child: exit code, stderr, peak RSS growth, seconds
# ----------------------------------------------------------------------------------------


def forked(main, argv, timeout: float = 120) -> dict:
    """main(argv) in a forked child: {rc, err, mb (peak RSS growth), seconds}. The child's peak
    RSS starts at its RSS at the fork, so growth is what the command itself allocated."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        result = {"rc": None, "err": ""}
        out, err = io.StringIO(), io.StringIO()
        sys.stdout, sys.stderr = out, err
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        try:
            result["rc"] = main([str(a) for a in argv])
        except SystemExit as exit_:
            result["rc"] = exit_.code
        except BaseException:  # an escaped exception: the test shows its traceback
            err.write(traceback.format_exc())
            result["rc"] = "exception"
        result.update(err=err.getvalue()[-20000:], out=out.getvalue()[-2000:], seconds=time.perf_counter() - started,
                      mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        with os.fdopen(write, "w") as pipe:
            json.dump(result, pipe)
        os._exit(0)
    os.close(write)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(read) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"{getattr(main, '__module__', main)} {argv} ran over {timeout} s")
            chunk = pipe.read()
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    return json.loads("".join(chunks))


def assert_refused(result: dict, what: str) -> str:
    """A non-zero exit, exactly one stderr line starting `error:` (the last; a run that got as far as
    training may have drawn its progress bar before it), no traceback."""
    err = result["err"]
    assert "Traceback" not in err, f"{what}: {err}"
    assert result["rc"] not in (0, None, "exception"), f"{what}: exit {result['rc']}, {err}"
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"{what}: {err}"
    if what != "train.py --data":  # the only command here that reaches its training loop first
        assert len(lines) == 1, f"{what}: {err}"
    return errors[0]


def assert_bounded(result: dict, what: str, kind: str) -> None:
    assert result["mb"] < MEMORY_BOUND_MB, f"{what}: peak RSS grew by {result['mb']:.0f} MB"
    PEAKS[kind] = max(PEAKS.get(kind, 0.0), result["mb"])


# ----------------------------------------------------------------------------------------
# Hostile JSON values: generated per field from what the field accepts
# ----------------------------------------------------------------------------------------

NOT_A_NUMBER = st.sampled_from(["12", "", "x" * 10_000, None, True, False, [], [1, 2], {}, {"a": 1}])
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def bad_int(low: int, high: int):
    """Anything but a whole number in [low, high]."""
    return st.one_of(st.integers(min_value=-10**40, max_value=low - 1), st.integers(min_value=high + 1, max_value=10**40),
                     st.sampled_from([10**7, 10**9, 2**31, 2**63, 10**100]).filter(lambda v: v > high),
                     st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not float(v).is_integer() or abs(v) > 1e300),
                     st.floats(min_value=low, max_value=min(high, 10**6)).filter(float.is_integer),  # 4.0 is not 4
                     NOT_A_NUMBER)


def bad_float(low: float, high: float):
    """Anything but a finite number in [low, high]."""
    return st.one_of(NON_FINITE, st.floats(max_value=low, exclude_max=True, allow_nan=False),
                     st.floats(min_value=high, exclude_min=True, allow_nan=False), NOT_A_NUMBER.filter(lambda v: v != "12"))


def bad_choice(choices):
    return st.one_of(st.text(max_size=30).filter(lambda v: v not in choices), st.integers(), NOT_A_NUMBER)


BAD_BOOL = st.one_of(st.integers(min_value=0, max_value=1), st.sampled_from(["true", "false", None, [], 0.0]))
BAD_GRID = st.one_of(st.lists(st.integers(1, 8), max_size=5).filter(lambda v: len(v) != 2),
                     st.tuples(bad_int(1, 1024), st.integers(1, 8)).map(list), st.tuples(st.integers(1, 8), bad_int(1, 1024)).map(list),
                     st.just([100_000, 100_000]), NOT_A_NUMBER)
TEXT_FIELDS = {"vocab_size": bad_int(2, 2**20), "context_length": bad_int(2, 4096), "width": bad_int(1, 65536),
               "heads": bad_int(1, 65536), "layers": bad_int(1, 256), "embed_dim": bad_int(1, 65536), "causal": BAD_BOOL}
EMAGE_FIELDS = {"codebook_size": bad_int(1, 2**20), "grid": BAD_GRID, "width": bad_int(1, 65536),
                "layers": bad_int(1, 256), "heads": bad_int(1, 65536), "mlp_ratio": bad_float(1e-9, 64.0),
                "train_schedule": bad_choice(emage.SCHEDULES), "pass1": bad_choice(("argmax", "sample")),
                "pass1_grad": BAD_BOOL, "pass1_keep_seen": BAD_BOOL, "caption_dropout": bad_float(0.0, 0.999)}
# In range, but not what the weights were saved with: refused by the meta-device shape check.
MISFIT_FIELDS = {"layers": st.integers(2, 256), "width": st.sampled_from([64, 96, 512, 4096]),
                 "codebook_size": st.integers(33, 2**20), "grid": st.tuples(st.integers(5, 1024), st.integers(1, 1024)).map(list),
                 "mlp_ratio": st.floats(4.5, 64.0)}
META_FIELDS = {"tokenizer": st.one_of(st.sampled_from(["../../etc/passwd", "/etc/passwd", "", ".", "a/b"]), NOT_A_NUMBER),
               "vqgan_dir": st.one_of(st.sampled_from(["", "\0"]), st.integers(), st.lists(st.integers())),
               "variant": st.one_of(st.text(max_size=40).filter(lambda v: v not in ("full", "ar", "1", "2", "3")),
                                    st.integers().filter(lambda v: v not in (1, 2, 3)), st.sampled_from([[], {}, 1.5])),
               "step": bad_int(0, 2**63 - 1), "extra": st.sampled_from([[], "x", 3]),
               "beyond": st.one_of(st.sampled_from([[1], "colours", 7]),
                                   st.fixed_dictionaries({"colours": bad_int(0, 2**20)}),
                                   st.fixed_dictionaries({"object_mask": bad_float(0.0, 1.0)}),
                                   st.fixed_dictionaries({"mirror_loss": bad_float(0.0, 1e6)}),
                                   st.dictionaries(st.text(min_size=1, max_size=12).filter(
                                       lambda k: k not in ("colours", "object_mask", "mirror_loss")), st.integers(), min_size=1))}
VQGAN_FIELDS = {"resolution": bad_int(1, 16384), "in_channels": bad_int(1, 64), "out_channels": bad_int(1, 1024),
                "ch": bad_int(1, 8192), "ch_mult": st.one_of(st.lists(st.integers(1, 4), min_size=9, max_size=12),
                                                             st.lists(bad_int(1, 64), min_size=1, max_size=3), st.just([]),
                                                             st.just([64] * 8), NOT_A_NUMBER),
                "num_res_blocks": bad_int(0, 64), "attn_resolutions": st.one_of(st.lists(bad_int(1, 16384), min_size=1, max_size=3),
                                                                               st.just(list(range(1, 40))), st.integers()),
                "z_channels": bad_int(1, 8192), "embed_dim": bad_int(1, 8192), "n_embed": bad_int(1, 2**20),
                "quantizer": bad_choice(("gumbel", "vector", "pattern")), "encoder": bad_choice(("taming", "patch")),
                "norm_groups": st.one_of(bad_int(1, 8192), st.just(3)), "beta": bad_float(0.0, 1e6),
                "kl_weight": bad_float(0.0, 1e6),
                "palette": st.one_of(st.lists(st.lists(st.integers(0, 255), max_size=4).filter(lambda c: len(c) != 3),
                                              min_size=1, max_size=3),
                                     st.lists(st.tuples(st.integers(256, 10**6), st.integers(0, 255), st.integers(0, 255))
                                              .map(list), min_size=1, max_size=3),
                                     st.just([[0, 0, 0]] * 2000), st.integers())}
VQGAN_MISFIT = {"ch": st.sampled_from([16, 64, 4096]), "z_channels": st.sampled_from([16, 1024]),
                "n_embed": st.integers(33, 2**20), "num_res_blocks": st.integers(2, 64),
                "ch_mult": st.lists(st.integers(1, 8), min_size=1, max_size=8).filter(lambda v: v != [1, 1, 1, 1])}


# Fields whose default changes the tiny models' tensor shapes: deleting one misfits the weights (heads and the
# VQGAN's resolution change no shape: a config without them is a valid one).
GENERATOR_REQUIRED = ("text", "grid", "width", "layers", "codebook_size")
VQGAN_REQUIRED = ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "quantizer", "norm_groups",
                  "attn_resolutions")


def garbage_json() -> st.SearchStrategy[bytes]:
    """Whole files that are not a config: cut JSON, deep nesting, not UTF-8, a 20 MB file, other types."""
    return st.one_of(st.binary(max_size=200), st.sampled_from([
        b"", b"{", b'{"config": ', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}", b"null", b"[]", b"3", b'"x"',
        b'{"a": 1' + b"0" * 5000 + b"}", b" " * (20 * 1024 * 1024) + b"{}"]))


@st.composite
def hostile_json(draw, base: dict, fields: dict, misfit: dict | None = None, nested: str | None = None,
                 nested_fields: dict | None = None, top: dict | None = None, required=()) -> bytes:
    """`base` with one field made hostile (or a structural change, or a garbage file), as bytes.
    A structural change deletes a `required` field (one whose default is not the saved value),
    adds an unknown one to a nested config, or replaces the config by another type."""
    meta = json.loads(json.dumps(base))
    target = meta[nested] if nested else meta
    choices = (["field"] if fields else []) + ["structure", "garbage"] + (["misfit"] if misfit else []) \
        + (["top"] if top else []) + (["text"] if nested_fields else [])
    how = draw(st.sampled_from(choices))
    if how == "garbage":
        return draw(garbage_json())
    if how == "field":
        name = draw(st.sampled_from(sorted(fields)))
        target[name] = draw(fields[name])
    elif how == "misfit":
        name = draw(st.sampled_from(sorted(misfit)))
        target[name] = draw(misfit[name])
    elif how == "text":
        name = draw(st.sampled_from(sorted(nested_fields)))
        target["text"][name] = draw(nested_fields[name])
    elif how == "top":
        name = draw(st.sampled_from(sorted(top)))
        meta[name] = draw(top[name])
    else:
        change = draw(st.sampled_from((["delete"] if required else []) + (["unknown"] if nested else []) + ["replace"]))
        if change == "delete":
            del target[draw(st.sampled_from(sorted(required)))]
        elif change == "unknown":
            target[draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in target))] = draw(st.integers())
        elif nested:
            meta[nested] = draw(NOT_A_NUMBER)
        else:
            return json.dumps(draw(NOT_A_NUMBER)).encode()
    return json.dumps(meta).encode()


def must_refuse_config(results: dict, kind: str) -> None:
    for what, result in results.items():
        if os.environ.get("HOSTILE_DEBUG"):
            print(f"{what}: {result['seconds']:.2f} s {result['mb']:.0f} MB {result['err'][:100]!r}")
        assert_refused(result, what)
        assert_bounded(result, what, kind)
        assert result["seconds"] < CONFIG_SECONDS, f"{what}: {result['seconds']:.1f} s"


def fresh(tmp_path_factory) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))


def train_argv(world, out, *extra):
    return ["--data", world / "tokens", "--vqgan", world / "vqgan", "--out", out, "--variant", "3", "--steps", 1,
            "--batch-size", 8, "--eval-every", 1000, "--eval-captions", 1, "--threads", 1, *extra]


# ----------------------------------------------------------------------------------------
# 1. Hostile config.json / meta.json
# ----------------------------------------------------------------------------------------


@HOSTILE
@given(st.data())
def test_a_hostile_generator_config_is_refused_in_bounded_memory_by_every_entry_point(world, tmp_path_factory, data_):
    blob = data_.draw(hostile_json(good_meta(world, "generator"), EMAGE_FIELDS, MISFIT_FIELDS, "config", TEXT_FIELDS,
                                   META_FIELDS, required=GENERATOR_REQUIRED))
    work = fresh(tmp_path_factory)
    ckpt = work / "emage"
    shutil.copytree(world / "emage", ckpt)
    (ckpt / "config.json").write_bytes(blob)
    torch.save({"step": 1, "optimizer": {}, "rng": [], "schedule": {"steps": 1}}, ckpt / "train_state.pt")
    shutil.copytree(world / "vqgan", work / "vqgan")  # where a faithful config.json would point
    results = {
        "sample.py": forked(sample.main, ["a red circle", "--checkpoint", ckpt, "--out", work / "x.png", "--steps", 2]),
        "export_onnx.py": forked(export_onnx.main, ["--checkpoint", ckpt, "--out", work / "onnx"]),
        "train.py --init": forked(train.main, train_argv(world, work / "a", "--init", ckpt)),
        "train.py --resume": forked(train.main, train_argv(world, work / "b", "--resume", ckpt)),
        "app.py": forked(app.main, ["--checkpoint", ckpt, "--port", 0]),
        "eval_fid.py shapes": forked(eval_fid.main, ["shapes", "--checkpoint", ckpt, "--limit", 1, "--seeds", 1]),
    }
    must_refuse_config(results, "generator config.json")
    assert not (work / "x.png").exists() and not (work / "onnx").exists()


@HOSTILE
@given(st.data())
def test_a_hostile_vqgan_config_is_refused_in_bounded_memory_by_every_entry_point(world, tmp_path_factory, data_):
    blob = data_.draw(hostile_json(good_meta(world, "vqgan"), VQGAN_FIELDS, VQGAN_MISFIT, "config",
                                   top={"model": bad_choice(("vqgan",))}, required=VQGAN_REQUIRED))
    work = fresh(tmp_path_factory)
    folder = work / "vqgan"
    shutil.copytree(world / "vqgan", folder)
    (folder / "config.json").write_bytes(blob)
    (folder / "train_state.pt").write_bytes(b"")  # shapes_tokenizers train --resume looks for it first
    shutil.copytree(world / "emage", work / "emage")  # a generator checkpoint naming this VQGAN (../vqgan)
    results = {
        "vqgan.py reconstruct": forked(vqgan.main, ["reconstruct", world / "good.png", "--checkpoint", folder,
                                                    "--out", work / "r.png"]),
        "vqgan.py convert": forked(vqgan.main, ["convert", folder, work / "converted"]),
        "sample.py --vqgan": forked(sample.main, ["a red circle", "--checkpoint", world / "emage", "--vqgan", folder,
                                                  "--out", work / "x.png", "--steps", 2]),
        "data.py prepare": forked(data.main, ["prepare", "--source", "shapes", "--examples", 2, "--vqgan", folder,
                                              "--out", work / "tok", "--device", "cpu"]),
        "train.py --vqgan": forked(train.main, [*train_argv(world, work / "run"), "--vqgan", folder]),
        "export_onnx.py": forked(export_onnx.main, ["--checkpoint", work / "emage", "--out", work / "onnx"]),
        "shapes_tokenizers.py eval": forked(shapes_tokenizers.main, ["eval", "--checkpoint", folder, "--seeds", 0]),
        "shapes_tokenizers.py train --resume": forked(shapes_tokenizers.main, ["train", "--out", folder, "--resume",
                                                                               "--steps", 1]),
    }
    must_refuse_config(results, "VQGAN config.json")
    assert not (work / "r.png").exists() and not (work / "converted").exists() and not (work / "onnx").exists()


@HOSTILE
@given(st.data())
def test_a_hostile_export_config_is_refused_in_bounded_memory(world, tmp_path_factory, data_):
    base = good_meta(world, "export")
    top = {"graphs": st.one_of(NOT_A_NUMBER, st.fixed_dictionaries({k: st.just(v) for k, v in export_onnx.GRAPHS.items()})
                               .map(lambda g: {**g, "round": "../../round.onnx"})),
           "format": bad_choice((export_onnx.FORMAT,)),
           "vqgan_config": st.one_of(NOT_A_NUMBER, st.builds(lambda k, v: {**base["vqgan_config"], k: v},
                                                             st.sampled_from(sorted(VQGAN_FIELDS)), st.integers(10**6, 10**40))),
           **META_FIELDS}
    blob = data_.draw(hostile_json(base, EMAGE_FIELDS, None, "config", TEXT_FIELDS, top, required=GENERATOR_REQUIRED))
    work = fresh(tmp_path_factory)
    shutil.copytree(world / "export", work / "export")
    (work / "export" / "config.json").write_bytes(blob)
    results = {"sample.py --backend onnx": forked(sample.main, ["a red circle", "--backend", "onnx", "--onnx-dir",
                                                                work / "export", "--out", work / "x.png"])}
    must_refuse_config(results, "export config.json")


VISION_FIELDS = {"image_size": bad_int(1, 4096), "patch_size": bad_int(1, 64), "width": bad_int(1, 65536),
                 "heads": st.one_of(bad_int(1, 65536), st.just(3)), "layers": bad_int(1, 256),
                 "embed_dim": bad_int(1, 65536)}


@st.composite
def hostile_clip_config(draw, base: dict) -> bytes:
    """A whole-CLIP config.json (clip_image.py convert's format) with its vision or text tower,
    its vocabulary name or its format made hostile, or a garbage file."""
    tower = draw(st.sampled_from(["vision", "text", "top"]))
    if tower == "vision":
        return draw(hostile_json(base, VISION_FIELDS, None, "vision", required=("image_size", "width", "layers")))
    if tower == "text":
        return draw(hostile_json(base, TEXT_FIELDS, None, "text", required=("vocab_size", "width", "layers")))
    return draw(hostile_json(base, {}, top={"tokenizer": META_FIELDS["tokenizer"], "format": bad_choice(("emage.clip",)),
                                            "text": NOT_A_NUMBER, "vision": NOT_A_NUMBER}))


@HOSTILE
@given(st.data())
def test_a_hostile_clip_config_is_refused_in_bounded_memory_by_every_entry_point(world, tmp_path_factory, data_):
    blob = data_.draw(hostile_clip_config(json.loads((clip_image.SHAPES_CLIP / "config.json").read_text())))
    work = fresh(tmp_path_factory)
    folder = work / "clip"
    shutil.copytree(clip_image.SHAPES_CLIP, folder)
    (folder / "config.json").write_bytes(blob)
    results = {
        "clip_image.py score": forked(clip_image.main, ["score", world / "good.png", "--caption", "a red circle",
                                                        "--clip", folder]),
        "clip_image.py convert": forked(clip_image.main, ["convert", folder, work / "converted"]),
        "sample.py --rerank clip": forked(sample.main, ["a red circle", "--checkpoint", world / "emage", "--steps", 2,
                                                        "--candidates", 2, "--rerank", "clip", "--clip", folder,
                                                        "--out", work / "x.png"]),
    }
    must_refuse_config(results, "CLIP config.json")
    assert not (work / "converted").exists() and not (work / "x.png").exists()


SHARD_FIELDS = {"grid": BAD_GRID, "codebook_size": bad_int(1, 2**16), "image_size": bad_int(0, 1 << 20),
                "source": NOT_A_NUMBER.filter(lambda v: not isinstance(v, str)), "num_examples": bad_int(16, 16),
                "shards": st.one_of(NOT_A_NUMBER, st.lists(st.fixed_dictionaries({
                    "tokens": st.sampled_from(["../../etc/passwd", "/etc/passwd", "tokens-00000.npy", "nope.npy", ""]),
                    "captions": st.sampled_from(["captions-00000.jsonl", "..", "/dev/zero"]),
                    "count": st.one_of(bad_int(0, 2**40), st.integers(9, 10**6))}), min_size=1, max_size=3)),
                "format": bad_choice((data.FORMAT,)), "version": bad_int(1, 1)}


@st.composite
def hostile_shard_folder(draw, world, work: Path) -> Path:
    """A copy of the token shards with meta.json made hostile, or a shard file damaged."""
    folder = work / "tokens"
    shutil.copytree(world / "tokens", folder)
    how = draw(st.sampled_from(["meta", "tokens", "captions"]))
    if how == "meta":
        (folder / "meta.json").write_bytes(draw(hostile_json(good_meta(world, "shards"), SHARD_FIELDS,
                                                             required=("format", "version", "grid", "codebook_size",
                                                                       "shards"))))
    elif how == "tokens":
        dtype = draw(st.sampled_from([np.uint8, np.int64, np.float32, np.uint16]))
        shape = draw(st.sampled_from([(8, 17), (7, 16), (8, 16, 1), (0, 16), (8, 16)]))
        values = draw(st.sampled_from([0, 200]))  # 200: codes beyond the codebook of 32
        if dtype == np.uint16 and shape == (8, 16) and values == 0:
            values = 200
        with open(folder / "tokens-00000.npy", "wb") as f:
            np.save(f, np.full(shape, values, dtype=dtype))
    else:
        content = draw(st.sampled_from([b"", b"not json\n" * 8, b'{"key": 1}\n' * 8, b'{"caption": 7}\n' * 8,
                                        b"x" * (9 * 70 * 1024), b"[" * 5000 + b"\n" * 8]))
        (folder / "captions-00000.jsonl").write_bytes(content)
    return folder


@HOSTILE
@given(st.data())
def test_hostile_token_shards_are_refused_in_bounded_memory_by_every_entry_point(world, tmp_path_factory, data_):
    work = fresh(tmp_path_factory)
    folder = data_.draw(hostile_shard_folder(world, work))
    results = {
        "train.py --data": forked(train.main, train_argv(world, work / "run", "--data", folder)),
        "data.py show": forked(data.main, ["show", folder, "--count", 16]),
    }
    must_refuse_config(results, "token shards")


# ----------------------------------------------------------------------------------------
# 2. Hostile images
# ----------------------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels of which a few rows of zeros are given."""
    rows = zlib.compress(b"\0" * min(1 << 20, (3 * min(width, 1 << 16) + 1) * 4), 9)
    return (files.PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


ZEROS = {}


def text_bomb(megabytes: int, kind: bytes, caption: bool) -> bytes:
    """A small valid PNG carrying a zTXt / iTXt chunk that inflates to `megabytes` MB."""
    if megabytes not in ZEROS:
        ZEROS[megabytes] = zlib.compress(b"\0" * (megabytes << 20), 9)
    body = b"parameters\0\0" + ZEROS[megabytes] if kind == b"zTXt" else b"parameters\0\1\0\0\0" + ZEROS[megabytes]
    good = png_bytes(Image.new("RGB", (32, 32), "red"), **({"caption": "a red square"} if caption else {}))
    return good[:33] + chunk(kind, body) + good[33:]  # after IHDR


def many_text_chunks(count: int) -> bytes:
    good = png_bytes(Image.new("RGB", (32, 32)))
    return good[:33] + b"".join(chunk(b"tEXt", b"k%d\0" % i + b"x" * 1_000_000) for i in range(count)) + good[33:]


def gif_bomb(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
            + b"\x02\x02\x4c\x01\x00\x3b")


def bmp_bomb(width: int, height: int) -> bytes:
    header = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 14 + 40) + header + b"\0" * 16


def jpeg_bomb(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(buffer, format="JPEG")
    blob = bytearray(buffer.getvalue())
    sof = blob.find(b"\xff\xc0")
    blob[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(blob)


def real(fmt: str) -> bytes:
    buffer = io.BytesIO()
    shapes.render("a red circle", 0).save(buffer, format=fmt)
    return buffer.getvalue()


REAL = {fmt: real(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")}
SIDES = st.integers(1, 2**31 - 1)


@st.composite
def hostile_image(draw) -> bytes:
    how = draw(st.sampled_from(["png bomb", "gif bomb", "bmp bomb", "jpeg bomb", "text bomb", "text chunks",
                                "garbage", "truncated"]))
    if how.endswith("bomb") and how != "text bomb":
        side = 65535 if how in ("gif bomb", "jpeg bomb") else 2**31 - 1
        width, height = draw(st.integers(8193, side)), draw(st.integers(8193, side))
        return {"png bomb": png_bomb, "gif bomb": gif_bomb, "bmp bomb": bmp_bomb, "jpeg bomb": jpeg_bomb}[how](width, height)
    if how == "text bomb":
        return text_bomb(draw(st.sampled_from([2, 16, 64])), draw(st.sampled_from([b"zTXt", b"iTXt"])), draw(st.booleans()))
    if how == "text chunks":
        return many_text_chunks(draw(st.integers(5, 12)))
    if how == "garbage":
        magic = draw(st.sampled_from([b"", files.PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF", b"II*\0"]))
        return magic + draw(st.binary(max_size=2048))
    blob = REAL[draw(st.sampled_from(sorted(REAL)))]
    return blob[:draw(st.integers(0, len(blob) - 1))]


def tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def readable(path: Path) -> bool:
    try:
        files.open_image(path)
    except files.FileError:
        return False
    return True


@HOSTILE
@given(hostile_image(), st.booleans())
def test_a_hostile_image_is_refused_or_skipped_in_bounded_memory_by_every_entry_point(world, tmp_path_factory, blob, captioned):
    work = fresh(tmp_path_factory)
    path = work / "hostile.png"
    parameters = json.dumps({"prompt": "a red circle", "seed": 0}).encode()  # what sample.py writes
    path.write_bytes(blob if not captioned or not blob.startswith(files.PNG_SIGNATURE) else
                     blob[:33] + chunk(b"tEXt", b"parameters\0" + parameters) + blob[33:])
    ok = readable(path)  # a cut that only loses the end marker can still be a whole image
    (work / "folder").mkdir()
    shutil.copyfile(path, work / "folder" / "a.png")
    (work / "folder" / "a.txt").write_text("a red circle")
    shutil.copyfile(world / "good.png", work / "folder" / "b.png")
    (work / "folder" / "b.txt").write_text("a red circle")
    (work / "shards.tar").write_bytes(tar_of({"0/a.png": path.read_bytes(), "0/a.txt": b"a red circle",
                                              "0/b.png": (world / "good.png").read_bytes(), "0/b.txt": b"a red circle"}))
    (work / "score").mkdir()
    shutil.copyfile(path, work / "score" / "hostile.png")
    before, theirs = path.read_bytes(), sample.is_sample_png(path)
    sampling = ["a red circle", "--checkpoint", world / "emage", "--steps", 2, "--candidates", 1]
    refusing = {
        "sample.py --init-image": forked(sample.main, [*sampling, "--init-image", path, "--out", work / "x.png"]),
        "sample.py --mask": forked(sample.main, [*sampling, "--init-image", world / "good.png", "--mask", path,
                                                 "--out", work / "y.png"]),
        "vqgan.py reconstruct": forked(vqgan.main, ["reconstruct", path, "--checkpoint", world / "vqgan", "--resize", 32,
                                                    "--out", work / "r.png"]),
        "clip_image.py score": forked(clip_image.main, ["score", path, "--caption", "a red circle"]),
        "shapes.py score": forked(shapes.main, ["score", work / "score"]),
    }
    for what, result in refusing.items():
        assert_bounded(result, what, "images")
        if not ok or what == "shapes.py score":  # the scorer also refuses a folder with no captioned PNG
            if result["rc"] == 0:
                assert what == "shapes.py score" and ok, f"{what}: {result['err']}"
                continue
            assert_refused(result, what)
        else:
            assert result["rc"] == 0 or assert_refused(result, what), f"{what}: {result['err']}"
    # An existing file at --out: replaced only if sample.py wrote it (a parameters chunk with its prompt and seed).
    result = forked(sample.main, [*sampling, "--out", path])
    assert_bounded(result, "sample.py --out", "images")
    if theirs:
        assert result["rc"] == 0, result["err"]
    else:
        assert_refused(result, "sample.py --out")
        assert path.read_bytes() == before
    # data.py prepare skips a bad image and counts it.
    for source in ("folder", "shards.tar"):
        result = forked(data.main, ["prepare", "--source", work / source, "--vqgan", world / "vqgan",
                                    "--out", work / f"tok-{source}", "--device", "cpu"])
        assert_bounded(result, f"data.py prepare {source}", "images")
        assert result["rc"] == 0 and "Traceback" not in result["err"], result["err"]
        assert f"{0 if ok else 1} unreadable" in result["out"], result["out"]


# ----------------------------------------------------------------------------------------
# 3. Hostile numbers on the command line (in-process)
# ----------------------------------------------------------------------------------------


def bad_int_flag(low: int, high: int):
    """What argparse's int() accepts but the flag must refuse: below low, above high, huge."""
    return st.one_of(st.integers(min_value=-10**30, max_value=low - 1),
                     st.integers(min_value=high + 1, max_value=10**30)).map(str)


def bad_float_flag(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """What argparse's float() accepts but the flag must refuse: NaN, infinities, out of range."""
    below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False, allow_infinity=False)
    above = st.floats(min_value=high, exclude_min=not high_open, allow_nan=False, allow_infinity=False) \
        if math.isfinite(high) else st.nothing()
    return st.one_of(st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-1e309", "NaN", "Infinity"]),
                     below, above).map(str)


def numeric_flags(world, tmp: Path) -> list:
    """(name, main, argv builder, value strategy) for every numeric flag of every command."""
    s = ["a red circle", "--checkpoint", world / "emage", "--out", tmp / "x.png"]
    t = lambda *a: train_argv(world, tmp / "run", *a)  # noqa: E731
    p = ["prepare", "--source", "shapes", "--vqgan", world / "vqgan", "--out", tmp / "tok"]
    e = ["--checkpoint", world / "emage", "--out", tmp / "onnx"]
    r = ["reconstruct", world / "good.png", "--checkpoint", world / "vqgan", "--out", tmp / "r.png"]
    c = ["train-shapes", "--out", tmp / "clip"]
    k = ["train", "--out", tmp / "vq"]
    flags = [("sample --steps", sample.main, s, "--steps", bad_int_flag(1, 1024)),
             ("sample --num-images", sample.main, s, "--num-images", bad_int_flag(1, 256)),
             ("sample --temperature", sample.main, s, "--temperature", bad_float_flag(0, math.inf, high_open=True)),
             ("sample --guidance", sample.main, s, "--guidance", bad_float_flag(0, math.inf, high_open=True)),
             ("sample --upscale", sample.main, s, "--upscale", bad_int_flag(1, 16)),
             ("sample --seed", sample.main, s, "--seed", bad_int_flag(0, 2**63 - 1)),
             ("sample --candidates", sample.main, s, "--candidates", bad_int_flag(1, 256)),
             ("sample --strength", sample.main, [*s, "--init-image", world / "good.png"], "--strength",
              bad_float_flag(0, 1, low_open=True)),
             ("app --port", app.main, ["--checkpoint", world / "emage"], "--port", bad_int_flag(0, 65535)),
             ("data prepare --examples", data.main, p, "--examples", bad_int_flag(1, 10**9)),
             ("data prepare --seed", data.main, p, "--seed", bad_int_flag(0, 2**63 - 1)),
             ("data prepare --image-size", data.main, p, "--image-size", bad_int_flag(1, 8192)),
             ("data prepare --shard-size", data.main, p, "--shard-size", bad_int_flag(1, 10**7)),
             ("data prepare --batch-size", data.main, p, "--batch-size", bad_int_flag(1, 4096)),
             ("data prepare --threads", data.main, p, "--threads", bad_int_flag(1, 1024)),
             ("data show --count", data.main, ["show", world / "tokens"], "--count", bad_int_flag(0, 10**6)),
             ("export --opset", export_onnx.main, e, "--opset", bad_int_flag(14, export_onnx.max_opset())),
             ("export --batch", export_onnx.main, e, "--batch", bad_int_flag(1, 64)),
             ("export --check-batch", export_onnx.main, e, "--check-batch", bad_int_flag(1, 64)),
             ("vqgan --resize", vqgan.main, r, "--resize", bad_int_flag(1, 1024)),
             ("vqgan --scale", vqgan.main, r, "--scale", bad_int_flag(1, 16)),
             ("clip_image --steps", clip_image.main, c, "--steps", bad_int_flag(1, 10**7)),
             ("clip_image --batch-size", clip_image.main, c, "--batch-size", bad_int_flag(2, 4096)),
             ("clip_image --lr", clip_image.main, c, "--lr", bad_float_flag(0, 10, low_open=True)),
             ("clip_image --max-minutes", clip_image.main, c, "--max-minutes", bad_float_flag(0, 1e7, low_open=True)),
             ("clip_image --seed", clip_image.main, c, "--seed", bad_int_flag(0, 2**63 - 1)),
             ("clip_image --threads", clip_image.main, c, "--threads", bad_int_flag(1, 1024)),
             ("tokenizers --steps", shapes_tokenizers.main, k, "--steps", bad_int_flag(1, 10**7)),
             ("tokenizers --batch-size", shapes_tokenizers.main, k, "--batch-size", bad_int_flag(1, 1024)),
             ("tokenizers --lr", shapes_tokenizers.main, k, "--lr", bad_float_flag(0, 10, low_open=True)),
             ("tokenizers --warmup", shapes_tokenizers.main, k, "--warmup", bad_int_flag(0, 10**7)),
             ("tokenizers --patterns", shapes_tokenizers.main, k, "--patterns", bad_int_flag(0, 8192)),
             ("tokenizers --pattern-images", shapes_tokenizers.main, k, "--pattern-images", bad_int_flag(1, 10**7)),
             ("tokenizers --edge-weight", shapes_tokenizers.main, k, "--edge-weight", bad_float_flag(0, 1e6)),
             ("tokenizers --max-minutes", shapes_tokenizers.main, k, "--max-minutes", bad_float_flag(0, 1e7)),
             ("tokenizers --ch", shapes_tokenizers.main, k, "--ch", bad_int_flag(1, 8192)),
             ("tokenizers --n-embed", shapes_tokenizers.main, k, "--n-embed", bad_int_flag(1, 2**20)),
             ("tokenizers --eval-seeds", shapes_tokenizers.main, k, "--eval-seeds", bad_int_flag(0, 2**32 - 1)),
             ("tokenizers eval --align", shapes_tokenizers.main, ["eval"], "--align", bad_int_flag(1, 8)),
             ("tokenizers eval --unseen-codes", shapes_tokenizers.main, ["eval"], "--unseen-codes", bad_int_flag(0, 10**6)),
             ("tokenizers learn-bpe --vocab-size", shapes_tokenizers.main, ["learn-bpe", "--out", tmp / "b.txt"],
              "--vocab-size", bad_int_flag(514, 2**20)),
             ("tokenizers learn-bpe --captions", shapes_tokenizers.main, ["learn-bpe", "--out", tmp / "b.txt"],
              "--captions", bad_int_flag(1, 10**7))]
    for flag, low, high in [("--steps", 1, 10**9), ("--batch-size", 1, 2**16), ("--grad-accum", 1, 2**16),
                            ("--eval-every", 1, 10**9), ("--save-every", 1, 10**9), ("--keep", 1, 10**6),
                            ("--log-every", 1, 10**9), ("--eval-captions", 1, 1024),
                            ("--shapes-examples", 1, 10**8), ("--shapes-align", 1, 8), ("--seed", 0, 2**63 - 1),
                            ("--shapes-seed", 0, 2**63 - 1), ("--threads", 1, 1024)]:
        flags.append((f"train {flag}", train.main, t(), flag, bad_int_flag(low, high)))
    for flag, low, high, low_open, high_open in [("--lr", 0, math.inf, True, True), ("--warmup", 0, 1, False, False),
                                                 ("--weight-decay", 0, 1, False, True), ("--beta1", 0, 1, False, True),
                                                 ("--beta2", 0, 1, False, True), ("--grad-clip", 0, math.inf, True, True)]:
        flags.append((f"train {flag}", train.main, t(), flag, bad_float_flag(low, high, low_open, high_open)))
    for field, strategy in [("layers", bad_int_flag(1, 256)), ("width", bad_int_flag(1, 65536)),
                            ("heads", bad_int_flag(1, 65536)), ("codebook_size", bad_int_flag(1, 2**20)),
                            ("text.layers", bad_int_flag(1, 256)), ("text.width", bad_int_flag(1, 65536)),
                            ("text.context_length", bad_int_flag(2, 4096)), ("colours", bad_int_flag(0, 2**20)),
                            ("mlp_ratio", bad_float_flag(0, 64, low_open=True)),
                            ("caption_dropout", bad_float_flag(0, 1, high_open=True)),
                            ("object_mask", bad_float_flag(0, 1)), ("mirror_loss", bad_float_flag(0, 1e6)),
                            ("grid", st.tuples(bad_int_flag(1, 1024), st.sampled_from(["4", "8"])).map(",".join))]:
        flags.append((f"train --set {field}", train.main, t(), "--set", strategy.map(lambda v, f=field: f"{f}={v}")))
    return flags


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_a_hostile_number_on_any_command_line_is_one_line(world, tmp_path_factory, capsys, data_):
    tmp = fresh(tmp_path_factory)
    name, main, argv, flag, values = data_.draw(st.sampled_from(numeric_flags(world, tmp)), label="flag")
    value = data_.draw(values, label="value")
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv] + [f"{flag}={value}"])  # one word: argparse would take "-nan" for a flag
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    assert_refused({"rc": rc, "err": err}, f"{name} {value}")
    assert not any(tmp.iterdir()), f"{name} {value} wrote {sorted(p.name for p in tmp.iterdir())}"


@pytest.mark.parametrize("value", ["10000000", "100000,100000"])
def test_ten_million_layers_or_a_huge_grid_fail_at_once(world, tmp_path, value):
    """The issue's two examples, as config.json fields: refused in well under a second, in megabytes."""
    meta = good_meta(world, "generator")
    meta["config"]["layers" if "," not in value else "grid"] = [int(v) for v in value.split(",")] if "," in value else int(value)
    shutil.copytree(world / "emage", tmp_path / "emage")
    (tmp_path / "emage" / "config.json").write_text(json.dumps(meta))
    result = forked(sample.main, ["a red circle", "--checkpoint", tmp_path / "emage", "--out", tmp_path / "x.png"])
    line = assert_refused(result, "sample.py")
    assert ("layers" in line or "grid" in line) and result["seconds"] < 1.0 and result["mb"] < 50, result
