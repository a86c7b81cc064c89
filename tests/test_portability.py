"""A checkpoint copied anywhere still samples (--vqgan), and what it records travels with the PNG."""
import json
import shutil

import pytest
from PIL import Image

import sample
import train

PROMPT = "a red circle"


def test_a_moved_checkpoint_names_what_it_looked_for_and_samples_with_vqgan(tmp_path, capsys):
    moved = tmp_path / "deep" / "er" / "emage"
    shutil.copytree(sample.DEMO_CHECKPOINT, moved)
    out = tmp_path / "a.png"
    assert sample.main([PROMPT, "--checkpoint", str(moved), "--out", str(out), "--candidates", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "../patterns" in err and "--vqgan" in err and not out.exists()
    vqgan_dir = sample.DEMO_CHECKPOINT.parent / "patterns"
    assert sample.main([PROMPT, "--checkpoint", str(moved), "--vqgan", str(vqgan_dir), "--out", str(out),
                        "--candidates", "1"]) == 0
    parameters = json.loads(Image.open(out).text["parameters"])
    assert parameters["step"] == 1500 and parameters["checkpoint"] == str(moved.resolve())


def test_a_vqgan_with_other_codes_is_refused(tmp_path, capsys):
    other = sample.DEMO_CHECKPOINT.parent / "vqgan"  # the 256-code shapes VQGAN, not the demo's
    assert sample.main([PROMPT, "--vqgan", str(other), "--out", str(tmp_path / "a.png"), "--candidates", "1"]) == 1
    assert "codes" in capsys.readouterr().err


def test_the_default_upscale_reaches_256_px(tmp_path):
    out = tmp_path / "a.png"
    assert sample.main([PROMPT, "--out", str(out), "--candidates", "1"]) == 0
    assert Image.open(out).size == (256, 256)


def test_text_init_folder_supplies_the_caption_vocabulary(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\n")
    args = train.build_parser().parse_args(["--text-init", str(tmp_path), "--preset", "paper"])
    assert train.caption_vocabulary(args) == tmp_path / "merges.txt"
    args = train.build_parser().parse_args(["--text-init", str(tmp_path), "--bpe", "x.txt.gz"])
    assert str(train.caption_vocabulary(args)) == "x.txt.gz"
    assert train.caption_vocabulary(train.build_parser().parse_args([])) == train.SHAPES_BPE


def test_a_moved_checkpoint_exports_with_vqgan(tmp_path, capsys):
    import export_onnx

    moved = tmp_path / "a" / "b" / "emage"
    shutil.copytree(sample.DEMO_CHECKPOINT, moved)
    out = tmp_path / "onnx"
    assert export_onnx.main(["--checkpoint", str(moved), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--vqgan" in err and "../patterns" in err and not out.exists()
    vqgan_dir = sample.DEMO_CHECKPOINT.parent / "patterns"
    assert export_onnx.main(["--checkpoint", str(moved), "--out", str(out), "--vqgan", str(vqgan_dir)]) == 0
    assert json.loads((out / "config.json").read_text())["format"] == "emage-onnx"
