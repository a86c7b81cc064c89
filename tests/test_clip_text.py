"""clip_text on its own: tokenizer invariants, the encoder's CLIP semantics, checkpoint round
trips and the command line, with the shapes vocabulary as test data. Parity with reference
implementations is in test_clip_text_oracle.py; the BPE learner and the shapes vocabulary's
contract are in test_shapes_tokenizers.py."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import clip_text
from shapes_tokenizers import SHAPES_BPE_PATH, text_config

TINY = clip_text.TextConfig(vocab_size=600, context_length=16, width=64, heads=2, layers=2, embed_dim=32)


def random_tokens(config: clip_text.TextConfig, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Rows of start, random ids, end (the largest id), then padding 0, like Tokenizer output."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), config.context_length, dtype=torch.long)  # (B, L)
    for row, n in enumerate(lengths):
        tokens[row, 0] = config.vocab_size - 2
        tokens[row, 1 : n + 1] = torch.randint(1, config.vocab_size - 2, (n,), generator=g)
        tokens[row, n + 1] = config.vocab_size - 1
    return tokens


@pytest.fixture(scope="module")
def shapes_tokenizer():
    return clip_text.Tokenizer(SHAPES_BPE_PATH)


# ---- tokenizer ------------------------------------------------------------------------


def test_byte_map_is_a_bijection_onto_printable_non_space_characters():
    chars = list(clip_text.BYTE_TO_CHAR.values())
    assert len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert all(clip_text.CHAR_TO_BYTE[clip_text.BYTE_TO_CHAR[b]] == b for b in range(256))


def test_batch_layout_start_end_padding(shapes_tokenizer):
    tok = shapes_tokenizer
    batch = tok(["a red circle", "a small blue square above a large green triangle", ""], context_length=24)
    assert batch.shape == (3, 24) and batch.dtype == torch.long
    assert (batch[:, 0] == tok.sot_id).all()
    assert tok.eot_id == tok.vocab_size - 1 == batch.max()
    end = batch.argmax(-1)  # the end token is the largest id, so argmax finds it
    assert end.tolist() == [4, 10, 1]
    for row, e in zip(batch, end):
        assert row[e] == tok.eot_id and (row[e + 1 :] == 0).all() and (row[1:e] < tok.sot_id).all()


def test_truncation_keeps_the_end_token_and_warns_once(recwarn):
    tok = clip_text.Tokenizer(SHAPES_BPE_PATH)
    long = " ".join(["red"] * 40)
    with pytest.warns(UserWarning, match="cut to 8"):
        batch = tok([long, "a red circle"], context_length=8)
    assert batch[0].tolist() == [tok.sot_id] + tok.encode(long)[:6] + [tok.eot_id]
    recwarn.clear()
    tok([long], context_length=8)
    assert not [w for w in recwarn if "cut to" in str(w.message)]
    with pytest.raises(clip_text.ClipTextError, match="context_length"):
        tok("a", context_length=1)


def test_unknown_characters_fall_back_to_bytes_and_decode_back(shapes_tokenizer):
    tok = shapes_tokenizer
    for text in ["zebra", "café 日本 😀", "x7 & y", "quick, brown fox!"]:
        ids = tok.encode(text)
        assert max(ids) < tok.sot_id
        assert tok.decode(ids) == " ".join(clip_text.WORD_PATTERN.findall(clip_text.clean_text(text))) + " "
    with pytest.raises(clip_text.ClipTextError, match="outside"):
        tok.decode([tok.vocab_size])


def test_clean_text_follows_clip():
    assert clip_text.clean_text("  Caf\u00c3\u00a9 &amp;amp;\t\nNEW\u3000york ") == "café & new york"


def test_find_bpe_sources(monkeypatch, tmp_path):
    monkeypatch.setenv(clip_text.BPE_ENV, str(SHAPES_BPE_PATH))
    assert clip_text.find_bpe() == SHAPES_BPE_PATH
    (tmp_path / "v.txt").write_text("#version: 0.2\n")
    assert clip_text.find_bpe(tmp_path / "v.txt") == tmp_path / "v.txt"  # an explicit path comes first
    with pytest.raises(clip_text.ClipTextError, match="not a file"):
        clip_text.find_bpe(tmp_path / "missing.txt.gz")
    monkeypatch.setenv(clip_text.BPE_ENV, str(tmp_path / "missing"))
    with pytest.raises(clip_text.ClipTextError, match=clip_text.BPE_ENV):
        clip_text.find_bpe()
    monkeypatch.delenv(clip_text.BPE_ENV)
    monkeypatch.setattr(clip_text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(clip_text.ClipTextError, match="pip install"):
        clip_text.find_bpe()


def hf_style_vocabulary(folder, source=SHAPES_BPE_PATH) -> clip_text.Tokenizer:
    """merges.txt and vocab.json as a Hugging Face CLIP folder holds them, made from `source`."""
    reference = clip_text.Tokenizer(source)
    merges = clip_text.read_merges(source)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "vocab.json").write_text(json.dumps(reference.encoder), encoding="utf-8")
    return reference


def test_a_folder_gives_its_vocabulary(monkeypatch, tmp_path, shapes_tokenizer):
    reference = hf_style_vocabulary(tmp_path / "hf")
    assert clip_text.find_bpe(tmp_path / "hf") == tmp_path / "hf" / "merges.txt"
    tok = clip_text.Tokenizer(tmp_path / "hf")
    assert tok.path == tmp_path / "hf" / "merges.txt" and tok.vocab_size == reference.vocab_size
    assert tok.encode("a small red circle left of a cyan square") == reference.encode("a small red circle left of a cyan square")
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / clip_text.BPE_FILE_NAME).write_bytes(SHAPES_BPE_PATH.read_bytes())
    assert clip_text.find_bpe(tmp_path / "openai") == tmp_path / "openai" / clip_text.BPE_FILE_NAME
    monkeypatch.setenv(clip_text.BPE_ENV, str(tmp_path / "hf"))  # the variable may name a folder too
    assert clip_text.find_bpe() == tmp_path / "hf" / "merges.txt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(clip_text.ClipTextError, match="--bpe .* is a folder without merges.txt"):
        clip_text.find_bpe(tmp_path / "empty")
    (tmp_path / "empty" / "tokenizer.json").write_text("{}")  # transformers >= 5 writes no merges.txt
    with pytest.raises(clip_text.ClipTextError, match="tokenizer.json but no merges.txt; write it .*model.save"):
        clip_text.find_bpe(tmp_path / "empty")
    (tmp_path / "empty" / "tokenizer.json").unlink()
    assert clip_text.vocabulary_beside(tmp_path / "hf") == tmp_path / "hf" / "merges.txt"
    assert clip_text.vocabulary_beside(tmp_path / "empty") is None
    assert clip_text.vocabulary_beside(tmp_path / "hf" / "merges.txt") is None  # a weights file: none beside it


def test_a_vocab_json_of_another_size_is_refused(tmp_path):
    reference = hf_style_vocabulary(tmp_path)
    vocab = dict(reference.encoder)
    vocab.pop(clip_text.EOT)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(clip_text.ClipTextError, match=f"lists {reference.vocab_size - 1} tokens"):
        clip_text.Tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(clip_text.ClipTextError, match="not a readable vocabulary"):
        clip_text.Tokenizer(tmp_path / "merges.txt")


def test_no_vocabulary_found_names_the_bpe_flag(monkeypatch):
    monkeypatch.delenv(clip_text.BPE_ENV, raising=False)
    monkeypatch.setattr(clip_text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(clip_text.ClipTextError, match="no CLIP BPE vocabulary found: pass --bpe") as error:
        clip_text.find_bpe()
    assert "Hugging Face CLIP folder" in str(error.value) and clip_text.BPE_ENV in str(error.value)


def test_malformed_vocabulary_is_a_clear_error(tmp_path):
    (tmp_path / "bad.txt").write_text("#version: 0.2\na b\nnot-a-merge\n")
    with pytest.raises(clip_text.ClipTextError, match="line 3"):
        clip_text.Tokenizer(tmp_path / "bad.txt")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(clip_text.ClipTextError, match="not a readable BPE vocabulary"):
        clip_text.Tokenizer(tmp_path / "bad.gz")


# ---- encoder --------------------------------------------------------------------------


def test_presets():
    b32, l14 = clip_text.TextConfig.vit_b32(), clip_text.TextConfig.vit_l14()
    assert (b32.width, b32.heads, b32.layers, b32.embed_dim, b32.vocab_size) == (512, 8, 12, 512, 49408)
    assert (l14.width, l14.heads, l14.layers, l14.embed_dim, l14.context_length) == (768, 12, 12, 768, 77)
    assert sum(p.numel() for p in clip_text.TextEncoder(b32).parameters()) == 63_428_096  # CLIP B/32 text tower
    with pytest.raises(clip_text.ClipTextError, match="divisible"):
        clip_text.TextEncoder(clip_text.TextConfig(width=100, heads=3))


def test_attention_is_causal_and_pooled_is_the_projected_end_state():
    torch.manual_seed(0)
    model = clip_text.TextEncoder(TINY).eval()
    tokens = random_tokens(TINY, [3, 8, 13])
    with torch.no_grad():
        states, pooled = model(tokens)
        changed = tokens.clone()
        changed[:, 10:] = torch.randint(0, 500, (3, 6))  # only positions >= 10 differ
        states2, _ = model(changed)
    assert states.shape == (3, 16, 64) and pooled.shape == (3, 32)
    assert torch.equal(states[:, :10], states2[:, :10])
    assert not torch.allclose(states[:, 10:], states2[:, 10:])
    end = torch.tensor([4, 9, 14])
    torch.testing.assert_close(pooled, states[torch.arange(3), end] @ model.text_projection)
    # Padding after the end token never reaches the pooled vector, nor do extra positions.
    with torch.no_grad():
        short_states, short_pooled = model(tokens[:1, :5])
    torch.testing.assert_close(short_pooled, pooled[:1])
    torch.testing.assert_close(short_states, states[:1, :5])


def test_bidirectional_tower_sees_later_words_but_never_the_padding(tmp_path):
    torch.manual_seed(0)
    model = clip_text.TextEncoder(dataclasses.replace(TINY, causal=False)).eval()
    tokens = random_tokens(TINY, [8])  # end token at position 9
    with torch.no_grad():
        states, pooled = model(tokens)
        later = tokens.clone()
        later[:, 5] = (later[:, 5] + 1) % 500  # a word after position 2
        states_later, _ = model(later)
        padded = tokens.clone()
        padded[:, 10:] = torch.randint(1, 500, (1, 6))  # garbage where the padding was
        states_padded, pooled_padded = model(padded)
    assert not torch.allclose(states[:, 2], states_later[:, 2])  # causal=True keeps these equal
    torch.testing.assert_close(states_padded[:, :10], states[:, :10])
    torch.testing.assert_close(pooled_padded, pooled)
    # The option round-trips; a config written before it existed loads as CLIP's causal tower.
    clip_text.save_clip_text(model, tmp_path / "ckpt")
    assert clip_text.load_clip_text(tmp_path / "ckpt").config.causal is False
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del meta["config"]["causal"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    assert clip_text.load_clip_text(tmp_path / "ckpt").config.causal is True


def test_too_many_positions_is_a_clear_error():
    model = clip_text.TextEncoder(TINY)
    with pytest.raises(clip_text.ClipTextError, match="context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_layer_norm_runs_in_fp32_for_low_precision_inputs():
    norm = clip_text.LayerNorm(64)
    x = torch.randn(4, 64).to(torch.bfloat16) * 30 + 100
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x.float(), (64,)).to(torch.bfloat16))
    model = clip_text.TextEncoder(TINY).to(torch.bfloat16)
    states, pooled = model(random_tokens(TINY, [5]))
    assert states.dtype == pooled.dtype == torch.bfloat16 and torch.isfinite(pooled.float()).all()


def test_quick_gelu_closed_form():
    x = torch.linspace(-5, 5, 101)
    torch.testing.assert_close(clip_text.QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))


# ---- checkpoints ----------------------------------------------------------------------


def test_native_round_trip(tmp_path):
    torch.manual_seed(0)
    model = clip_text.TextEncoder(TINY).eval()
    clip_text.save_clip_text(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == clip_text.NATIVE_FORMAT and meta["config"]["heads"] == 2
    loaded = clip_text.load_clip_text(tmp_path / "ckpt")
    assert loaded.config == TINY and not loaded.training
    tokens = random_tokens(TINY, [2, 9])
    with torch.no_grad():
        for a, b in zip(model(tokens), loaded(tokens)):
            assert torch.equal(a, b)


def openai_state(model: clip_text.TextEncoder) -> dict[str, torch.Tensor]:
    """The text keys of an OpenAI checkpoint are ours; a real one also holds these."""
    state = dict(model.state_dict())
    state.update({"visual.proj": torch.zeros(4, 4), "logit_scale": torch.tensor(1.0),
                  "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                  "vocab_size": torch.tensor(49408)})
    return state


def test_openai_state_dict_loads_and_derives_config(tmp_path):
    torch.manual_seed(0)
    config = clip_text.TextConfig(vocab_size=600, context_length=16, width=128, heads=2, layers=2, embed_dim=32)
    model = clip_text.TextEncoder(config).eval()
    torch.save(openai_state(model), tmp_path / "model.pt")
    loaded = clip_text.load_clip_text(tmp_path / "model.pt")
    assert loaded.config == config  # heads = width // 64
    tokens = random_tokens(config, [4])
    with torch.no_grad():
        assert torch.equal(model(tokens)[1], loaded(tokens)[1])


def test_incomplete_or_foreign_checkpoints_are_clear_errors(tmp_path):
    model = clip_text.TextEncoder(TINY)
    state = openai_state(model)
    del state["transformer.resblocks.1.mlp.c_fc.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(clip_text.ClipTextError, match="missing keys"):
        clip_text.load_clip_text(tmp_path / "missing.safetensors")
    state = openai_state(model)
    state["transformer.resblocks.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(clip_text.ClipTextError, match="unexpected keys"):
        clip_text.load_clip_text(tmp_path / "extra.safetensors")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(clip_text.ClipTextError, match="neither OpenAI nor Hugging Face"):
        clip_text.load_clip_text(tmp_path / "foreign.safetensors")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(clip_text.ClipTextError, match="weights-only"):
        clip_text.load_clip_text(tmp_path / "pickled.pt")
    with pytest.raises(clip_text.ClipTextError, match="does not exist"):
        clip_text.load_clip_text(tmp_path / "nothing")


def test_an_openai_layout_tower_without_64_dimensional_heads_is_a_clear_error(tmp_path):
    """OpenAI's files hold no head count; it is width // 64, which a width of 32 cannot follow."""
    model = clip_text.TextEncoder(dataclasses.replace(TINY, width=32, heads=1))
    save_file(openai_state(model), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(clip_text.ClipTextError, match="width 32 has no 64-dimensional heads"):
        clip_text.load_clip_text(tmp_path / "narrow.safetensors")


def test_native_shape_mismatch_is_a_clear_error(tmp_path):
    clip_text.save_clip_text(clip_text.TextEncoder(TINY), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["embed_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(clip_text.ClipTextError, match="embed_dim=16.*the weights have"):
        clip_text.load_clip_text(tmp_path)
    for field, value in (("width", 2**30), ("layers", 10**6), ("heads", 0), ("causal", "yes"), ("nonsense", 1)):
        meta["config"] = {**asdict_tiny(), field: value}  # claimed sizes are never allocated
        (tmp_path / "config.json").write_text(json.dumps(meta))
        with pytest.raises(clip_text.ClipTextError, match="convert the checkpoint again"):
            clip_text.load_clip_text(tmp_path)


def asdict_tiny() -> dict:
    from dataclasses import asdict

    return asdict(TINY)


class _OpenAIStyleArchive(clip_text.TextEncoder):
    """Keys laid out as in OpenAI's TorchScript release: the text tower at the top level,
    next to an image tower and the temperature."""

    def __init__(self, text: clip_text.TextEncoder):
        super().__init__(text.config)
        self.load_state_dict(text.state_dict())
        self.visual = torch.nn.Linear(4, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def forward(self, tokens):
        return super().forward(tokens)[1]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_archive_needs_explicit_trust(tmp_path):
    torch.manual_seed(0)
    config = clip_text.TextConfig(vocab_size=600, context_length=16, width=64, heads=1, layers=1, embed_dim=32)
    model = clip_text.TextEncoder(config).eval()
    tokens = random_tokens(config, [3])
    torch.jit.save(torch.jit.trace(_OpenAIStyleArchive(model), tokens), str(tmp_path / "ViT-L-14.pt"))
    with pytest.raises(clip_text.ClipTextError, match="can run code"):
        clip_text.load_clip_text(tmp_path / "ViT-L-14.pt")
    loaded = clip_text.load_clip_text(tmp_path / "ViT-L-14.pt", trust_torchscript=True)
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[1], model(tokens)[1])


# ---- command line ---------------------------------------------------------------------


def test_cli_convert_encode_and_errors(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = clip_text.TextEncoder(text_config()).eval()
    save_file(openai_state(model), str(tmp_path / "openai.safetensors"))
    clip_text.main(["convert", str(tmp_path / "openai.safetensors"), str(tmp_path / "native")])
    assert clip_text.load_clip_text(tmp_path / "native").config.heads == 2  # derived: 128 // 64
    clip_text.save_clip_text(model, tmp_path / "shapes")
    capsys.readouterr()
    clip_text.main(["encode", "--checkpoint", str(tmp_path / "shapes"), "--bpe", str(SHAPES_BPE_PATH),
                    "a red circle"])
    out = capsys.readouterr().out
    tok = clip_text.Tokenizer(SHAPES_BPE_PATH)
    ids = [tok.sot_id, *tok.encode("a red circle"), tok.eot_id]
    assert f"ids: {ids}" in out
    with torch.no_grad():
        norm = model(tok("a red circle", 24))[1].norm().item()
    assert f"pooled norm: {norm:.6f}" in out
    monkeypatch.delenv(clip_text.BPE_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        clip_text.main(["encode", "--checkpoint", str(tmp_path / "nothing"), "x"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cli_convert_carries_a_folder_s_vocabulary_and_encode_reads_it(tmp_path, capsys):
    """A Hugging Face folder's merges.txt is the captions' vocabulary: convert copies it (and vocab.json)
    along, and encode (like train.py --text-init) reads it from the checkpoint folder without --bpe."""
    reference = hf_style_vocabulary(tmp_path / "src")
    torch.manual_seed(0)
    model = clip_text.TextEncoder(dataclasses.replace(text_config(), vocab_size=reference.vocab_size)).eval()
    clip_text.save_clip_text(model, tmp_path / "src")
    clip_text.main(["convert", str(tmp_path / "src"), str(tmp_path / "out")])
    assert "with the vocabulary merges.txt" in capsys.readouterr().out
    assert (tmp_path / "out" / "merges.txt").read_bytes() == (tmp_path / "src" / "merges.txt").read_bytes()
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (tmp_path / "src" / "vocab.json").read_bytes()
    clip_text.main(["encode", "--checkpoint", str(tmp_path / "out"), "a red circle"])
    ids = [reference.sot_id, *reference.encode("a red circle"), reference.eot_id]
    assert f"ids: {ids}" in capsys.readouterr().out
    (tmp_path / "other").mkdir()  # a vocabulary of another size than the tower's is refused, naming --bpe
    (tmp_path / "other" / "merges.txt").write_text("#version: 0.2\nh e\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        clip_text.main(["encode", "--checkpoint", str(tmp_path / "out"), "--bpe", str(tmp_path / "other"), "x"])
    assert "--bpe" in capsys.readouterr().err
