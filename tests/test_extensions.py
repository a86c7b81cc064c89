"""What goes beyond the paper (extensions.py), on tiny random models: the Beyond settings and
their checks, colour-factored codes (FactoredEmbedding / FactoredHead), object masking, the
mirror loss, self-score re-ranking, and checkpoints that carry extensions."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import emage
import export_onnx
import extensions
import shapes_tokenizers
import vqgan
from clip_text import TextConfig
from emage import Emage, EmageConfig, EmageError, random_mask, save_checkpoint
from extensions import (Beyond, FactoredEmbedding, FactoredHead, build, colour_hide_sets, mirror_loss, object_mask,
                        self_score)

from tiny import K, M, N, Recorder, captions, images, tiny_config, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def masks_from_seed(seed, batch, count, object_p=0.0, y=None, colours=0):
    """The training masks loss() draws: per masking, u_ratio[B], u_position[B, n], then
    u_object[B, colours] when object_p > 0 (the order emage.py documents)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mask = random_mask(torch.rand(batch, generator=g), torch.rand(batch, N, generator=g), "linear")
        if object_p > 0:
            u_object = torch.rand(batch, colours, generator=g)
            mask = mask | (object_mask(y, u_object[:, 1:], K // colours) & (u_object[:, :1] < object_p))
        out.append(mask)
    return out


# ----------------------------------------------------------------------------------------
# Beyond: the settings, their checks, and the seam
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    ({"colours": 3}, "colours=3 must be 0 or divide codebook_size=16"),
    ({"colours": -4}, "colours=-4"),
    ({"colours": 4, "object_mask": 1.5}, "object_mask must be a probability"),
    ({"colours": 4, "object_mask": float("nan")}, "object_mask must be a probability"),
    ({"object_mask": 0.5}, "object_mask needs colour-factored codes"),
    ({"mirror_loss": -1.0}, "mirror_loss must be a finite weight"),
    ({"mirror_loss": float("inf")}, "mirror_loss must be a finite weight"),
])
def test_beyond_refuses_settings_that_cannot_work(settings, message):
    with pytest.raises(EmageError, match=message):
        Beyond(**settings).check(tiny_config())
    with pytest.raises(EmageError, match=message):
        build(tiny_config(), Beyond(**settings))


def test_beyond_from_dict_names_unknown_settings_and_round_trips():
    beyond = Beyond(colours=4, object_mask=0.3, mirror_loss=1.0)
    assert Beyond.from_dict(beyond.to_dict()) == beyond
    with pytest.raises(EmageError, match=r"unknown extension settings \['block_mask'\]"):
        Beyond.from_dict({"colours": 4, "block_mask": 0.5})


def test_build_hands_in_only_active_extensions():
    assert build(tiny_config()).beyond is None
    assert build(tiny_config(), Beyond()).beyond is None  # everything off: the paper's model
    plain = build(tiny_config())
    assert isinstance(plain.tok_emb, torch.nn.Embedding) and isinstance(plain.head, torch.nn.Linear)
    factored = build(tiny_config(), Beyond(colours=4))
    assert factored.beyond == Beyond(colours=4)
    assert isinstance(factored.tok_emb, FactoredEmbedding) and isinstance(factored.head, FactoredHead)
    mirror_only = build(tiny_config(), Beyond(mirror_loss=1.0))
    assert isinstance(mirror_only.tok_emb, torch.nn.Embedding) and mirror_only.beyond.mirror_loss == 1.0


def test_the_extension_fields_left_emage_config():
    for name in ("colours", "object_mask", "mirror_loss", "relative_positions", "block_mask"):
        with pytest.raises(TypeError):
            tiny_config(**{name: 1})
        with pytest.raises(EmageError, match="does not describe an EmageConfig"):
            EmageConfig.from_dict({**tiny_config().to_dict(), name: 1})


# ----------------------------------------------------------------------------------------
# Colour-factored codes
# ----------------------------------------------------------------------------------------


