"""eval_fid.py and clip_text.py convert replace no file they did not write, and refuse bad numbers."""
import json

import torch

import clip_text
import eval_fid


def test_eval_fid_refuses_to_replace_outputs_and_bad_numbers(tmp_path, capsys):
    kept = tmp_path / "kept.json"
    kept.write_text("the user's own file")
    base = ["shapes", "--checkpoint", "checkpoints/shapes/emage", "--limit", "1", "--seeds", "1"]
    assert eval_fid.main([*base, "--json", str(kept)]) == 1
    assert "--overwrite" in capsys.readouterr().err and kept.read_text() == "the user's own file"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "photo.png").write_bytes(b"x")
    assert eval_fid.main([*base, "--save", str(tmp_path / "folder")]) == 1
    assert (tmp_path / "folder" / "photo.png").read_bytes() == b"x"
    for flag, value in (("--temperature", "nan"), ("--guidance", "inf"), ("--choice-temperature", "-1"),
                        ("--seeds", "100000"), ("--first-seed", "-1")):
        capsys.readouterr()
        assert eval_fid.main([*base, flag, value]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag}") and err.count("\n") == 1
    assert eval_fid.main([*base, "--json", str(kept), "--overwrite"]) == 0
    assert "seen" in json.loads(kept.read_text())


def test_clip_text_convert_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    config = clip_text.TextConfig(vocab_size=64, context_length=8, width=32, heads=2, layers=1, embed_dim=16)
    torch.manual_seed(0)
    clip_text.save_clip_text(clip_text.TextEncoder(config), tmp_path / "src")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")

    def convert(*argv) -> int:
        try:
            clip_text.main(["convert", *map(str, argv)])
        except SystemExit as exit:
            return exit.code or 0
        return 0

    assert convert(tmp_path / "src", other) == 1
    assert "holds other files" in capsys.readouterr().err and (other / "notes.txt").read_text() == "mine"
    assert convert(tmp_path / "src", tmp_path / "out") == 0
    assert convert(tmp_path / "src", tmp_path / "out") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert convert(tmp_path / "src", tmp_path / "out", "--overwrite") == 0
