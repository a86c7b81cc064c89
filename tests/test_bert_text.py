"""bert_text against Hugging Face transformers: the slow Python BERT tokenizer (called
BertTokenizerLegacy since transformers 5, BertTokenizer before) and the Rust one of
`tokenizers` on generated strings, and
random-weight BertModel / BertForPreTraining checkpoints saved with save_pretrained. Also the
loader's user errors and the command line. Nothing here touches the network.
"""
import json
import random
import string
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import bert_text
import shapes

transformers = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ----------------------------------------------------------------------------------------
# A vocabulary rich enough for ## pieces and [UNK]
# ----------------------------------------------------------------------------------------


def shapes_words() -> list[str]:
    """Every word of the shapes-world captions."""
    words = {*shapes.COLORS, *shapes.SHAPES, *shapes.SIZES, "a", "an", "the"}
    for relation in shapes.RELATIONS:
        words.update(relation.split())
    return sorted(words)


def build_vocab() -> list[str]:
    """Special tokens, single characters (some scripts only partly: the rest is [UNK]),
    continuation pieces for most letters and digits (not ##q, ##x, ##z: words with those
    inside become [UNK]), common subwords and whole words."""
    tokens = list(SPECIALS) + [f"[unused{i}]" for i in range(3)]
    singles = [c for c in string.printable if c not in string.whitespace and not c.isupper()]
    singles += list("ßæøðþıłđ") + list("αβγδεζηθικλμνξοπρστυφχψω") + list("абвгдежзийклмнопрстуфхцчшщъыьэюя")
    singles += list("日本語中文字猫犬好") + list("のがきテキスト") + ["😀", "👍", "🎉", "❤", "½", "²", "٣", "—", "…", "€"]
    tokens += singles
    tokens += ["##" + c for c in "abcdefghijklmnoprstuvwy0123456789ßαβγδεабвгде"]
    tokens += ["##" + c for c in "のがきテキスト"]
    tokens += ["##ing", "##ed", "##er", "##s", "##es", "##ly", "##tion", "##ness", "##able", "##ment", "##ize", "##ful"]
    tokens += ["un", "re", "pre", "anti", "photo", "##graph", "cat", "dog", "run", "##ning", "sit", "##ting", "table",
               "blue", "sky", "##scraper", "on", "of", "in", "cafe", "naive", "resume", "ecole", "strasse", "jalapeno",
               "hello", "world", "it", "##'", "can", "don", "t", "s", "123", "##45", "e", "mail", "##mail"]
    tokens += [w for w in shapes_words() if w not in tokens]
    seen, out = set(), []
    for t in tokens:  # single characters and words may coincide ("a", "t", ...): keep the first
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


VOCAB = build_vocab()


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ours(vocab_path):
    return bert_text.WordPiece(vocab_path)


@pytest.fixture(scope="module")
def reference(vocab_path):
    """transformers' slow, pure-Python BERT tokenizer."""
    cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer
    return cls(str(vocab_path), do_lower_case=True)


# ----------------------------------------------------------------------------------------
# Tokenizer parity
# ----------------------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "the", "cat", "dog", "Sitting", "on", "table", "Running", "BLUE", "skyscraper",
         "unbelievable", "antidisestablishmentarianism", "it's", "THEY'RE", "don't", "o'clock", "quiz", "xyz",
         "a red circle to the left of a blue square", "A LARGE Purple Triangle above a small cyan circle"]