def test_factored_head_is_a_product_of_two_distributions():
    head = FactoredHead(16, 3, 4)
    x = torch.randn(2, 5, 16)
    logp = head(x).log_softmax(-1).view(2, 5, 3, 4)
    colour, pattern = head.proj(x).split([3, 4], -1)
    expected = colour.log_softmax(-1)[..., :, None] + pattern.log_softmax(-1)[..., None, :]
    assert torch.allclose(logp, expected, atol=1e-6)


def test_factored_embedding_sums_colour_and_pattern_and_keeps_mask_apart():
    embed = FactoredEmbedding(3, 4, 8)
    table = embed.weight  # (13, 8)
    for k in range(12):
        assert torch.allclose(table[k], embed.colour.weight[k // 4] + embed.pattern.weight[k % 4])
    assert torch.allclose(table[12], embed.colour.weight[3] + embed.pattern.weight[4])  # [mask]
    tokens = torch.tensor([[0, 5, 12]])
    assert torch.equal(embed(tokens), table[tokens])


def factored_model(colours=7, patterns=5) -> Emage:
    torch.manual_seed(0)
    text = TextConfig(vocab_size=shapes_tokenizers.SHAPES_VOCAB_SIZE, context_length=24, width=32, heads=2,
                      layers=1, embed_dim=32)
    config = EmageConfig(text=text, codebook_size=colours * patterns, grid=(4, 4), width=32, layers=2, heads=2)
    return build(config, Beyond(colours=colours), variant=3)


def test_factored_model_trains_generates_and_round_trips(tmp_path):
    model = factored_model()
    text = torch.randint(1, 50, (3, 24))
    image_tokens = torch.randint(0, model.config.codebook_size, (3, 16))
    loss = model.loss(text, image_tokens, 3, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.tok_emb.colour.weight.grad is not None and model.head.proj.weight.grad is not None
    tokens = model.eval().generate(text, steps=4, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 16) and tokens.max() < model.config.codebook_size
    save_checkpoint(model, tmp_path / "ckpt", variant=3, step=1, tokenizer_path=shapes_tokenizers.SHAPES_BPE_PATH,
                    vqgan_dir=tmp_path)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["beyond"] == {"colours": 7, "object_mask": 0.0, "mirror_loss": 0.0} and "colours" not in meta["config"]
    loaded, _ = extensions.load_checkpoint(tmp_path / "ckpt")
    assert loaded.beyond == Beyond(colours=7) and isinstance(loaded.tok_emb, FactoredEmbedding)
    again = loaded.generate(text, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, again)


def fitted_quantizer(masks: list[np.ndarray]) -> vqgan.VQGAN:
    model = vqgan.VQGAN(shapes_tokenizers.patterns_config(patterns=len(masks) + 1))
    model.quantize.masks[1:] = torch.from_numpy(np.stack([m.reshape(-1) for m in masks])).float()
    return model


def test_factored_model_and_pattern_decoder_export_to_onnx(tmp_path):
    decoder = fitted_quantizer([np.ones((8, 8), dtype=bool)])  # 7 colours x 2 patterns
    model = factored_model(patterns=2).eval()
    export_onnx.export_graphs(model, decoder, tmp_path)
    diffs = export_onnx.check_graphs(model, decoder, tmp_path)
    assert max(diffs.values()) <= export_onnx.TOLERANCE


# ----------------------------------------------------------------------------------------
# Object masking
# ----------------------------------------------------------------------------------------


def test_object_mask_hides_every_token_of_one_present_colour():
    # 3 colours x 4 patterns: code // 4 is the colour, 0 = empty. Row 0 holds colours 1 and 2,
    # row 1 only colour 2, row 2 nothing.
    tokens = torch.tensor([[0, 4, 5, 0, 9, 11], [0, 8, 0, 0, 1, 10], [0, 1, 2, 3, 0, 0]])
    u = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])  # row 0 picks colour 1; row 1 can only pick 2
    assert object_mask(tokens, u, 4).tolist() == [
        [False, True, True, False, False, False],
        [False, True, False, False, False, True],
        [False] * 6,
    ]
    assert object_mask(tokens[:1], torch.tensor([[0.1, 0.9]]), 4).tolist() == [[False, False, False, False, True, True]]


def test_object_masked_training_hides_one_colour_in_the_chosen_rows():
    model, text = tiny_model(beyond=Beyond(colours=4, object_mask=0.5)), captions(8)
    y = images(8) % 8  # colours 0 and 1 only: every row but an empty one has an object to hide
    rec = Recorder(model)
    model.loss(text, y, 1, generator=torch.Generator().manual_seed(6))
    (mask,) = masks_from_seed(6, 8, 1, object_p=0.5, y=y, colours=4)
    (plain,) = masks_from_seed(6, 8, 1)
    assert torch.equal(rec.inputs[0], torch.where(mask, M, y))
    assert torch.equal(mask & plain, plain) and (mask.sum(1) > plain.sum(1)).any()
    hidden_rows = mask.sum(1) > plain.sum(1)
    assert mask[hidden_rows][y[hidden_rows] >= 4].all()  # colour 1, the only one present, is hidden


# ----------------------------------------------------------------------------------------
# The mirror loss
# ----------------------------------------------------------------------------------------


def test_mirror_loss_is_the_softplus_of_the_contrast_advantage_per_token():
    y = images(3)
    logits = torch.randn(3, N, K)
    assert torch.allclose(mirror_loss(logits, logits, y), torch.tensor(math.log(2) / N))  # no preference
    better = logits.scatter(-1, y[..., None], 20.0)  # the caption explains Y far better
    assert mirror_loss(better, logits, y) < 1e-6 < mirror_loss(logits, better, y)
    ll = lambda z: F.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1).sum(-1)  # noqa: E731
    contrast = torch.randn(3, N, K)
    assert torch.allclose(mirror_loss(logits, contrast, y), F.softplus(ll(contrast) - ll(logits)).mean() / N)


