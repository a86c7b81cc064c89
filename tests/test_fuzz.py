"""Property-based fuzzing (hypothesis) of the two text front doors: clip_text.Tokenizer
and shapes.parse.

- Any string: the tokenizer returns ids (no exception at all); the batch call gives
  exactly `context_length` ids per caption, start first, the end token at the argmax,
  padding (0) after it.
- Printable ASCII: decode(encode(x)) is the normalised text (clean_text), each pre-token
  followed by one space.
- shapes.parse: a Caption or ShapesError, never another exception; every caption the
  grammar samples parses back to itself.
"""
from __future__ import annotations

import random
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clip_text
import shapes

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKENIZER = clip_text.Tokenizer(clip_text.SHAPES_BPE_PATH)

# Text with everything that has gone wrong in tokenizers: controls, NUL, lone surrogates,
# combining marks, right-to-left marks, emoji, CJK, HTML entities, very long words.
ANY_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=60),
    st.lists(st.sampled_from(["&amp;", "&lt;", "&#x1F534;", "&nbsp;", "\u202e", "\u0301", "\x00", "\ud800",
                              "\U0001F534", "\u7ea2", "<|endoftext|>", "<|startoftext|>", "'s", "'LL", " ", "\t",
                              "a red circle", "x" * 300]), max_size=30).map("".join),
)
PRINTABLE_ASCII = st.text(alphabet=string.printable, max_size=200)


@FUZZ
@given(ANY_TEXT)
def test_the_tokenizer_accepts_any_string(text):
    ids = TOKENIZER.encode(text)
    assert all(isinstance(i, int) and 0 <= i < TOKENIZER.vocab_size for i in ids)
    # The literal special-token strings map to their ids (CLIP does the same); nothing else does.
    specials = text.lower().count("<|startoftext|>") + text.lower().count("<|endoftext|>")
    assert sum(i >= TOKENIZER.sot_id for i in ids) <= specials
    assert isinstance(TOKENIZER.decode(ids), str)


@FUZZ
@given(st.lists(ANY_TEXT, min_size=1, max_size=4), st.integers(min_value=2, max_value=40))
def test_batches_stay_within_the_context_length(texts, context_length):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-tokenizer truncation warning
        tokens = TOKENIZER(texts, context_length=context_length)
    assert tokens.shape == (len(texts), context_length) and tokens.dtype == torch.long
    for row, text in zip(tokens, texts):
        last = int(row.nonzero().max())  # the end token (id 0, "!", may also occur inside a caption)
        assert row[0] == TOKENIZER.sot_id and row[last] == TOKENIZER.eot_id and row[int(row.argmax())] == TOKENIZER.eot_id
        assert (row[last + 1:] == 0).all()
        assert last == min(len(TOKENIZER.encode(text)) + 1, context_length - 1)


@FUZZ
@given(PRINTABLE_ASCII)
def test_decode_inverts_encode_on_printable_ascii(text):
    normalised = clip_text.clean_text(text)
    decoded = TOKENIZER.decode(TOKENIZER.encode(text))
    # every word ends in "</w>", decoded as a space; the special tokens carry none (as in CLIP)
    ending = lambda word: "" if word in (clip_text.SOT, clip_text.EOT) else " "  # noqa: E731
    assert decoded == "".join(word + ending(word) for word in clip_text.WORD_PATTERN.findall(normalised))
    assert decoded.replace(" ", "") == normalised.replace(" ", "")


@FUZZ
@given(st.lists(st.integers(min_value=-5, max_value=TOKENIZER.vocab_size + 5), max_size=30))
def test_decode_takes_any_id_list_or_names_the_bad_id(ids):
    if all(0 <= i < TOKENIZER.vocab_size for i in ids):
        assert isinstance(TOKENIZER.decode(ids), str)
    else:
        with pytest.raises(clip_text.ClipTextError, match="outside this vocabulary"):
            TOKENIZER.decode(ids)


GRAMMAR_WORDS = ["a", "small", "large", *shapes.COLORS, *shapes.SHAPES, "to", "the", "left", "right", "of",
                 "above", "below", ".", "A", "RED", "an", "circles", ""]


@FUZZ
@given(st.one_of(ANY_TEXT, st.lists(st.sampled_from(GRAMMAR_WORDS), max_size=14).map(" ".join)))
def test_parse_returns_a_caption_or_raises_shapes_error(text):
    try:
        caption = shapes.parse(text)
    except shapes.ShapesError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert 1 <= len(caption.objects) <= 2 and (caption.relation is None) == (len(caption.objects) == 1)
    assert len(str(caption).split()) <= 12
    assert shapes.parse(str(caption)) == caption


@FUZZ
@given(st.integers(min_value=0, max_value=2**32), st.sampled_from(["train", "novel", "any"]))
def test_sampled_captions_parse_back_to_themselves(seed, split):
    caption = shapes.sample_caption(random.Random(seed), split)
    parsed = shapes.parse(caption)
    assert str(parsed) == shapes.normalise(caption) and len(caption.split()) <= 12
    assert parsed.is_novel == (split == "novel") or split == "any"


@FUZZ
@given(st.one_of(st.integers(), st.none(), st.binary(max_size=20), st.lists(st.text(max_size=5), max_size=3)))
def test_parse_of_a_non_string_raises_shapes_error(value):
    with pytest.raises(shapes.ShapesError):
        shapes.parse(value)
