"""Reliability and security: every user mistake is one `error:` line, training survives
faults, and weight files are data, never code.

1. A catalogue of bad inputs for sample.py, train.py, data.py prepare, export_onnx.py,
   eval_fid.py and the checkpoint loaders. Each CLI runs through its main(argv); a bad
   input must give a non-zero exit, exactly one line with `error:` on stderr and no
   traceback (an exception escaping main() fails the test with its traceback).
2. Fault injection into training, in a forked child process: SIGKILL while a checkpoint
   is being written (inside model.safetensors, after train_state.pt, inside latest.json),
   SIGTERM at an arbitrary step followed by --resume, and a non-finite loss.
3. Malicious pickles: a `__reduce__` that would create a marker file, hidden in every
   foreign format a loader accepts; each is refused and the marker never appears.

Everything uses tiny random models written with the modules' own save functions.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clip_text
import data
import emage
import eval_fid
import inception
import export_onnx
import sample
import run_folder
import train
import vqgan
from shapes_tokenizers import SHAPES_BPE_PATH

TINY = ["--set", "width=32", "--set", "layers=1", "--set", "heads=2", "--set", "text.width=32",
        "--set", "text.heads=2", "--set", "text.layers=1", "--set", "text.embed_dim=32"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors (and a shared CPU): one thread; also keeps forked children free of thread pools."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# Fixtures: a tiny VQGAN, a tiny generator checkpoint, token shards
# ----------------------------------------------------------------------------------------


def tiny_vqgan() -> vqgan.VQGAN:
    """32x32 images -> 4x4 grid of 32 codes."""
    config = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, n_embed=32, quantizer="vector", norm_groups=4)
    model = vqgan.VQGAN(config)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


def tiny_emage(vocab_size: int) -> emage.Emage:
    text = clip_text.TextConfig(vocab_size=vocab_size, context_length=24, width=32, heads=2, layers=1, embed_dim=32)
    return emage.Emage(emage.EmageConfig(text=text, codebook_size=32, grid=(4, 4), width=32, layers=1, heads=2), variant=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root/vqgan, root/emage (a #3 checkpoint referring to ../vqgan), root/tokens (64 examples)."""
    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    vqgan.save_vqgan(tiny_vqgan(), root / "vqgan")
    tokenizer = clip_text.Tokenizer(SHAPES_BPE_PATH)
    emage.save_checkpoint(tiny_emage(tokenizer.vocab_size), root / "emage", variant=3, step=0,
                          tokenizer_path=SHAPES_BPE_PATH, vqgan_dir=root / "vqgan")
    import random

    import shapes

    rng = random.Random(0)
    captions = [shapes.sample_caption(rng) for _ in range(64)]
    codes = np.random.default_rng(0).integers(0, 32, size=(64, 16))
    data.write_token_shards(root / "tokens", captions, codes, grid=(4, 4), codebook_size=32, vqgan_dir=root / "vqgan",
                            image_size=32, shard_size=32)
    return root


def copy_checkpoint(world, tmp_path) -> Path:
    """A private copy of the generator checkpoint (next to a copy of its VQGAN) to damage."""
    import shutil

    shutil.copytree(world / "vqgan", tmp_path / "vqgan")
    shutil.copytree(world / "emage", tmp_path / "emage")
    return tmp_path / "emage"


def cli(main, argv, capsys):
    """(exit code, stderr) of a command-line main(argv); argparse's exits count as exit codes."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


def assert_user_error(rc, err, *words):
    """Non-zero exit, exactly one `error:` line (naming `words`), no traceback."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------
# sample.py: prompts
# ----------------------------------------------------------------------------------------

GOOD_PROMPTS = {
    "nul bytes": "a red\x00 circle\x00",
    "lone surrogate": "a red \ud800 circle \udfff",
    "right-to-left": "\u0645\u0631\u0628\u0639 \u0623\u062d\u0645\u0631 \u202ea red square\u202c",
    "emoji": "a red circle \U0001F534 next to \U0001F7E6 \u2764\ufe0f",
    "cjk": "\u7ea2\u8272\u7684\u5706\u5728\u84dd\u8272\u6b63\u65b9\u5f62\u7684\u5de6\u8fb9",
    "html entities": "a &lt;b&gt;red&lt;/b&gt; circle &amp;amp; a &#x1F535; square &nbsp;",
    "100 000 characters": ("a red circle to the left of a blue square " * 2400)[:100_000],
}
BAD_PROMPTS = {"empty": "", "whitespace only": " \t\n\r \u3000", "only nul bytes": "\x00\x00"}


@pytest.mark.parametrize("name", sorted(GOOD_PROMPTS))
def test_sample_draws_any_non_empty_prompt(world, tmp_path, capsys, name):
    out = tmp_path / "image.png"
    with warnings.catch_warnings():  # not a shapes caption (and the long one is truncated)
        warnings.simplefilter("ignore")
        rc, err = cli(sample.main, [GOOD_PROMPTS[name], "--checkpoint", world / "emage", "--steps", 2,
                                    "--device", "cpu", "--out", out, "--upscale", 1], capsys)
    assert rc == 0 and "error" not in err, err
    image = Image.open(out)
    assert image.size == (32, 32)
    assert json.loads(image.text["parameters"])["prompt"].strip()


@pytest.mark.parametrize("name", sorted(BAD_PROMPTS))
def test_sample_refuses_empty_prompts(world, tmp_path, capsys, name):
    rc, err = cli(sample.main, [BAD_PROMPTS[name], "--checkpoint", world / "emage", "--out", tmp_path / "x.png"], capsys)
    assert_user_error(rc, err, "prompt is empty")
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------
# sample.py: arguments
# ----------------------------------------------------------------------------------------