def test_variant3_mirror_loss_reads_pass_2_input_with_the_contrast_caption():
    model, text, y = tiny_model(beyond=Beyond(mirror_loss=0.5)), captions(4), images(4)
    contrast = text.clone()
    contrast[[1, 3], 1] = (text[[1, 3], 1] % 37) + 1  # rows 1 and 3 get another first word
    rec = Recorder(model)
    loss = model.loss(text, y, 3, generator=torch.Generator().manual_seed(5), contrast_tokens=contrast)
    assert len(rec.logits) == 3  # pass 1, pass 2, pass 2 again with the contrast captions
    expected = model._decode(model.tok_emb(rec.inputs[1][[1, 3]]) + model.pos_emb, *model.encode_text(contrast[[1, 3]]))
    assert torch.allclose(rec.logits[2], expected, atol=1e-5)  # the same Y_obs, read with the contrast
    ce = F.cross_entropy(rec.logits[1].flatten(0, 1), y.flatten())
    assert torch.allclose(loss, ce + 0.5 * mirror_loss(rec.logits[1][[1, 3]], rec.logits[2], y[[1, 3]]))
    plain = model.loss(text, y, 3, generator=torch.Generator().manual_seed(5))
    same = model.loss(text, y, 3, generator=torch.Generator().manual_seed(5), contrast_tokens=text)
    assert torch.equal(same, plain) and torch.allclose(plain, ce)  # a row that is its own contrast adds nothing
    with pytest.raises(EmageError, match="shaped like the captions"):
        model.loss(text, y, 3, contrast_tokens=contrast[:2])


def test_mirror_loss_skips_rows_trained_on_the_empty_caption():
    model = tiny_model(beyond=Beyond(mirror_loss=1.0), caption_dropout=0.5).train()
    calls = []
    model.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].clone()))
    text = captions(64)
    contrast = text.clone()
    contrast[:, 1] = (text[:, 1] % 37) + 1
    model.loss(text, images(64), 3, generator=torch.Generator().manual_seed(0), contrast_tokens=contrast)
    kept = (calls[0] == text).all(-1)  # rows whose caption survived dropout
    assert 10 < kept.sum() < 54 and torch.equal(calls[1], contrast[kept])


