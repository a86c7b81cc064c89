"""shapes_tokenizers.py: the shapes world's tokenizer presets, the caption vocabulary and its
learner, the tokenizer trainer and its command line (outputs never replaced without
--overwrite), and vqgan.py / clip_text.py staying free of the shapes world."""
import gzip
import hashlib
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clip_text
import emage
import files
import shapes
import shapes_tokenizers
import vqgan
from shapes_tokenizers import SHAPES_BPE_PATH, SHAPES_VOCAB_SIZE, learn_bpe

REPO = Path(__file__).resolve().parent.parent
SHAPES_CHECKPOINTS = REPO / "checkpoints" / "shapes"


def digests(folder: Path) -> dict:
    """sha256 of every file under `folder` (byte identity of a whole output)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- one place: vqgan.py and clip_text.py know nothing of the shapes world ----------------


def test_vqgan_and_clip_text_import_without_the_shapes_world():
    code = ("import sys, vqgan, clip_text; "
            "print(sorted({'shapes', 'shapes_tokenizers', 'vqgan_shapes'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for name in ("vqgan.py", "clip_text.py"):
        source = (REPO / name).read_text()
        assert "import shapes\n" not in source and "vqgan_shapes" not in source and "def learn_bpe" not in source
    assert not (REPO / "vqgan_shapes.py").exists()


def test_the_shapes_commands_left_vqgan_and_clip_text(tmp_path, capsys):
    for main, command in ((vqgan.main, ["train", "--out", str(tmp_path / "v")]),
                          (vqgan.main, ["eval"]),
                          (clip_text.main, ["learn-bpe", "--out", str(tmp_path / "b.txt")])):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() and not (tmp_path / "b.txt").exists()
    assert not hasattr(vqgan.VQGANConfig, "shapes_patterns") and not hasattr(clip_text, "learn_bpe")


# ---- presets --------------------------------------------------------------------------


def test_vqgan_preset_is_8x8_small_and_decodes_to_the_palette():
    config = shapes_tokenizers.vqgan_config()
    assert config.palette == ((0, 0, 0), *shapes.COLORS.values()) and config.out_channels == len(config.palette)
    model = vqgan.VQGAN(config)
    assert model.grid_size(64) == (8, 8)
    assert sum(p.numel() for p in model.parameters()) * 4 < 10e6  # the committed file must stay under 10 MB
    patterns = shapes_tokenizers.patterns_config(5)
    assert patterns.quantizer == "pattern" and patterns.n_embed == 7 * 5 and patterns.palette == config.palette
    shipped = json.loads((SHAPES_CHECKPOINTS / "patterns" / "config.json").read_text())["config"]
    assert vqgan.VQGANConfig.from_dict(shipped) == shapes_tokenizers.patterns_config(256)


def test_shapes_vocabulary_matches_preset_and_makes_every_grammar_word_one_token():
    tokenizer = clip_text.Tokenizer(SHAPES_BPE_PATH)
    assert tokenizer.vocab_size == SHAPES_VOCAB_SIZE == shapes_tokenizers.text_config().vocab_size
    assert emage.EmageConfig.shapes().text == shapes_tokenizers.text_config()  # the preset's tower reads this vocabulary
    small = shapes_tokenizers.text_config()
    assert (small.context_length, small.width, small.heads, small.layers, small.embed_dim) == (24, 128, 4, 3, 128)
    words = {"a", "small", "large", "to", "the", "left", "right", "of", "above", "below", *shapes.COLORS, *shapes.SHAPES}
    for word in words:
        assert len(tokenizer.encode(word)) == 1, word
    caption = "a small red circle to the left of a large blue square"
    assert len(tokenizer.encode(caption)) == len(caption.split()) == 12
    assert tokenizer.decode(tokenizer.encode("  A Small RED circle  ")) == "a small red circle "


# ---- the BPE learner ------------------------------------------------------------------


def test_shapes_vocabulary_is_reproduced_by_learn_bpe(tmp_path):
    size = learn_bpe(shapes_tokenizers.shapes_captions(20000, seed=0), 1024, tmp_path / "bpe.txt.gz")
    assert size == SHAPES_VOCAB_SIZE
    assert (tmp_path / "bpe.txt.gz").read_bytes() == SHAPES_BPE_PATH.read_bytes()


def test_learn_bpe_file_format_and_early_stop(tmp_path):
    texts = ["low lower lowest", "newer newest", "low low low"]
    size = learn_bpe(texts, 518, tmp_path / "v.txt")
    lines = (tmp_path / "v.txt").read_text().splitlines()
    assert lines[0].startswith("#version") and len(lines) - 1 == size - 514 == 4
    assert lines[1:3] == ["l o", "lo w</w>"]  # most frequent first: "low" is 4 of the 9 words
    tok = clip_text.Tokenizer(tmp_path / "v.txt")  # plain text works as well as gzip
    assert tok.vocab_size == 518 and tok.eot_id == 517
    # Stops once every word is one symbol.
    full = learn_bpe(texts, 10_000, tmp_path / "full.txt.gz")
    tok = clip_text.Tokenizer(tmp_path / "full.txt.gz")
    assert full == tok.vocab_size < 10_000
    for word in ["low", "lower", "lowest", "newer", "newest"]:
        assert len(tok.encode(word)) == 1
    assert gzip.decompress((tmp_path / "full.txt.gz").read_bytes()).startswith(b"#version")
    with pytest.raises(clip_text.ClipTextError, match="514"):
        learn_bpe(texts, 100, tmp_path / "x.txt")


def test_learned_bpe_round_trips_random_text(tmp_path):
    rng = random.Random(0)
    corpus = ["".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(60)) for _ in range(50)]
    learn_bpe(corpus, 700, tmp_path / "v.txt.gz")
    tok = clip_text.Tokenizer(tmp_path / "v.txt.gz")
    for text in corpus[:10]:
        assert tok.decode(tok.encode(text)) == " ".join(text.split()) + " "


def test_cli_learn_bpe_never_replaces_a_file_without_overwrite(tmp_path, capsys, monkeypatch):
    default = shapes_tokenizers.build_parser().parse_args(["learn-bpe"]).out
    assert Path(default).parts[0] == "runs"  # not the shipped vocabulary
    out = tmp_path / "bpe.txt.gz"
    common = ["learn-bpe", "--out", str(out), "--captions", "300"]
    assert shapes_tokenizers.main(common) == 0
    first = out.read_bytes()
    out.write_bytes(b"mine")
    assert shapes_tokenizers.main(common) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"mine"
    assert shapes_tokenizers.main([*common, "--overwrite"]) == 0 and out.read_bytes() == first
    texts = tmp_path / "captions.txt"
    texts.write_text("low lower lowest\nnewer newest\n")
    assert shapes_tokenizers.main(["learn-bpe", "--out", str(tmp_path / "t.txt"), "--texts", str(texts),
                                   "--vocab-size", "518"]) == 0
    assert clip_text.Tokenizer(tmp_path / "t.txt").vocab_size == 518
    monkeypatch.chdir(tmp_path)  # the default output is relative to the working directory
    assert shapes_tokenizers.main(["learn-bpe", "--captions", "300"]) == 0
    assert (tmp_path / default).read_bytes() == first


# ---- the VQGAN trainer ----------------------------------------------------------------

TINY_TRAIN = ["--batch-size", "4", "--ch", "8", "--ch-mult", "1", "2", "--z-channels", "8", "--embed-dim", "4",
              "--n-embed", "16", "--norm-groups", "4", "--sample-every", "2", "--checkpoint-every", "2",
              "--restart-every", "2", "--eval-seeds", "0"]


def test_train_writes_checkpoint_samples_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--out", str(out), *TINY_TRAIN]
    assert shapes_tokenizers.main(["train", "--steps", "2", *common]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 2 and "overwrite" not in meta["train"] and "resume" not in meta["train"]
    assert (out / "samples" / "step_000002.png").is_file()
    first = vqgan.load_vqgan(out).state_dict()
    assert shapes_tokenizers.main(["train", "--steps", "3", "--resume", *common]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 3 and 0 <= meta["metrics"]["pass_rate"] <= 1
    assert meta["metrics"]["codes_used"] <= 16
    assert any(not torch.equal(v, first[k]) for k, v in vqgan.load_vqgan(out).state_dict().items())
    assert "reconstructions passing shapes.score" in capsys.readouterr().out


def test_train_never_starts_afresh_over_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--out", str(out), *TINY_TRAIN]
    assert shapes_tokenizers.main(["train", "--steps", "2", *common]) == 0
    before = digests(out)
    capsys.readouterr()
    assert shapes_tokenizers.main(["train", "--steps", "2", "--seed", "1", *common]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert digests(out) == before
    assert shapes_tokenizers.main(["train", "--steps", "2", "--resume", "--overwrite", *common]) == 1
    assert "one of them" in capsys.readouterr().err and digests(out) == before
    assert shapes_tokenizers.main(["train", "--steps", "2", "--patterns", "4", "--resume", *common]) == 1
    assert digests(out) == before
    # --overwrite starts afresh: another seed, other weights, and no sheet of the earlier run is left behind.
    (out / "samples" / "step_000100.png").write_bytes(b"stale")
    assert shapes_tokenizers.main(["train", "--steps", "2", "--seed", "1", "--overwrite", *common]) == 0
    after = digests(out)
    assert after["model.safetensors"] != before["model.safetensors"] and "samples/step_000100.png" not in after
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 1


def test_train_defaults_to_a_run_folder_and_refuses_a_file(tmp_path, capsys):
    parse = shapes_tokenizers.build_parser().parse_args
    assert parse(["train"]).out is None  # chosen from --patterns: runs/shapes-vqgan or runs/shapes-patterns
    (tmp_path / "file").write_text("x")
    assert shapes_tokenizers.main(["train", "--out", str(tmp_path / "file"), *TINY_TRAIN]) == 1
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"
    shipped = digests(SHAPES_CHECKPOINTS / "patterns")
    assert shapes_tokenizers.main(["train", "--patterns", "4", "--out", str(SHAPES_CHECKPOINTS / "patterns")]) == 1
    assert "--overwrite" in capsys.readouterr().err and digests(SHAPES_CHECKPOINTS / "patterns") == shipped


def test_train_patterns_into_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--patterns", "4", "--pattern-images", "200", "--pattern-iterations", "2", "--eval-seeds", "0"]
    assert shapes_tokenizers.main(args) == 0
    model = vqgan.load_vqgan(tmp_path / "runs" / "shapes-patterns")
    assert model.config == shapes_tokenizers.patterns_config(4)
    assert shapes_tokenizers.main(args) == 1  # a second run without --overwrite


def test_eval_reports_the_pass_rate(capsys):
    assert shapes_tokenizers.main(["eval", "--checkpoint", str(SHAPES_CHECKPOINTS / "patterns"), "--seeds", "0",
                                   "--align", "8", "--no-jitter"]) == 0
    assert "reconstructions passing shapes.score: 100.00% of 240" in capsys.readouterr().out
    assert shapes_tokenizers.main(["eval", "--checkpoint", str(SHAPES_CHECKPOINTS / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("name, minimum", [("vqgan", 0.70), ("vqgan-1024", 0.95)])
def test_committed_shapes_tokenizers_reconstruct_eval_images(name, minimum):
    """The committed tokenizers: 8x8 patch tokens, <= 10 MB, reconstructions that still pass
    shapes.score (README: 99.38 % for vqgan-1024; the demo's coarser one trades some for a
    generator that learns within the CPU budget)."""
    folder = SHAPES_CHECKPOINTS / name
    assert (folder / "model.safetensors").stat().st_size <= 10e6
    model = vqgan.load_vqgan(folder)
    assert model.grid_size(64) == (8, 8) and model.config.encoder == "patch"
    captions = shapes.eval_captions()[::5]  # 48 captions, seen and novel
    images = np.stack([np.asarray(shapes.render(c, 1)) for c in captions])
    with torch.no_grad():
        tokens = model.encode(vqgan.to_tensor(images))
        reconstructions = files.to_uint8(model.decode(tokens))
    passed = sum(shapes.score(r, c) for r, c in zip(reconstructions, captions))
    assert passed >= minimum * len(captions)
    assert torch.mode(tokens.flatten()).values == model.encode(-torch.ones(1, 3, 64, 64)).flatten()[0]  # background