FRAGMENTS = [
    "café", "naïve", "Ångström", "jalapeño", "Straße", "résumé", "ÉCOLE", "İstanbul", "ﬁne", "ǅemal", "Ḱ", "e\u0301",  # accents
    "\u0301", "a\u0300\u0301\u0302", "Å", "Ω", "ﬀ", "㎏",  # lone and stacked combining marks, singletons, compatibility forms
    "日本語のテキスト", "猫が好き", "中文字符", "한국어", "ไทย", "עברית", "العربية", "Ελληνικά", "КИРИЛЛИЦА", "𠀀𪜀",  # scripts
    "😀", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "🇫🇷", "✨🎉", "❤️",  # emoji, skin tone, ZWJ sequences, flags
    "3.14159", "1,000,000", "2024-01-01", "#1", "$9.99", "50%", "½", "²", "٣", "Ⅻ", "12345",  # numbers
    "!!!", "...", "?!", "—", "–", "(x)", "[y]", "{z}", "@user", "a_b", "C++", "e-mail", "^`~|", "«»", "¿¡", "、。",  # punctuation
    "  ", "\t", "\n\n", "\u3000", "\u00a0", "\u200b", "\r\n", "\x00", "\x1b[31m", "\ufeff", "\ufffd", "\u2028",  # whitespace
    "\x85", "\u2029", "\x0b", "\x0c", "\x1f", "\u00ad", "\ud800", "\U000f0000", "\u0378",  # controls, surrogates, unassigned
    "q" * 100, "ab" * 51, "x" * 150, "supercalifragilistic" * 6,  # around the 100-character word limit
]


def corpus(n: int, seed: int = 0) -> list[str]:
    """n strings mixing words, scripts, accents, emoji, punctuation, controls and whitespace."""
    rng = random.Random(seed)
    texts = [*WORDS, *FRAGMENTS, "", " ", " ".join(["word"] * 120)]
    while len(texts) < n:
        k = rng.choice([1, 2, 3, 5, 8, 16])
        parts = [rng.choice(WORDS + FRAGMENTS) if rng.random() < 0.6 else rng.choice(FRAGMENTS) for _ in range(k)]
        text = rng.choice([" ", " ", "", "  ", "\t", ", ", "-", "\u3000"]).join(parts)
        if rng.random() < 0.3:
            text = text.upper()
        if rng.random() < 0.2:  # random code points from the whole range, surrogates and unassigned ones included
            text += "".join(chr(rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x3000)) for _ in range(6))
        texts.append(text)
    return texts


def spells_special_token(text: str) -> bool:
    """transformers maps a literal "[MASK]" (and the other special tokens) in the text to its id;
    bert_text does not, on purpose (see WordPiece). Such strings are left out of the parity runs."""
    return any(s.lower() in text.lower() for s in SPECIALS)


def test_tokenizer_matches_transformers_on_1500_strings(ours, reference):
    texts = [t for t in corpus(1500) if not spells_special_token(t)]
    assert len(texts) >= 1400
    unk = ours.unk_id
    pieces = [ours.encode(t) for t in texts]
    for text, ids in zip(texts, pieces):
        assert ids == reference.encode(text, add_special_tokens=False), repr(text)
    # the corpus reaches every branch: continuation pieces, unknown words, words over 100 characters
    flat = [i for ids in pieces for i in ids]
    assert unk in flat and any(ours.id_to_token[i].startswith("##") for i in flat)
    assert ours.encode("x" * 101) == [unk] and ours.encode("q" * 100) == [unk]  # no ##q: unknown anyway
    assert ours.encode("a" * 100) == [ours.vocab["a"]] + [ours.vocab["##a"]] * 99


def test_tokenizer_matches_rust_tokenizer_on_assigned_characters(ours, vocab_path):
    """A second, independent reference: the `tokenizers` (Rust) BERT pipeline behind
    BertTokenizerFast. Its unicode tables are newer than Python's, so strings with unassigned,
    private-use or surrogate code points are left out; everywhere else the ids agree."""
    fast = transformers.BertTokenizerFast(str(vocab_path), do_lower_case=True)
    texts = [t for t in corpus(1500) if not spells_special_token(t)
             and not any(unicodedata.category(c) in ("Cn", "Co", "Cs") for c in t)]
    assert len(texts) >= 1000
    for text in texts:
        assert ours.encode(text) == fast.encode(text, add_special_tokens=False), repr(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.one_of(st.characters(), st.sampled_from(list("aeiou qxz'.-\u0301\u3000\t日本😀"))), max_size=40))