def test_mirror_loss_teaches_the_caption_to_beat_its_contrast():
    text, y = captions(8), images(8)
    contrast = text.clone()
    contrast[:, 1] = (text[:, 1] % 37) + 1

    def margin_after(weight):
        model = tiny_model(seed=3, beyond=Beyond(mirror_loss=weight))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(30):
            loss = model.loss(text, y, 3, generator=torch.Generator().manual_seed(step), contrast_tokens=contrast)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            masked = torch.full_like(y, M)
            ll = lambda t: F.log_softmax(model.round_logits(masked, *model.encode_text(t)), -1).gather(  # noqa: E731
                -1, y[..., None]).sum()
            return float(ll(text) - ll(contrast))

    assert margin_after(2.0) > margin_after(0.0) + 1.0


def test_mirror_batch_inputs_are_the_mirrored_captions():
    from clip_text import Tokenizer

    tokenizer = Tokenizer(shapes_tokenizers.SHAPES_BPE_PATH)
    captions_ = ["a red circle to the left of a blue square", "a green triangle"]
    got = Beyond(mirror_loss=1.0).batch_inputs(captions_, tokenizer, 24)
    expected = tokenizer(["a red circle to the right of a blue square", "a green triangle"], context_length=24)
    assert torch.equal(got["contrast_tokens"], expected)  # no relation: its own contrast, which the loss skips
    assert Beyond(colours=4).batch_inputs(captions_, tokenizer, 24) == {}


# ----------------------------------------------------------------------------------------
# Self-score re-ranking
# ----------------------------------------------------------------------------------------