BAD_SAMPLE_ARGS = {
    "steps 0": (["--steps", 0], "--steps"),
    "steps negative": (["--steps", -4], "--steps"),
    "steps huge": (["--steps", 10**9], "--steps"),
    "steps not a number": (["--steps", "many"], "--steps"),
    "num-images 0": (["--num-images", 0], "--num-images"),
    "num-images huge": (["--num-images", 10**6], "--num-images"),
    "seed negative": (["--seed", -1], "--seed"),
    "seed huge": (["--seed", 2**70], "--seed"),
    "temperature negative": (["--temperature", -1], "--temperature"),
    "temperature nan": (["--temperature", "nan"], "--temperature"),
    "temperature inf": (["--temperature", "inf"], "--temperature"),
    "guidance negative": (["--guidance", -2], "--guidance"),
    "guidance nan": (["--guidance", "nan"], "--guidance"),
    "upscale 0": (["--upscale", 0], "--upscale"),
    "upscale huge": (["--upscale", 10**4], "--upscale"),
    "unknown device": (["--device", "tpu:3"], "tpu:3"),
    "unknown schedule": (["--schedule", "square"], "--schedule"),
    "onnx without its folder": (["--backend", "onnx"], "--onnx-dir"),
}


@pytest.mark.parametrize("name", sorted(BAD_SAMPLE_ARGS))
def test_sample_refuses_bad_arguments(world, tmp_path, capsys, monkeypatch, name):
    if name == "onnx without its folder":  # --onnx-dir's default: no export there, whatever the checkout holds
        monkeypatch.setattr(sample, "ROOT", tmp_path)
    extra, word = BAD_SAMPLE_ARGS[name]
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", world / "emage", "--out", tmp_path / "x.png", *extra],
                  capsys)
    assert_user_error(rc, err, word)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_sample_names_a_missing_gpu(world, tmp_path, capsys):
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", world / "emage", "--device", "cuda"], capsys)
    assert_user_error(rc, err, "--device cpu")


def test_sample_creates_a_missing_output_folder(world, tmp_path, capsys):
    out = tmp_path / "not" / "yet" / "there" / "circle.png"
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", world / "emage", "--steps", 2, "--device", "cpu",
                                "--out", out], capsys)
    assert rc == 0, err
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["circle.png"]  # no temporary left behind


def test_sample_names_an_unwritable_output_path(world, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", world / "emage", "--steps", 2, "--device", "cpu",
                                "--out", tmp_path / "a-file" / "circle.png"], capsys)
    assert_user_error(rc, err, "a-file")


# ----------------------------------------------------------------------------------------
# Checkpoints: sample.py, export_onnx.py, eval_fid.py and the loaders
# ----------------------------------------------------------------------------------------


def damage(ckpt: Path, how: str) -> str:
    """Damage a checkpoint copy in one way; returns a word the error line must contain."""
    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    if how == "missing folder":
        import shutil

        shutil.rmtree(ckpt)
        return str(ckpt)
    if how == "missing config.json":
        config.unlink()
        return "config.json"
    if how == "missing model.safetensors":
        weights.unlink()
        return "model.safetensors"
    if how == "config.json not JSON":
        config.write_text('{"config": {"width": 32,')
        return "config.json"
    if how == "config.json a list":
        config.write_text("[1, 2, 3]")
        return "config.json"
    if how == "config.json without tokenizer":
        meta = json.loads(config.read_text())
        del meta["tokenizer"]
        config.write_text(json.dumps(meta))
        return "config.json"
    if how == "config.json unknown field":
        meta = json.loads(config.read_text())
        meta["config"]["depth"] = 7
        config.write_text(json.dumps(meta))
        return "depth"
    if how == "config.json impossible heads":
        meta = json.loads(config.read_text())
        meta["config"]["heads"] = 5
        config.write_text(json.dumps(meta))
        return "heads"
    if how == "truncated weights":
        blob = weights.read_bytes()
        weights.write_bytes(blob[: len(blob) // 2])
        return "model.safetensors"
    if how == "zero-byte weights":
        weights.write_bytes(b"")
        return "model.safetensors"
    if how == "corrupt weights header":
        blob = bytearray(weights.read_bytes())
        blob[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(blob))
        return "model.safetensors"
    if how == "missing vocabulary":
        (ckpt / json.loads(config.read_text())["tokenizer"]).unlink()
        return "bpe_shapes"
    if how == "missing vqgan":
        import shutil

        shutil.rmtree(ckpt.parent / "vqgan")
        return "vqgan"
    if how == "foreign file instead of a folder":
        taming = ckpt.parent / "model.ckpt"
        torch.save({"state_dict": tiny_vqgan().state_dict()}, taming)
        return "model.ckpt"
    raise AssertionError(how)


DAMAGE = ["missing folder", "missing config.json", "missing model.safetensors", "config.json not JSON",
          "config.json a list", "config.json without tokenizer", "config.json unknown field",
          "config.json impossible heads", "truncated weights", "zero-byte weights", "corrupt weights header",
          "missing vocabulary", "missing vqgan", "foreign file instead of a folder"]


@pytest.mark.parametrize("how", DAMAGE)
def test_sample_names_a_damaged_checkpoint(world, tmp_path, capsys, how):
    ckpt = copy_checkpoint(world, tmp_path)
    word = damage(ckpt, how)
    target = ckpt.parent / "model.ckpt" if how == "foreign file instead of a folder" else ckpt
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", target, "--device", "cpu",
                                "--out", tmp_path / "x.png"], capsys)
    assert_user_error(rc, err, word)