def test_tokenizer_matches_transformers_on_random_unicode(ours, reference, text):
    assume(not spells_special_token(text))
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_basic_tokenizer_rules():
    assert bert_text.basic_tokenize("Héllo, WORLD!") == ["hello", ",", "world", "!"]
    assert bert_text.basic_tokenize("日本a語") == ["日", "本", "a", "語"]  # CJK ideographs stand alone, kana/Latin do not
    assert bert_text.basic_tokenize("a\x00b\u200bc\ufffd d\u3000e") == ["abc", "d", "e"]  # controls/format dropped
    assert bert_text.basic_tokenize("$5^`~") == ["$", "5", "^", "`", "~"]  # ASCII symbols count as punctuation
    assert bert_text.basic_tokenize("a\u0301") == ["a"] and bert_text.basic_tokenize("\u0301") == []
    assert bert_text.basic_tokenize("Ünï", lower_case=False) == ["Ünï"]
    for c in map(chr, range(0x3000)):
        assert bert_text.is_punctuation(c) == (
            33 <= ord(c) <= 47 or 58 <= ord(c) <= 64 or 91 <= ord(c) <= 96 or 123 <= ord(c) <= 126
            or unicodedata.category(c).startswith("P")
        )


def test_batches_and_masks_match_transformers(ours, reference):
    texts = [t for t in corpus(200, seed=1) if not spells_special_token(t)]
    with pytest.warns(UserWarning, match="cut to 16"):
        tokens = ours(texts, context_length=16)
    expected = reference(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(tokens, expected["input_ids"])
    assert torch.equal(ours.attention_mask(tokens), expected["attention_mask"])
    assert ours("a red circle", context_length=2).tolist() == [[ours.cls_id, ours.sep_id]]
    with pytest.raises(bert_text.BertError, match="context_length"):
        ours("a", context_length=1)


def test_decode_matches_transformers(ours, reference):
    for text in corpus(300, seed=2):
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.convert_tokens_to_string(reference.convert_ids_to_tokens(ids))
    batch = ours(["a red circle to the left of a blue square"], context_length=20)
    assert ours.decode(batch[0]) == "a red circle to the left of a blue square"
    assert ours.decode(ours.encode("Running unbelievable")) == "running unbelievable"
    with pytest.raises(bert_text.BertError, match="not in"):
        ours.decode([len(VOCAB) + 5])


def test_special_token_literals_are_plain_text(ours):
    """A caption cannot produce [MASK] or [SEP]: the brackets are punctuation, the word is lower-cased."""
    ids = ours.encode("a [MASK] and [SEP]")
    assert ours.vocab["[MASK]"] not in ids and ours.sep_id not in ids
    assert ours.tokenize("[MASK]")[0] == "["


def test_vocabulary_errors(tmp_path):
    with pytest.raises(bert_text.BertError, match="does not exist"):
        bert_text.load_wordpiece(tmp_path / "nowhere")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(bert_text.BertError, match="special tokens"):
        bert_text.load_wordpiece(tmp_path)
    (tmp_path / "vocab.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(bert_text.BertError, match="UTF-8"):
        bert_text.load_wordpiece(tmp_path)


# ----------------------------------------------------------------------------------------
# Encoder parity
# ----------------------------------------------------------------------------------------

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=40)
CAPTIONS = [
    "a red circle to the left of a blue square",
    "",
    "Running unbelievable cats, sitting on the table!",
    "日本語 😀 café naïve " * 6,  # longer than every context length below: truncated
    "large",
]


def hf_model(kind, seed: int = 0):
    """A transformers BERT model with seeded random weights; biases and LayerNorms moved away
    from 0 and 1 so a swapped or skipped key shows."""
    # initializer_range 0.1 (BERT uses 0.02) makes attention far from uniform, so a wrong mask shows
    config = transformers.BertConfig(vocab_size=len(VOCAB), initializer_range=0.1, **CONFIG)
    torch.manual_seed(seed)
    model = kind(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def bert_model():
    return hf_model(transformers.BertModel)


@pytest.fixture(scope="module")
def safetensors_folder(bert_model, tmp_path_factory, vocab_path):
    folder = tmp_path_factory.mktemp("bert_safetensors")
    bert_model.save_pretrained(folder)
    (folder / "vocab.txt").write_bytes(vocab_path.read_bytes())
    return folder


def assert_parity(model, encoder, tokenizer, lengths=(5, 12, 40)):
    """States equal transformers' last_hidden_state at every position (padding included), with
    the padding mask and without any mask, for several context lengths."""
    worst = 0.0
    for length in lengths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long caption is cut at every length but 40
            tokens = tokenizer(CAPTIONS, context_length=length)  # (B, L)
        mask = tokenizer.attention_mask(tokens)  # (B, L)
        assert (mask == 0).any()  # the batch is padded
        with torch.no_grad():
            outputs = []
            for m in (mask, None):
                expected = model(input_ids=tokens, attention_mask=m).last_hidden_state
                states = encoder(tokens, m)
                assert states.shape == expected.shape == (len(CAPTIONS), length, CONFIG["hidden_size"])
                worst = max(worst, (states - expected).abs().max().item())
                outputs.append(expected)
        assert (outputs[0] - outputs[1])[mask.bool()].abs().max() > 1e-2  # the mask matters to the captions' states
    assert worst < 1e-4
    return worst


def test_bert_model_safetensors_parity(bert_model, safetensors_folder):
    tokenizer = bert_text.load_wordpiece(safetensors_folder)
    encoder = bert_text.load_bert(safetensors_folder)
    assert encoder.config == bert_text.BertConfig(vocab_size=len(VOCAB), type_vocab_size=2, **CONFIG)
    assert not encoder.training
    worst = assert_parity(bert_model, encoder, tokenizer)
    print(f"max abs diff, safetensors: {worst:.2e}")


def test_pickled_state_dict_parity(bert_model, tmp_path, vocab_path):
    """pytorch_model.bin as transformers 4 wrote it (transformers 5 always writes safetensors):
    a pickled state dict, here with the position_ids buffer older versions saved too."""
    bert_model.config.save_pretrained(tmp_path)
    state = dict(bert_model.state_dict())
    state["embeddings.position_ids"] = torch.arange(CONFIG["max_position_embeddings"])[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    encoder = bert_text.load_bert(tmp_path)
    assert_parity(bert_model, encoder, bert_text.WordPiece(vocab_path), lengths=(7,))


def test_pretraining_checkpoint_with_prefix_heads_and_gamma_beta(tmp_path, vocab_path):
    """BertForPreTraining: keys under "bert.", masked-LM and next-sentence heads skipped; then the
    same weights under TensorFlow-era LayerNorm names (gamma/beta), as bert-base-uncased ships."""
    model = hf_model(transformers.BertForPreTraining, seed=1)
    model.save_pretrained(tmp_path / "hf")
    tokenizer = bert_text.WordPiece(vocab_path)
    assert_parity(model.bert, bert_text.load_bert(tmp_path / "hf"), tokenizer, lengths=(9,))

    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert any(k.startswith("cls.predictions.") for k in state) and any(k.startswith("cls.seq_relationship.") for k in state)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    save_file(renamed, str(tmp_path / "tf" / "model.safetensors"))
    assert_parity(model.bert, bert_text.load_bert(tmp_path / "tf"), tokenizer, lengths=(9,))


def test_sharded_checkpoint(bert_model, safetensors_folder, tmp_path):
    bert_model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    loaded = bert_text.load_bert(tmp_path).state_dict()
    reference = bert_text.load_bert(safetensors_folder).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())


def test_fully_masked_row_stays_finite(safetensors_folder):
    """A row with no key to attend to averages all of them, as BERT's additive mask does (and
    transformers' eager attention; its SDPA path treats such rows differently)."""
    encoder = bert_text.load_bert(safetensors_folder)
    eager = hf_model(transformers.BertModel)
    eager.set_attn_implementation("eager")
    tokens = torch.tensor([[2, 7, 8, 3]])
    with torch.no_grad():
        states = encoder(tokens, torch.zeros_like(tokens))
        expected = eager(input_ids=tokens, attention_mask=torch.zeros_like(tokens)).last_hidden_state
    assert torch.isfinite(states).all() and (states - expected).abs().max() < 1e-4
    with pytest.raises(bert_text.BertError, match="positions"):
        encoder(torch.zeros(1, 41, dtype=torch.long))


def test_from_scratch_encoder_shapes():
    config = bert_text.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=10)
    states = bert_text.BertEncoder(config)(torch.randint(0, 30, (3, 10)), torch.ones(3, 10))
    assert states.shape == (3, 10, 32)
    with pytest.raises(bert_text.BertError, match="divisible"):
        bert_text.BertEncoder(bert_text.BertConfig(hidden_size=30, num_attention_heads=4))


# ----------------------------------------------------------------------------------------
# User errors and the command line
# ----------------------------------------------------------------------------------------


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder_and_files(tmp_path, safetensors_folder):
    with pytest.raises(bert_text.BertError, match="does not exist"):
        bert_text.load_bert(tmp_path / "nowhere")
    with pytest.raises(bert_text.BertError, match="is a file"):
        bert_text.load_bert(safetensors_folder / "config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(bert_text.BertError, match="no config.json"):
        bert_text.load_bert(tmp_path / "empty")
    folder = copy_folder(safetensors_folder, tmp_path / "no_weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(bert_text.BertError, match="no model.safetensors or pytorch_model.bin"):
        bert_text.load_bert(folder)


def test_damaged_files(tmp_path, safetensors_folder):
    folder = copy_folder(safetensors_folder, tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(bert_text.BertError, match="not a readable safetensors"):
        bert_text.load_bert(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(bert_text.BertError, match="not a readable safetensors"):
        bert_text.load_bert(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": object}, folder / "pytorch_model.bin")  # unpickling it would need a global
    with pytest.raises(bert_text.BertError, match="weights-only"):
        bert_text.load_bert(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(bert_text.BertError, match="weights-only"):
        bert_text.load_bert(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(bert_text.BertError, match="JSON"):
        bert_text.load_bert(folder)


def test_mismatches(tmp_path, safetensors_folder):
    folder = copy_folder(safetensors_folder, tmp_path / "shape")
    edit_config(folder, intermediate_size=96)
    with pytest.raises(bert_text.BertError, match=r"has shape \(128, 64\).*\(96, 64\)"):
        bert_text.load_bert(folder)
    edit_config(folder, intermediate_size=128, num_hidden_layers=3)
    with pytest.raises(bert_text.BertError, match="lacks 16 keys"):
        bert_text.load_bert(folder)
    edit_config(folder, num_hidden_layers=2, hidden_act="relu")
    with pytest.raises(bert_text.BertError, match="hidden_act"):
        bert_text.load_bert(folder)
    edit_config(folder, hidden_act="gelu", model_type="roberta")
    with pytest.raises(bert_text.BertError, match="model_type"):
        bert_text.load_bert(folder)
    edit_config(folder, model_type="bert", vocab_size=len(VOCAB) - 1)
    with pytest.raises(bert_text.BertError, match="shape"):
        bert_text.load_bert(folder)
    edit_config(folder, vocab_size=len(VOCAB))
    bert_text.load_bert(folder)  # back to the original: loads again
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(bert_text.BertError, match="1 unexpected"):
        bert_text.load_bert(folder)


def test_command_line(safetensors_folder, capsys, tmp_path):
    bert_text.main(["encode", str(safetensors_folder), "a red circle", "Unbelievable!"])
    out = capsys.readouterr().out
    assert "ids: [2, " in out and "states: (40, 64)" in out
    bert_text.main(["tokenize", str(safetensors_folder / "vocab.txt"), "Running"])
    assert "['run', '##ning']" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        bert_text.main(["encode", str(tmp_path / "nowhere"), "x"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------
# Table 5: Emage with a BERT text tower (train.py --text-init BERT_FOLDER)
# ----------------------------------------------------------------------------------------


def test_emage_trains_and_samples_with_a_bert_tower(bert_model, safetensors_folder, tmp_path, capsys):
    import data
    import emage
    import export_onnx
    import sample
    import train
    import vqgan

    torch.manual_seed(0)
    config = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, n_embed=32, quantizer="vector", norm_groups=4)
    vqgan.save_vqgan(vqgan.VQGAN(config), tmp_path / "vqgan")
    data.prepare(data.ShapesSource(32, seed=0), tmp_path / "vqgan", tmp_path / "tokens", shard_size=32, progress=False)
    flags = ["--data", str(tmp_path / "tokens"), "--variant", "1", "--steps", "1", "--batch-size", "4",
             "--lr", "1e-12", "--eval-every", "1000", "--set", "width=32", "--set", "layers=1", "--set", "heads=2"]
    assert train.main([*flags, "--text-init", str(safetensors_folder), "--bpe", "x.txt", "--out", str(tmp_path / "r0")]) == 1
    assert "reads its own vocab.txt" in capsys.readouterr().err
    assert train.main([*flags, "--text-init", str(safetensors_folder), "--out", str(tmp_path / "run")]) == 0

    pipe = sample.Pipeline.load(tmp_path / "run" / "latest", "cpu")
    text = pipe.model.config.text
    assert isinstance(text, bert_text.BertConfig) and isinstance(pipe.tokenizer, bert_text.WordPiece)
    assert (text.context_length, text.cls_token_id, text.sep_token_id) == (40, pipe.tokenizer.cls_id, pipe.tokenizer.sep_id)
    saved = json.loads((tmp_path / "run" / "latest" / "config.json").read_text())["config"]["text"]
    assert saved["kind"] == "bert" and emage.EmageConfig.from_dict(json.loads(
        (tmp_path / "run" / "latest" / "config.json").read_text())["config"]).text == text
    assert emage._parameter_count(pipe.model.config) == sum(p.numel() for p in pipe.model.parameters())

    captions = ["a red circle to the left of a blue square", "a small green triangle"]
    tokens = pipe.tokenizer(captions, context_length=text.context_length)
    states, valid = pipe.model.text_encoder.states_and_mask(tokens)
    with torch.no_grad():  # the loaded tower is transformers' BertModel, the 1e-12 step aside
        expected = bert_model(input_ids=tokens, attention_mask=valid.long()).last_hidden_state
    assert torch.allclose(states[valid], expected[valid], atol=1e-4)
    empty = pipe.model.empty_caption(2, 6)
    assert empty[:, :2].tolist() == [[pipe.tokenizer.cls_id, pipe.tokenizer.sep_id]] * 2
    assert (empty[:, 2:] == pipe.tokenizer.pad_id).all()
    with torch.no_grad():  # guidance runs the empty caption through the BERT tower as well
        image_tokens = pipe.model.generate(tokens, steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert image_tokens.shape == (2, pipe.model.config.n) and image_tokens.max() < 32

    with pytest.raises(export_onnx.ExportError, match="BERT"):
        export_onnx.export(pipe.model, pipe.vqgan, tmp_path / "onnx", tokenizer_path=tmp_path / "run" / "latest" / "vocab.txt")


def test_a_bert_pretrained_on_shapes_captions_is_a_folder_transformers_reads(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "bert"
    bert_text.main(["train-shapes", "--out", str(out), "--steps", "30", "--batch-size", "16"])
    report = capsys.readouterr().out
    assert "masked_word_accuracy_novel" in report
    config = json.loads((out / "config.json").read_text())
    reference = transformers.BertModel(transformers.BertConfig(**{k: v for k, v in config.items() if k != "architectures"}),
                                       add_pooling_layer=False).eval()
    reference.load_state_dict(load_file(out / "model.safetensors"), strict=True)  # every key, the real names and shapes
    ours, tokenizer = bert_text.load_bert(out), bert_text.load_wordpiece(out)
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.max_position_embeddings) == (128, 3, 24)
    tokens = tokenizer(["a red circle to the left of a blue square", "a large green triangle"], context_length=24)
    assert bert_text.UNK not in tokenizer.tokenize("a small purple circle above a large cyan square")
    mask = tokenizer.attention_mask(tokens)
    with torch.no_grad():
        assert torch.allclose(ours(tokens, mask), reference(input_ids=tokens, attention_mask=mask).last_hidden_state, atol=1e-5)
    with pytest.raises(SystemExit):  # the folder is not replaced without --overwrite
        bert_text.main(["train-shapes", "--out", str(out), "--steps", "2"])
    assert "--overwrite" in capsys.readouterr().err