def test_colour_hide_sets_hide_each_colour_once_and_never_the_background():
    tokens = torch.tensor([[0, 4, 5, 0, 9, 11], [0, 8, 0, 0, 1, 10], [0, 1, 2, 3, 0, 0]])  # 3 colours x 4 patterns
    hide = colour_hide_sets(tokens, 4, 3)  # (2, 3, 6): colours 1 and 2
    assert hide.shape == (2, 3, 6)
    assert hide[0].tolist() == (tokens // 4 == 1).tolist() and hide[1].tolist() == (tokens // 4 == 2).tolist()
    assert not (hide[0] & hide[1]).any() and torch.equal(hide.any(0), tokens >= 4)


def _hidden_score(model, text, y, hide):
    """sum over hide-sets and hidden positions of log p(y_i | the rest), one image and one set at a time."""
    scores = torch.zeros(len(y))
    with torch.no_grad():
        for b in range(len(y)):
            kv, mask = model.encode_text(text[b : b + 1])
            for h in hide[:, b]:
                logits = model.round_logits(torch.where(h, M, y[b])[None], kv, mask)[0]  # (n, K)
                scores[b] += F.log_softmax(logits, -1)[torch.arange(N), y[b]][h].sum()
    return scores


def test_self_score_predicts_each_colour_of_the_image_from_the_rest():
    model, text, y = tiny_model(beyond=Beyond(colours=4)).eval(), captions(5), images(5, seed=2)
    y[0] = y[0] % 4  # an empty image: nothing to hide, score 0
    y[1] = torch.where(y[1] >= 8, y[1], y[1] % 4)  # colours 2 and 3 only
    hide = torch.stack([y // 4 == k for k in range(1, 4)])
    got = self_score(model, text, y)
    assert got[0] == 0 and torch.allclose(got, _hidden_score(model, text, y, hide), atol=1e-4)
    other = self_score(model, captions(5, seed=9), y)
    assert not torch.allclose(got[1:], other[1:])  # the caption is read


def test_self_score_without_colours_hides_random_halves_in_the_documented_order():
    model, text, y = tiny_model().eval(), captions(4), images(4)
    got = self_score(model, text, y, generator=torch.Generator().manual_seed(3), random_sets=3)
    hide = torch.rand(3, 4, N, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.allclose(got, _hidden_score(model, text, y, hide), atol=1e-4)
    with pytest.raises(EmageError, match="one caption per image"):
        self_score(model, text[:2], y)


def test_self_score_adds_the_weighted_first_round_log_ratio_against_the_contrast():
    model, text, y = tiny_model(beyond=Beyond(colours=4)).eval(), captions(4), images(4, seed=5)
    contrast = captions(4, seed=11)
    contrast[2] = text[2]  # a caption contrasted with itself adds nothing
    base = self_score(model, text, y)
    got = self_score(model, text, y, contrast_tokens=contrast, contrast_weight=0.5)
    expected = base.clone()
    with torch.no_grad():
        for b in range(4):
            for caption, sign in ((text[b : b + 1], 1), (contrast[b : b + 1], -1)):
                logits = model.round_logits(torch.full((1, N), M), *model.encode_text(caption))[0]
                expected[b] += sign * 0.5 * F.log_softmax(logits, -1)[torch.arange(N), y[b]].sum()
    assert torch.allclose(got, expected, atol=1e-3)
    assert torch.isclose(got[2], base[2], atol=1e-4) and not torch.allclose(got, base)
    default = self_score(model, text, y, contrast_tokens=contrast)  # CONTRAST_WEIGHT
    assert torch.allclose(default - base, (got - base) * extensions.CONTRAST_WEIGHT / 0.5, atol=1e-3)
    with pytest.raises(EmageError, match="one contrast caption per image"):
        self_score(model, text, y, contrast_tokens=contrast[:3])


# ----------------------------------------------------------------------------------------
# Checkpoints with extensions
# ----------------------------------------------------------------------------------------


def saved(tmp_path, model, name="ck") -> tuple:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("#version: 0.2\n")
    out = save_checkpoint(model, tmp_path / name, variant=3, step=5, tokenizer_path=vocab, vqgan_dir=tmp_path)
    return out, json.loads((out / "config.json").read_text())


def same_tokens(a: Emage, b: Emage) -> bool:
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    return torch.equal(a.generate(captions(2), steps=4, generator=g()), b.generate(captions(2), steps=4, generator=g()))


def test_a_checkpoint_with_extensions_is_refused_by_emage_load_checkpoint(tmp_path):
    out, meta = saved(tmp_path, tiny_model(beyond=Beyond(colours=4, mirror_loss=1.0)).eval())
    assert meta["beyond"] == {"colours": 4, "object_mask": 0.0, "mirror_loss": 1.0}
    with pytest.raises(EmageError, match=r"uses features beyond the paper \(colours, object_mask, mirror_loss\): "
                                         r"load it with extensions.load_checkpoint"):
        emage.load_checkpoint(out)
    loaded, info = extensions.load_checkpoint(out)
    assert loaded.beyond == Beyond(colours=4, mirror_loss=1.0) and info["step"] == 5


def test_a_checkpoint_without_extensions_loads_either_way(tmp_path):
    model = tiny_model().eval()
    out, meta = saved(tmp_path, model)
    assert "beyond" not in meta
    plain, _ = emage.load_checkpoint(out)
    through, _ = extensions.load_checkpoint(out)
    assert plain.beyond is None and through.beyond is None
    assert same_tokens(plain, model) and same_tokens(through, model)


def test_a_legacy_checkpoint_with_colours_in_its_config_loads_through_extensions(tmp_path):
    """Checkpoints written before the split (the shipped demo's, among them) kept the extension
    settings inside "config", next to the retired fields switched off."""
    model = tiny_model(beyond=Beyond(colours=4, object_mask=0.3)).eval()
    out, meta = saved(tmp_path, model)
    legacy = dict(meta)
    beyond = legacy.pop("beyond")
    legacy["config"] = {**meta["config"], **beyond, "relative_positions": False, "block_mask": 0.0}
    (out / "config.json").write_text(json.dumps(legacy))
    loaded, _ = extensions.load_checkpoint(out)
    assert loaded.beyond == Beyond(colours=4, object_mask=0.3) and loaded.config == model.config
    assert same_tokens(loaded, model)
    with pytest.raises(EmageError, match="does not describe an EmageConfig"):
        emage.load_checkpoint(out)  # the paper's loader knows no colours


def test_a_legacy_checkpoint_that_used_a_retired_experiment_is_refused(tmp_path):
    out, meta = saved(tmp_path, tiny_model().eval())
    for name, on in (("relative_positions", True), ("block_mask", 0.5)):
        legacy = {**meta, "config": {**meta["config"], name: on}}
        (out / "config.json").write_text(json.dumps(legacy))
        with pytest.raises(EmageError, match=f"uses {name}, an experiment retired from the code"):
            extensions.load_checkpoint(out)
