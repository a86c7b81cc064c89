"""Property-based fuzzing (hypothesis) of the two text front doors, clip_text.Tokenizer and
shapes.parse, and of the image front door, files.open_image.

- Any string: the tokenizer returns ids (no exception at all); the batch call gives
  exactly `context_length` ids per caption, start first, the end token at the argmax,
  padding (0) after it.
- Printable ASCII: decode(encode(x)) is the normalised text (clean_text), each pre-token
  followed by one space.
- shapes.parse: a Caption or ShapesError, never another exception; every caption the
  grammar samples parses back to itself.
- files.open_image: any bytes, and any damage to a real PNG or JPEG, give an RGB image or
  a one-line FileError, never another exception.
- files.png_text and files.read_json: any bytes, and any damage to a PNG with text chunks,
  give text (within the caps) or a one-line FileError; a whole PNG gives what Pillow reads.
"""
from __future__ import annotations

import io
import json
import random
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clip_text
import files
import shapes
from shapes_tokenizers import SHAPES_BPE_PATH

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKENIZER = clip_text.Tokenizer(SHAPES_BPE_PATH)

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


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    shapes.render("a red circle to the left of a blue square", 0).save(buffer, format=fmt)
    return buffer.getvalue()


REAL_IMAGES = {"PNG": _encoded("PNG"), "JPEG": _encoded("JPEG")}


def _assert_image_or_file_error(blob: bytes):
    try:
        image = files.open_image(blob, "upload.png")
    except files.FileError as error:
        assert str(error).startswith("upload.png ") and "\n" not in str(error)
        return None
    assert image.mode == "RGB" and image.width * image.height <= files.MAX_IMAGE_PIXELS
    return image


@FUZZ
@given(st.binary(max_size=512))
def test_open_image_of_any_bytes_is_an_image_or_a_file_error(blob):
    _assert_image_or_file_error(blob)


@FUZZ
@given(st.sampled_from(sorted(REAL_IMAGES)), st.integers(min_value=0, max_value=10**6),
       st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255)),
                max_size=8))
def test_open_image_of_a_damaged_image_is_an_image_or_a_file_error(fmt, cut, flips):
    blob = bytearray(REAL_IMAGES[fmt])
    for position, value in flips:  # overwrite a few bytes, header included
        blob[position % len(blob)] = value
    image = _assert_image_or_file_error(bytes(blob[: max(1, cut % (len(blob) + 1))]))
    if image is not None and not flips:  # only cut: the whole picture or an error, never a half-decoded one
        assert image.tobytes() == files.open_image(REAL_IMAGES[fmt]).tobytes()


# ----------------------------------------------------------------------------------------
# files.png_text and files.read_json: the other two bounded readers of user files
# ----------------------------------------------------------------------------------------


def _assert_text_or_file_error(blob: bytes):
    try:
        text = files.png_text(blob, "upload.png")
    except files.FileError as error:
        assert str(error).startswith("upload.png ") and "\n" not in str(error)
        return None
    assert isinstance(text, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in text.items())
    assert sum(len(v) for v in text.values()) <= files.MAX_TEXT_MEMORY
    return text


def _png_with_text() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", '{"prompt": "a red circle", "seed": 0}')
    info.add_text("caption", "a red circle", zip=True)
    info.add_itxt("note", "\u7ea2\u8272\u7684\u5706", zip=True)
    buffer = io.BytesIO()
    shapes.render("a red circle", 0).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


PNG_WITH_TEXT = _png_with_text()


@FUZZ
@given(st.one_of(st.binary(max_size=512), st.binary(max_size=512).map(lambda b: files.PNG_SIGNATURE + b)))
def test_png_text_of_any_bytes_is_text_or_a_file_error(blob):
    _assert_text_or_file_error(blob)


@FUZZ
@given(st.integers(min_value=0, max_value=10**6),
       st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255)), max_size=8))
def test_png_text_of_a_damaged_png_is_text_or_a_file_error(cut, flips):
    blob = bytearray(PNG_WITH_TEXT)
    for position, value in flips:
        blob[position % len(blob)] = value
    text = _assert_text_or_file_error(bytes(blob[: max(1, cut % (len(blob) + 1))]))
    if not flips and cut % (len(blob) + 1) >= len(blob):  # whole: every chunk, decoded as Pillow decodes it
        assert text == Image.open(io.BytesIO(PNG_WITH_TEXT)).text


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_read_json_of_any_bytes_is_a_value_or_a_file_error(tmp_path_factory, blob):
    path = tmp_path_factory.getbasetemp() / "config.json"
    path.write_bytes(blob)
    try:
        files.read_json(path, "config.json")
    except files.FileError as error:
        assert str(error).startswith("config.json ") and "\n" not in str(error)
