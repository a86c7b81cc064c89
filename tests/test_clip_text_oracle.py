"""clip_text against independent implementations: open_clip's and instant-clip-tokenizer's
tokenizers, and Hugging Face transformers' CLIP text models with random weights.

The oracles are test-only dependencies (`pip install --no-deps open_clip_torch
instant-clip-tokenizer transformers` plus huggingface_hub and tokenizers); nothing here
touches the network.
"""
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import instant_clip_tokenizer
import transformers

import clip_text

# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file with the vocabulary its wheel ships.

    Importing the `open_clip` package would pull in torchvision, so tokenizer.py alone is
    executed as a module; it reads the vocabulary from the folder it lives in.
    """
    folder = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", folder / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(folder / clip_text.BPE_FILE_NAME))


@pytest.fixture(scope="module")
def ours():
    return clip_text.Tokenizer()  # finds open_clip's copy of the vocabulary without importing it


WORDS = ["a", "photo", "of", "the", "cat", "dog", "sitting", "on", "table", "Running", "BLUE", "skyscraper",
         "antidisestablishmentarianism", "it's", "THEY'RE", "we'll", "I'm", "you'd", "can't", "o'clock"]
FRAGMENTS = [
    "café", "naïve", "Ångström", "jalapeño", "Straße", "résumé", "ÉCOLE", "İstanbul", "ﬁne", "ǅemal",  # accents, ligatures
    "日本語のテキスト", "猫が好き", "中文字符", "한국어", "ไทย", "עברית", "العربية", "Ελληνικά", "кириллица",  # scripts
    "😀", "👍🏽", "👨‍👩‍👧", "🏳️‍🌈", "🇫🇷", "✨🎉", "❤️",  # emoji, skin tone, ZWJ sequences, flags
    "&amp;", "&lt;b&gt;", "&#39;", "&quot;hi&quot;", "&#x1F600;", "&nbsp;", "&amp;amp;", "&copy;", "&bogus;",  # HTML
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "donâ€™t", "SchÃ¶n",  # mojibake that ftfy repairs
    "3.14159", "1,000,000", "2024-01-01", "#1", "$9.99", "50%", "½", "²", "٣", "Ⅻ",  # numbers
    "!!!", "...", "?!", "—", "–", "(x)", "[y]", "{z}", "@user", "a_b", "C++", "e-mail",  # punctuation
    "  ", "\t", "\n\n", "\u3000", "\u00a0", "\u200b", "\r\n", "\x00", "\x1b[31m", "\ufeff",  # whitespace and controls
]


def tokenizer_corpus(n: int, seed: int = 0) -> list[str]:
    """n strings mixing words, scripts, emoji, HTML entities, mojibake, numbers, whitespace."""
    rng = random.Random(seed)
    texts = [*WORDS, *FRAGMENTS, "", " ", "a" * 300, " ".join(["word"] * 120)]  # over-long ones too
    while len(texts) < n:
        k = rng.choice([1, 2, 4, 8, 16, 40])
        parts = [rng.choice(WORDS + FRAGMENTS) if rng.random() < 0.7 else rng.choice(FRAGMENTS) for _ in range(k)]
        joiner = rng.choice([" ", " ", "", "  ", "\t", ", ", "-"])
        text = joiner.join(parts)
        if rng.random() < 0.3:
            text = text.upper()
        if rng.random() < 0.1:  # random code points from anywhere in the BMP and beyond
            text += "".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)])) for _ in range(5))
        texts.append(text)
    return texts


def test_tokenizer_matches_open_clip_on_2000_strings(ours, open_clip_tokenizer):
    texts = tokenizer_corpus(2000)
    for text in texts:
        assert ours.encode(text) == open_clip_tokenizer.encode(text), text
    with pytest.warns(UserWarning, match="cut to 77"):
        batch = ours(texts, context_length=77)
    assert torch.equal(batch, open_clip_tokenizer(texts, context_length=77))


def test_special_token_literals_follow_openai_names(ours, open_clip_tokenizer):
    """OpenAI maps the literal text <|endoftext|> to the end token; open_clip does the same under
    its own spelling <end_of_text>. We follow OpenAI (the two agree on every other string)."""
    for name, oc_name in ((clip_text.SOT, "<start_of_text>"), (clip_text.EOT, "<end_of_text>")):
        assert ours.encode(f"x {name}y") == open_clip_tokenizer.encode(f"x {oc_name}y")


def test_tokenizer_decodes_like_open_clip(ours, open_clip_tokenizer):
    for text in tokenizer_corpus(300, seed=1):
        ids = ours.encode(text)
        assert ours.decode(ids) == open_clip_tokenizer.decode(ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_tokenizer_matches_open_clip_on_random_unicode(ours, open_clip_tokenizer, text):
    # open_clip names its special tokens <start_of_text>/<end_of_text>, OpenAI <|startoftext|>/<|endoftext|>;
    # a caption spelling one of them literally is the one place where the two differ on purpose.
    cleaned = clip_text.clean_text(text)
    assume(not any(s in cleaned for s in (clip_text.SOT, clip_text.EOT, "<start_of_text>", "<end_of_text>")))
    assert ours.encode(text) == open_clip_tokenizer.encode(text)


def test_tokenizer_matches_instant_clip_tokenizer_where_it_agrees_with_open_clip(ours, open_clip_tokenizer):
    """instant-clip-tokenizer skips ftfy and HTML unescaping; everywhere else it is a second reference."""
    instant = instant_clip_tokenizer.Tokenizer()
    texts = tokenizer_corpus(1000, seed=2)
    agree = [t for t in texts if instant.encode(t) == open_clip_tokenizer.encode(t)]
    assert len(agree) >= 300  # the corpus is made to provoke ftfy and HTML: about 40 % agree
    for text in agree:
        assert ours.encode(text) == instant.encode(text), text
    plain = [t for t in texts if t.isascii() and t.isprintable() and "&" not in t]
    assert len(plain) >= 50
    for text in plain:  # nothing for ftfy or html.unescape to change: all three must agree
        assert ours.encode(text) == instant.encode(text), text
    batch = ours(agree, context_length=77)
    assert torch.equal(batch, torch.from_numpy(instant.tokenize_batch(agree, 77)).long())


# ----------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------

CAPTIONS = [
    "a photo of a cat",
    "A red double-decker bus driving down a rainy London street at night.",
    "",
    "two dogs, one ball & a very long afternoon in the park " * 8,  # truncated to 77 tokens
    "日本語 😀 café",
]


def hf_text_model(width: int, heads: int, layers: int, projection: int, kind=None):
    """A transformers CLIP text model with seeded random weights (biases and LayerNorms too)."""
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads,
        num_hidden_layers=layers, max_position_embeddings=77, projection_dim=projection,
    )
    torch.manual_seed(0)
    model = (kind or transformers.CLIPTextModelWithProjection)(config).eval()
    with torch.no_grad():  # move every bias and LayerNorm away from 0 and 1 so a swapped key shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_openai_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPTextModelWithProjection keys -> OpenAI CLIP checkpoint keys (the
    published correspondence, written out here independently of clip_text's mapping)."""
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t().contiguous(),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    layers = {k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        hf, oa = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[oa + f"attn.in_proj_{p}"] = torch.cat([state[hf + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in names.items():
                out[oa + f"{b}.{p}"] = state[hf + f"{a}.{p}"]
    # what a full OpenAI checkpoint also holds, which the loader must skip
    out.update({"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "visual.proj": torch.zeros(8, 4),
                "logit_scale": torch.tensor(4.6052)})
    return out


def reference_outputs(model, tokens):
    """transformers' outputs without and with the padding mask: (states, pooled, masked states)."""
    valid = torch.arange(tokens.shape[1]) <= tokens.argmax(-1, keepdim=True)  # (B, L): up to the end token
    with torch.no_grad():
        plain = model(input_ids=tokens)
        masked = model(input_ids=tokens, attention_mask=valid.long())
    return plain.last_hidden_state, plain.text_embeds, masked.last_hidden_state


def assert_parity(reference, encoder, tokens):
    states_ref, pooled_ref, masked_ref = reference
    with torch.no_grad():
        states, pooled = encoder(tokens)
    assert (states - states_ref).abs().max() < 1e-4
    assert (pooled - pooled_ref).abs().max() < 1e-4
    # The causal mask already hides the padding from the caption, so the padding mask changes nothing there.
    valid = torch.arange(tokens.shape[1]) <= tokens.argmax(-1, keepdim=True)
    assert (states - masked_ref)[valid].abs().max() < 1e-4


@pytest.fixture(scope="module")
def tokens():
    with pytest.warns(UserWarning):
        return clip_text.Tokenizer()(CAPTIONS, context_length=77)  # (5, 77), padded with 0


@pytest.fixture(scope="module")
def b32(tmp_path_factory, tokens):
    """ViT-B/32-size text tower saved with save_pretrained, and its outputs on `tokens`."""
    model = hf_text_model(512, 8, 12, 512)
    folder = tmp_path_factory.mktemp("hf_b32")
    model.save_pretrained(folder)
    return model, folder, reference_outputs(model, tokens)


def test_vit_b32_size_hugging_face_parity(b32, tokens):
    _, folder, reference = b32
    encoder = clip_text.load_clip_text(folder)
    assert encoder.config == clip_text.TextConfig.vit_b32()
    assert_parity(reference, encoder, tokens)


def test_vit_b32_size_openai_state_dict_parity(b32, tokens, tmp_path):
    model, _, reference = b32
    state = to_openai_keys(model.state_dict())
    save_file(state, str(tmp_path / "openai.safetensors"))
    encoder = clip_text.load_clip_text(tmp_path / "openai.safetensors")
    assert encoder.config == clip_text.TextConfig.vit_b32()
    assert_parity(reference, encoder, tokens)
    # OpenAI ships fp16 weights in a pickled state dict: read without unpickling objects, kept in fp32.
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "ViT-B-32.pt")
    loaded = clip_text.load_clip_text(tmp_path / "ViT-B-32.pt").state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in encoder.state_dict().items())


@pytest.mark.slow
def test_vit_l14_size_hugging_face_and_openai_parity(tokens, tmp_path):
    model = hf_text_model(768, 12, 12, 768)
    model.save_pretrained(tmp_path / "hf")
    reference = reference_outputs(model, tokens)
    encoder = clip_text.load_clip_text(tmp_path / "hf")
    assert encoder.config == clip_text.TextConfig.vit_l14()
    assert_parity(reference, encoder, tokens)
    save_file(to_openai_keys(model.state_dict()), str(tmp_path / "openai.safetensors"))
    assert_parity(reference, clip_text.load_clip_text(tmp_path / "openai.safetensors"), tokens)


def test_clip_model_and_text_model_without_projection(tokens, tmp_path):
    """A full CLIPModel (vision keys skipped), and a CLIPTextModel whose pooled output is un-projected."""
    text = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, num_hidden_layers=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1, image_size=32, patch_size=16)
    torch.manual_seed(1)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=96)).eval()
    full.save_pretrained(tmp_path / "clip")
    encoder = clip_text.load_clip_text(tmp_path / "clip")
    assert (encoder.config.width, encoder.config.heads, encoder.config.embed_dim) == (128, 2, 96)
    with torch.no_grad():
        assert (encoder(tokens)[1] - full.get_text_features(input_ids=tokens).pooler_output).abs().max() < 1e-4

    plain = hf_text_model(128, 4, 2, 128, kind=transformers.CLIPTextModel)
    plain.save_pretrained(tmp_path / "text")
    encoder = clip_text.load_clip_text(tmp_path / "text")
    assert encoder.config.heads == 4  # from config.json, not the width // 64 rule
    with torch.no_grad():
        reference = plain(input_ids=tokens)
        states, pooled = encoder(tokens)
    assert (states - reference.last_hidden_state).abs().max() < 1e-4
    assert (pooled - reference.pooler_output).abs().max() < 1e-4


def test_hugging_face_weights_file_alone(tokens, tmp_path):
    model = hf_text_model(128, 2, 2, 64)  # 64-dimensional heads, the rule used without config.json
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    encoder = clip_text.load_clip_text(tmp_path / "model.safetensors")
    assert encoder.config.heads == 2
    assert_parity(reference_outputs(model, tokens), encoder, tokens)


def test_hugging_face_gelu_variant_is_refused(tmp_path):
    config = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=256, num_attention_heads=2,
                                         num_hidden_layers=1, hidden_act="gelu")
    transformers.CLIPTextModel(config).save_pretrained(tmp_path)
    with pytest.raises(clip_text.ClipTextError, match="quick_gelu"):
        clip_text.load_clip_text(tmp_path)