@pytest.mark.parametrize("how", ["missing folder", "config.json not JSON", "truncated weights", "missing vqgan"])
def test_export_onnx_names_a_damaged_checkpoint(world, tmp_path, capsys, how):
    ckpt = copy_checkpoint(world, tmp_path)
    word = damage(ckpt, how)
    rc, err = cli(export_onnx.main, ["--checkpoint", ckpt, "--out", tmp_path / "onnx"], capsys)
    assert_user_error(rc, err, word)


@pytest.mark.parametrize("how", ["missing folder", "config.json not JSON", "truncated weights"])
def test_eval_fid_names_a_damaged_checkpoint(world, tmp_path, capsys, how):
    ckpt = copy_checkpoint(world, tmp_path)
    word = damage(ckpt, how)
    rc, err = cli(eval_fid.main, ["shapes", "--checkpoint", ckpt, "--limit", 2, "--seeds", 1, "--device", "cpu"],
                  capsys)
    assert_user_error(rc, err, word)


def test_a_config_that_does_not_fit_the_weights_names_the_first_mismatching_tensor(world, tmp_path, capsys):
    ckpt = copy_checkpoint(world, tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["mlp_ratio"] = 2.0  # the MLP matrices change shape; everything before them fits
    (ckpt / "config.json").write_text(json.dumps(meta))
    expected = emage.Emage(emage.EmageConfig.from_dict(meta["config"])).state_dict()
    stored = load_file(str(ckpt / "model.safetensors"))
    first = next(k for k, v in expected.items() if k not in stored or stored[k].shape != v.shape)
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", ckpt, "--device", "cpu"], capsys)
    line = assert_user_error(rc, err, first)
    assert line.count("tensor") == 1
    with pytest.raises(emage.EmageError, match=first.replace(".", r"\.")):
        emage.load_checkpoint(ckpt)


def test_an_onnx_folder_without_graphs_is_one_line(world, tmp_path, capsys):
    (tmp_path / "onnx").mkdir()
    rc, err = cli(sample.main, ["a red circle", "--backend", "onnx", "--onnx-dir", tmp_path / "onnx",
                                "--device", "cpu"], capsys)
    assert_user_error(rc, err, "onnx")


BAD_EXPORT_ARGS = {
    "opset too old": (["--opset", 9], "--opset"),
    "batch 0": (["--batch", 0], "--batch"),
    "check-batch negative": (["--check-batch", -1], "--check-batch"),
}


@pytest.mark.parametrize("name", sorted(BAD_EXPORT_ARGS))
def test_export_onnx_refuses_bad_arguments(world, tmp_path, capsys, name):
    extra, word = BAD_EXPORT_ARGS[name]
    rc, err = cli(export_onnx.main, ["--checkpoint", world / "emage", "--out", tmp_path / "onnx", *extra], capsys)
    assert_user_error(rc, err, word)


def vqgan_damage(tmp_path, how: str) -> tuple[Path, str]:
    model = tiny_vqgan()
    folder = tmp_path / "vq"
    vqgan.save_vqgan(model, folder)
    if how == "missing":
        return tmp_path / "nothing", "nothing"
    if how == "missing config.json":
        (folder / "config.json").unlink()
        return folder, "config.json"
    if how == "truncated weights":
        blob = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(blob[:100])
        return folder, "damaged"
    if how == "config does not fit":
        meta = json.loads((folder / "config.json").read_text())
        meta["config"]["n_embed"] = 64
        (folder / "config.json").write_text(json.dumps(meta))
        return folder, "quantize.embedding.weight"
    if how == "zero-byte ckpt":
        (tmp_path / "vq.ckpt").write_bytes(b"")
        return tmp_path / "vq.ckpt", "vq.ckpt"
    if how == "truncated ckpt":
        torch.save({"state_dict": model.state_dict()}, tmp_path / "vq.ckpt")
        blob = (tmp_path / "vq.ckpt").read_bytes()
        (tmp_path / "vq.ckpt").write_bytes(blob[: len(blob) // 2])
        return tmp_path / "vq.ckpt", "vq.ckpt"
    if how == "ckpt of another model":
        torch.save({"state_dict": {"layer.weight": torch.zeros(3)}}, tmp_path / "vq.ckpt")
        return tmp_path / "vq.ckpt", "layer.weight"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "missing config.json", "truncated weights", "config does not fit",
                                 "zero-byte ckpt", "truncated ckpt", "ckpt of another model"])
def test_load_vqgan_raises_its_own_error(tmp_path, how):
    path, word = vqgan_damage(tmp_path, how)
    with pytest.raises(vqgan.VQGANError, match=word.replace(".", r"\.")) as error:
        vqgan.load_vqgan(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("how", ["missing", "zero-byte", "truncated", "not a state dict", "other keys"])
def test_load_clip_text_raises_its_own_error(tmp_path, how):
    encoder = clip_text.TextEncoder(clip_text.TextConfig(vocab_size=600, context_length=8, width=32, heads=2,
                                                         layers=1, embed_dim=16))
    path = tmp_path / "clip.pt"
    if how == "zero-byte":
        path.write_bytes(b"")
    elif how == "truncated":
        torch.save(encoder.state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    elif how == "not a state dict":
        torch.save([torch.zeros(2)], path)
    elif how == "other keys":
        torch.save({"conv.weight": torch.zeros(2)}, path)
    with pytest.raises(clip_text.ClipTextError) as error:
        clip_text.load_clip_text(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("how", ["missing", "zero-byte", "truncated", "not a state dict"])
def test_load_inception_raises_its_own_error(tmp_path, how):
    path = tmp_path / "inception.pth"
    if how == "zero-byte":
        path.write_bytes(b"")
    elif how == "truncated":
        torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif how == "not a state dict":
        torch.save([torch.zeros(2)], path)
    with pytest.raises(eval_fid.FIDError) as error:
        inception.load_inception(path, check_hash=False)
    assert "\n" not in str(error.value)


def test_the_default_path_never_unpickles(world, monkeypatch):
    """Loading a native checkpoint (generator, vocabulary, VQGAN) works with every unpickler disabled."""
    def refuse(*args, **kwargs):
        raise AssertionError("the default loading path unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    pipe = sample.Pipeline.load(world / "emage", "cpu")
    tokens = pipe.generate("a red circle", steps=2)
    assert pipe.decode(tokens)[0].size == (32, 32)


# ----------------------------------------------------------------------------------------
# eval_fid.py: arguments and inputs
# ----------------------------------------------------------------------------------------


def test_eval_fid_user_errors_are_one_line(world, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    missing = tmp_path / "no-inception.pth"
    cases = [
        (["fid", tmp_path / "a", tmp_path / "b", "--inception", missing], "not a folder"),
        (["stats", tmp_path / "imgs", tmp_path / "s.npz", "--inception", missing, "--device", "cpu"], "not found"),
        (["stats", tmp_path / "imgs", tmp_path / "s.npz", "--inception", missing, "--device", "tpu"], "tpu"),
        (["stats", tmp_path / "imgs", tmp_path / "s.npz", "--inception", missing, "--batch-size", 0], "--batch-size"),
        (["shapes", "--checkpoint", world / "emage", "--steps", 0], "--steps"),
        (["shapes", "--checkpoint", world / "emage", "--algorithm", "5"], "--algorithm"),
    ]
    for argv, word in cases:
        rc, err = cli(eval_fid.main, argv, capsys)
        assert_user_error(rc, err, word)


@pytest.mark.parametrize("content", [b"", "\n \n".encode(), "un caf\xe9".encode("latin-1")])
def test_eval_fid_generate_names_bad_caption_files(world, tmp_path, capsys, content):
    captions = tmp_path / "captions.txt"
    captions.write_bytes(content)
    rc, err = cli(eval_fid.main, ["generate", "--checkpoint", world / "emage", "--captions", captions,
                                  "--out", tmp_path / "out", "--device", "cpu"], capsys)
    assert_user_error(rc, err, "captions.txt")


# ----------------------------------------------------------------------------------------
# data.py prepare
# ----------------------------------------------------------------------------------------


def png_bytes(color=(200, 30, 30), size=40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepare_skips_bad_images_and_captions_of_a_folder(world, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = png_bytes()
    files = {
        "good.png": good, "good.txt": "a red square".encode(),
        "cjk.png": good, "cjk.txt": "\u7ea2\u8272 \U0001F534".encode(),
        "zero.png": b"", "zero.txt": b"a zero-byte image",
        "truncated.png": good[: len(good) // 2], "truncated.txt": b"a truncated image",
        "garbage.jpg": os.urandom(500), "garbage.txt": b"not an image at all",
        "uncaptioned.png": good,
        "empty.png": good, "empty.txt": b"  \n",
        "latin1.png": good, "latin1.txt": "un carr\xe9 rouge".encode("latin-1"),
    }
    for name, blob in files.items():
        (src / name).write_bytes(blob)
    rc, err = cli(data.main, ["prepare", "--source", src, "--vqgan", world / "vqgan", "--out", tmp_path / "tok"], capsys)
    assert rc == 0, err
    shards = data.TokenShards(tmp_path / "tok")
    assert sorted(shards.caption(i) for i in range(len(shards))) == ["a red square", "\u7ea2\u8272 \U0001F534"]
    assert shards.meta["skipped"] == {"unreadable": 3, "no_caption": 3}


def tar_with(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def test_prepare_skips_a_broken_tar_member(world, tmp_path, capsys):
    good = png_bytes()
    blob = tar_with([("000.png", good), ("000.txt", b"a red square"),
                     ("001.png", good[:60]), ("001.txt", b"a broken member"),
                     ("002.png", good), ("002.txt", b"\xff\xfe not utf-8")])
    (tmp_path / "shard.tar").write_bytes(blob)
    rc, err = cli(data.main, ["prepare", "--source", tmp_path / "shard.tar", "--vqgan", world / "vqgan",
                              "--out", tmp_path / "tok"], capsys)
    assert rc == 0, err
    shards = data.TokenShards(tmp_path / "tok")
    assert [shards.caption(i) for i in range(len(shards))] == ["a red square"]
    assert shards.meta["skipped"] == {"unreadable": 1, "no_caption": 1}


def test_prepare_names_a_truncated_tar(world, tmp_path, capsys):
    good = png_bytes()
    blob = tar_with([("000.png", good), ("000.txt", b"a red square"), ("001.png", good), ("001.txt", b"cut")])
    cut = blob.rfind(good[:64]) + len(good) // 2  # inside the second image
    (tmp_path / "shard.tar").write_bytes(blob[:cut])
    rc, err = cli(data.main, ["prepare", "--source", tmp_path / "shard.tar", "--vqgan", world / "vqgan",
                              "--out", tmp_path / "tok"], capsys)
    if rc == 0:  # the readable examples were kept, the cut one skipped
        shards = data.TokenShards(tmp_path / "tok")
        assert [shards.caption(i) for i in range(len(shards))] == ["a red square"]
    else:
        assert_user_error(rc, err, "shard.tar")


BAD_PREPARE_ARGS = {
    "missing source": (["--source", "{tmp}/nothing"], "nothing"),
    "source not a tar": (["--source", "{tmp}/notes.txt"], "notes.txt"),
    "folder without images": (["--source", "{tmp}/empty"], "no images"),
    "examples 0": (["--source", "shapes", "--examples", 0], "--examples"),
    "examples negative": (["--source", "shapes", "--examples", -5], "--examples"),
    "missing vqgan": (["--source", "shapes", "--examples", 4, "--vqgan", "{tmp}/no-vqgan"], "no-vqgan"),
    "shard-size 0": (["--source", "shapes", "--examples", 4, "--shard-size", 0], "--shard-size"),
    "batch-size 0": (["--source", "shapes", "--examples", 4, "--batch-size", 0], "--batch-size"),
    "image-size 0": (["--source", "shapes", "--examples", 4, "--image-size", 0], "--image-size"),
    "image-size off the grid": (["--source", "shapes", "--examples", 4, "--image-size", 30], "30"),
    "unknown device": (["--source", "shapes", "--examples", 4, "--device", "tpu"], "tpu"),
    "unwritable out": (["--source", "shapes", "--examples", 4, "--out", "{tmp}/a-file/tok"], "a-file"),
}


@pytest.mark.parametrize("name", sorted(BAD_PREPARE_ARGS))
def test_prepare_refuses_bad_arguments(world, tmp_path, capsys, name):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    extra, word = BAD_PREPARE_ARGS[name]
    argv = ["prepare", "--vqgan", world / "vqgan", "--out", tmp_path / "tok",
            *(str(a).format(tmp=tmp_path) for a in extra)]
    rc, err = cli(data.main, argv, capsys)
    assert_user_error(rc, err, word)


# ----------------------------------------------------------------------------------------
# train.py: arguments
# ----------------------------------------------------------------------------------------


def train_argv(world, out, *extra, steps=4):
    return ["--data", world / "tokens", "--vqgan", world / "vqgan", "--out", out, "--variant", "3",
            "--steps", steps, "--batch-size", 8, "--log-every", 1, "--eval-every", 1000, "--eval-captions", 1,
            "--threads", 1, *TINY, *extra]


BAD_TRAIN_ARGS = {
    "steps 0": (["--steps", 0], "--steps"),
    "steps negative": (["--steps", -3], "--steps"),
    "batch-size 0": (["--batch-size", 0], "--batch-size"),
    "grad-accum 0": (["--grad-accum", 0], "--grad-accum"),
    "lr negative": (["--lr", -1], "--lr"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "warmup above 1": (["--warmup", 2], "--warmup"),
    "save-every 0": (["--save-every", 0], "--save-every"),
    "eval-every 0": (["--eval-every", 0], "--eval-every"),
    "log-every 0": (["--log-every", 0], "--log-every"),
    "keep 0": (["--keep", 0], "--keep"),
    "unknown variant": (["--variant", "7"], "variant"),
    "unknown device": (["--device", "tpu"], "--device"),
    "set not a number": (["--set", "layers=many"], "layers"),
    "set unknown field": (["--set", "depth=2"], "depth"),
    "missing data": (["--data", "/nonexistent/tokens"], "/nonexistent/tokens"),
    "missing vocabulary": (["--bpe", "/nonexistent/bpe.txt.gz"], "/nonexistent/bpe.txt.gz"),
    "missing text-init": (["--text-init", "/nonexistent/clip"], "/nonexistent/clip"),
    "resume without a checkpoint": (["--resume"], "latest.json"),
    "resume a missing folder": (["--resume", "/nonexistent/step-1"], "/nonexistent/step-1"),
}


@pytest.mark.parametrize("name", sorted(BAD_TRAIN_ARGS))
def test_train_refuses_bad_arguments(world, tmp_path, capsys, name):
    extra, word = BAD_TRAIN_ARGS[name]
    rc, err = cli(train.main, train_argv(world, tmp_path / "run", *extra), capsys)
    assert_user_error(rc, err, word)
    assert not list((tmp_path / "run").glob("step-*")) if (tmp_path / "run").exists() else True


def test_train_names_an_unwritable_run_folder(world, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    rc, err = cli(train.main, train_argv(world, tmp_path / "a-file" / "run"), capsys)
    assert_user_error(rc, err, "a-file")


def test_train_resume_names_a_damaged_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(train.main, train_argv(world, out, steps=2), capsys)[0] == 0
    (out / "step-0000002" / "train_state.pt").write_bytes(b"\x80\x04truncated")
    rc, err = cli(train.main, train_argv(world, out, "--resume", steps=4), capsys)
    assert_user_error(rc, err, "train_state.pt")
    (out / "step-0000002" / "train_state.pt").unlink()
    rc, err = cli(train.main, train_argv(world, out, "--resume", steps=4), capsys)
    assert_user_error(rc, err, "train_state.pt")


# ----------------------------------------------------------------------------------------
# Training under faults (forked children; the parent has torch imported already)
# ----------------------------------------------------------------------------------------


def fork(child) -> int:
    """Run child() in a forked process; returns its pid. The child never returns to pytest."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code if isinstance(code, int) else 0)
    return pid


def wait(pid: int, timeout: float = 300) -> int:
    """Exit status of a child: its exit code, or -signal when a signal ended it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish in time")


def wait_for(path: Path, pid: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"the child ended first (status {status})"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main([str(a) for a in train_argv(world, out, "--save-every", 2, "--keep", 3)]) == 0
    return out


KILL_POINTS = ["inside model.safetensors", "after train_state.pt", "inside latest.json"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(world, reference, tmp_path, point, capsys):
    out, ready = tmp_path / "run", tmp_path / "ready"

    def child():
        import safetensors.torch

        calls = {"save_file": 0, "torch.save": 0, "latest": 0}
        save_file, torch_save, write_json = safetensors.torch.save_file, torch.save, run_folder.write_json

        def pause():
            ready.touch()
            time.sleep(600)

        def partial_save_file(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata)
            calls["save_file"] += 1
            if calls["save_file"] == 2 and point == "inside model.safetensors":
                blob = Path(filename).read_bytes()
                Path(filename).write_bytes(blob[: len(blob) // 2])
                pause()

        def slow_torch_save(obj, f, *args, **kwargs):
            torch_save(obj, f, *args, **kwargs)
            calls["torch.save"] += 1
            if calls["torch.save"] == 2 and point == "after train_state.pt":
                pause()

        def partial_json(path, obj):
            if Path(path).name == "latest.json":
                calls["latest"] += 1
                if calls["latest"] == 2 and point == "inside latest.json":
                    Path(path).with_name(".latest.json.cut.tmp").write_text(json.dumps(obj)[:7])
                    pause()
            write_json(path, obj)

        safetensors.torch.save_file = partial_save_file
        torch.save = slow_torch_save
        run_folder.write_json = partial_json  # files.write_json, as run_folder.py imported it
        return train.main([str(a) for a in train_argv(world, out, "--save-every", 2, "--keep", 3)])

    pid = fork(child)
    wait_for(ready, pid)
    os.kill(pid, signal.SIGKILL)
    assert wait(pid) == -signal.SIGKILL
    capsys.readouterr()
    latest = json.loads((out / "latest.json").read_text())
    assert latest == {"step": 2, "dir": "step-0000002"}
    model, info = emage.load_checkpoint(out / "latest")
    assert info["step"] == 2
    assert_same_weights(out / "step-0000002", reference / "step-0000002")
    assert torch.load(out / "step-0000002" / "train_state.pt", weights_only=True)["step"] == 2
    # --resume picks up the last complete checkpoint and ends where the uninterrupted run did.
    assert train.main([str(a) for a in train_argv(world, out, "--save-every", 2, "--keep", 3, "--resume")]) == 0
    assert_same_weights(out / "step-0000004", reference / "step-0000004")
    assert not list(out.glob(".step-*.tmp"))  # a half-written checkpoint folder is cleared by the next save


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(world, reference, tmp_path, capsys):
    out, ready, sent = tmp_path / "run", tmp_path / "ready", tmp_path / "sent"

    def child():
        batch_indices = data.batch_indices

        def slow_batch_indices(step, *args):  # step 1 waits until the parent has sent SIGTERM
            if step == 1:
                ready.touch()
                while not sent.exists():
                    time.sleep(0.01)
            return batch_indices(step, *args)

        data.batch_indices = slow_batch_indices
        return train.main([str(a) for a in train_argv(world, out, "--save-every", 1000)])

    pid = fork(child)
    wait_for(ready, pid)
    os.kill(pid, signal.SIGTERM)  # step 2 finishes, is saved, and the run exits 0
    sent.touch()
    assert wait(pid) == 0  # (the child's stderr went to its own copy of the capture buffer)
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert train.main([str(a) for a in train_argv(world, out, "--save-every", 1000, "--resume")]) == 0
    assert_same_weights(out / "step-0000004", reference / "step-0000004")
    assert losses(out) == losses(reference)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_state(world, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    forward = train.LossModule.forward
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        loss = forward(self, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train.LossModule, "forward", poisoned)
    rc, err = cli(train.main, train_argv(world, out, "--save-every", 2, "--keep", 3), capsys)
    line = assert_user_error(rc, err, "non-finite at step 3", "step-0000002")
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000002"]
    assert_same_weights(out / "step-0000002", reference / "step-0000002")
    assert "--resume" in line
    monkeypatch.setattr(train.LossModule, "forward", forward)
    assert train.main([str(a) for a in train_argv(world, out, "--save-every", 2, "--keep", 3, "--resume")]) == 0
    assert_same_weights(out / "step-0000004", reference / "step-0000004")


# ----------------------------------------------------------------------------------------
# Weight files are data, never code: malicious pickles in every accepted foreign format
# ----------------------------------------------------------------------------------------


class Payload:
    """Unpickling this object would run code that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def evil_pickle(marker: Path, tensors: dict) -> dict:
    return {**tensors, "payload": Payload(marker)}


def test_payload_runs_when_unpickled_unsafely(tmp_path):
    """The control: the payload does create the marker when something unpickles it for real."""
    marker = tmp_path / "marker"
    torch.save(evil_pickle(marker, {}), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_taming_ckpt_with_a_payload_is_refused(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": tiny_vqgan().state_dict(), "callbacks": Payload(marker)}, path)
    with pytest.raises(vqgan.VQGANError, match="weights-only"):
        vqgan.load_vqgan(path)
    assert not marker.exists()


def test_taming_ckpt_payload_behind_the_allowed_lightning_name_is_inert(tmp_path):
    """The one allowed non-tensor global (Lightning's ModelCheckpoint) maps to a placeholder."""
    marker, path = tmp_path / "marker", tmp_path / "vqgan.ckpt"
    state = tiny_vqgan().state_dict()

    class ModelCheckpoint:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"
    torch.save({"state_dict": state, "callbacks": {"cb": ModelCheckpoint()}}, path)
    with pytest.raises(vqgan.VQGANError):
        vqgan.load_vqgan(path)
    assert not marker.exists()


def test_openai_clip_state_dict_with_a_payload_is_refused(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "ViT-B-32.pt"
    encoder = clip_text.TextEncoder(clip_text.TextConfig(vocab_size=600, context_length=8, width=32, heads=2,
                                                         layers=1, embed_dim=16))
    torch.save(evil_pickle(marker, encoder.state_dict()), path)
    with pytest.raises(clip_text.ClipTextError, match="weights-only"):
        clip_text.load_clip_text(path)
    assert not marker.exists()


def torchscript_with_payload(marker: Path, path: Path) -> None:
    """A real TorchScript archive whose data.pkl is replaced by a malicious pickle."""
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(path))
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data_pkl = next(name for name in entries if name.endswith("/data.pkl"))
    entries[data_pkl] = pickle.dumps(Payload(marker), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        for name, blob in entries.items():
            archive.writestr(name, blob)


def test_torchscript_without_the_trust_flag_is_refused(tmp_path, capsys):
    marker, path = tmp_path / "marker", tmp_path / "ViT-L-14.pt"
    torchscript_with_payload(marker, path)
    with pytest.raises(clip_text.ClipTextError, match="trust"):
        clip_text.load_clip_text(path)
    rc, err = cli(clip_text.main, ["convert", path, tmp_path / "native"], capsys)
    assert_user_error(rc, err, "--trust-torchscript")
    rc, err = cli(train.main, ["--text-init", path, "--data", tmp_path / "none", "--out", tmp_path / "run"], capsys)
    assert rc != 0 and "Traceback" not in err
    assert not marker.exists()


def test_fid_inception_pth_with_a_payload_is_refused(tmp_path, capsys):
    marker, path = tmp_path / "marker", tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(evil_pickle(marker, {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}), path)
    with pytest.raises(eval_fid.FIDError):
        inception.load_inception(path, check_hash=False)
    (tmp_path / "imgs").mkdir()
    rc, err = cli(eval_fid.main, ["stats", tmp_path / "imgs", tmp_path / "s.npz", "--inception", path,
                                  "--no-hash-check", "--device", "cpu"], capsys)
    assert_user_error(rc, err, path.name)
    assert not marker.exists()


def test_train_state_with_a_payload_is_refused_on_resume(world, tmp_path, capsys):
    marker, out = tmp_path / "marker", tmp_path / "run"
    assert cli(train.main, train_argv(world, out, steps=2), capsys)[0] == 0
    state = torch.load(out / "step-0000002" / "train_state.pt", weights_only=True)
    state["rng"] = [{"cpu": Payload(marker)}]
    torch.save(state, out / "step-0000002" / "train_state.pt")
    rc, err = cli(train.main, train_argv(world, out, "--resume", steps=4), capsys)
    assert_user_error(rc, err, "train_state.pt")
    assert not marker.exists()


def test_a_pickle_named_model_safetensors_is_refused(world, tmp_path, capsys):
    marker = tmp_path / "marker"
    ckpt = copy_checkpoint(world, tmp_path)
    torch.save(evil_pickle(marker, {}), ckpt / "model.safetensors")
    rc, err = cli(sample.main, ["a red circle", "--checkpoint", ckpt, "--device", "cpu"], capsys)
    assert_user_error(rc, err, "model.safetensors")
    vq = tmp_path / "vqgan"
    torch.save(evil_pickle(marker, {}), vq / "model.safetensors")
    with pytest.raises(vqgan.VQGANError):
        vqgan.load_vqgan(vq)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# Data loss: no command replaces or deletes a file it did not write, unless told to
# (the four first paths: an export into a checkpoint folder, tests/test_export_onnx.py; a
# fresh run over an earlier one, tests/test_train.py; shipped default outputs,
# tests/test_shapes_tokenizers.py and tests/test_clip_image.py; two trainings into one
# --out, below)
# ----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_training_into_a_running_one_is_refused_naming_the_holder(world, tmp_path, capsys):
    out = tmp_path / "run"
    pid = fork(lambda: train.main([str(a) for a in train_argv(world, out, "--save-every", 10**6, steps=10**6)]))
    try:
        wait_for(out / "metrics.jsonl", pid)  # the first run holds the lock and is training
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").stat().st_size:  # a first step logged: its signal handlers are in place
            assert time.time() < deadline and not os.waitpid(pid, os.WNOHANG)[0], "the first run never logged a step"
            time.sleep(0.02)
        for extra in ([], ["--resume"], ["--save-every", 1]):
            rc, err = cli(train.main, train_argv(world, out, *extra, steps=3), capsys)
            line = assert_user_error(rc, err, f"process {pid}", "being written")
            assert str(out) in line
        assert not list(out.glob("step-*"))  # the refused runs wrote no checkpoint
    finally:
        os.kill(pid, signal.SIGTERM)  # the first run saves the step it reached and exits
    assert wait(pid) == 0
    latest = json.loads((out / "latest.json").read_text())
    model, info = emage.load_checkpoint(out / latest["dir"])
    assert info["step"] == latest["step"] >= 1 and not (out / "train.lock").exists()
    assert [step for step, _ in losses(out)] == list(range(1, latest["step"] + 1))  # one run's records, in order


def test_sample_replaces_only_its_own_png_unless_overwrite(world, tmp_path, capsys):
    argv = ["a red circle", "--checkpoint", world / "emage", "--steps", 2, "--device", "cpu", "--candidates", 1]
    mine = tmp_path / "mine.png"
    for content in (b"my holiday photo", Image.new("RGB", (8, 8)).tobytes(), b"\x89PNG\r\n\x1a\n broken"):
        mine.write_bytes(content)
        for extra in ([], ["--show-steps"]):
            rc, err = cli(sample.main, [*argv, "--out", mine, *extra], capsys)
            assert_user_error(rc, err, str(mine), "--overwrite")
            assert mine.read_bytes() == content
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(photo)
    before = photo.read_bytes()
    rc, err = cli(sample.main, [*argv, "--out", photo], capsys)
    assert_user_error(rc, err, "not written by sample.py")
    assert photo.read_bytes() == before
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "x-steps.png").write_bytes(b"mine")  # a strip name taken by another file
    rc, err = cli(sample.main, [*argv, "--out", tmp_path / "steps" / "x.png", "--show-steps"], capsys)
    assert_user_error(rc, err, "x-steps.png")
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["x-steps.png"]
    # Its own PNG is replaced by a run with other settings; --overwrite replaces anything.
    assert cli(sample.main, [*argv, "--out", tmp_path / "own.png"], capsys)[0] == 0
    assert cli(sample.main, [*argv, "--out", tmp_path / "own.png", "--seed", 3], capsys)[0] == 0
    assert json.loads(Image.open(tmp_path / "own.png").text["parameters"])["seed"] == 3
    assert cli(sample.main, [*argv, "--out", photo, "--overwrite"], capsys)[0] == 0
    assert sample.is_sample_png(photo)


def test_prepare_never_writes_into_a_folder_of_other_files(world, tmp_path, capsys):
    argv = ["prepare", "--source", "shapes", "--examples", 4, "--vqgan", world / "vqgan", "--device", "cpu"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    shutil.copytree(world / "emage", mine / "emage")
    for folder in (mine, mine / "emage", world / "tokens"):  # anything, a checkpoint, shards written elsewhere
        before = snapshot(folder)
        rc, err = cli(data.main, [*argv, "--out", folder], capsys)
        assert_user_error(rc, err, str(folder), "prepare.json")
        assert snapshot(folder) == before
    (tmp_path / "file").write_text("x")
    rc, err = cli(data.main, [*argv, "--out", tmp_path / "file"], capsys)
    assert_user_error(rc, err, "is a file")
    assert (tmp_path / "file").read_text() == "x"
    assert cli(data.main, [*argv, "--out", tmp_path / "tok"], capsys)[0] == 0  # new: written
    first = snapshot(tmp_path / "tok")
    assert cli(data.main, [*argv, "--out", tmp_path / "tok"], capsys)[0] == 0  # its own: resumed, the same bytes
    assert snapshot(tmp_path / "tok") == first
    rc, err = cli(data.main, [*argv, "--out", tmp_path / "tok", "--seed", 1], capsys)  # another source: refused
    assert_user_error(rc, err, "another source")
    assert snapshot(tmp_path / "tok") == first


def test_vqgan_and_clip_conversions_never_replace_what_they_did_not_write(world, tmp_path, capsys):
    import clip_image

    checkpoint = tmp_path / "emage"
    shutil.copytree(world / "emage", checkpoint)
    before = snapshot(checkpoint)
    for flags in ([], ["--overwrite"]):  # a generator checkpoint: never, even with --overwrite
        rc, err = cli(vqgan.main, ["convert", world / "vqgan", checkpoint, *flags], capsys)
        assert_user_error(rc, err, "holds other files")
        rc, err = cli(clip_image.main, ["convert", clip_image.SHAPES_CLIP, checkpoint, *flags], capsys)
        assert_user_error(rc, err, "holds other files")
    assert snapshot(checkpoint) == before
    assert cli(vqgan.main, ["convert", world / "vqgan", tmp_path / "vq"], capsys)[0] == 0
    first = snapshot(tmp_path / "vq")
    rc, err = cli(vqgan.main, ["convert", world / "vqgan", tmp_path / "vq"], capsys)
    assert_user_error(rc, err, "--overwrite")
    assert snapshot(tmp_path / "vq") == first
    assert cli(vqgan.main, ["convert", world / "vqgan", tmp_path / "vq", "--overwrite"], capsys)[0] == 0
    assert cli(clip_image.main, ["convert", clip_image.SHAPES_CLIP, tmp_path / "clip"], capsys)[0] == 0
    rc, err = cli(clip_image.main, ["convert", clip_image.SHAPES_CLIP, tmp_path / "clip"], capsys)
    assert_user_error(rc, err, "--overwrite")
    # reconstruct: an existing --out (its default, reconstruction.png, included) needs --overwrite.
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    (tmp_path / "sheet.png").write_bytes(b"mine")
    rc, err = cli(vqgan.main, ["reconstruct", tmp_path / "in.png", "--checkpoint", world / "vqgan",
                               "--out", tmp_path / "sheet.png"], capsys)
    assert_user_error(rc, err, "--overwrite")
    assert (tmp_path / "sheet.png").read_bytes() == b"mine"
    assert cli(vqgan.main, ["reconstruct", tmp_path / "in.png", "--checkpoint", world / "vqgan",
                            "--out", tmp_path / "sheet.png", "--overwrite"], capsys)[0] == 0
