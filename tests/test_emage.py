"""Invariants of every training variant and inference algorithm of emage.py, on tiny random models."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from emage import (
    VARIANTS,
    Emage,
    EmageConfig,
    EmageError,
    commit_algorithm1,
    commit_algorithm3,
    commit_counts,
    guided_logits,
    load_checkpoint,
    mask_schedule,
    random_mask,
    sample_tokens,
    save_checkpoint,
)

from tiny import K, L, M, N, Recorder, captions, images, tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def masks_from_seed(seed, batch, count, schedule="linear"):
    """The training masks loss() draws: per masking, u_ratio[B], then u_position[B, n] (documented order)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        u_ratio = torch.rand(batch, generator=g)
        out.append(random_mask(u_ratio, torch.rand(batch, N, generator=g), schedule))
    return out


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------


def test_mask_schedule_closed_forms():
    assert mask_schedule("linear", 0.25) == 0.25
    assert mask_schedule("cosine", 0.0) == 0.0
    assert mask_schedule("cosine", 1.0) == pytest.approx(1.0)
    assert mask_schedule("cosine", 0.5) == pytest.approx(1 - math.sqrt(0.5))
    r = torch.linspace(0, 1, 11)
    assert torch.all(mask_schedule("cosine", r) <= mask_schedule("linear", r) + 1e-7)  # fewer kept early
    with pytest.raises(EmageError):
        mask_schedule("square", 0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps,n", [(16, 1024), (16, 64), (4, 64), (32, 12), (16, 5)])
def test_commit_counts_follow_the_schedule(schedule, steps, n):
    counts = commit_counts(schedule, steps, n)[:, 0].tolist()
    assert counts[-1] == n  # the last round commits all
    prev = 0
    for t, c in enumerate(counts, start=1):
        floor = math.floor(mask_schedule(schedule, t / steps) * n + 1e-9)
        assert c == (n if t == steps else min(n, max(floor, prev + 1)))
        assert c > prev or c == n
        prev = c
    if schedule == "linear" and steps <= n:  # each round adds >= 1 anyway: exactly floor(t n / T)
        assert counts == [t * n // steps for t in range(1, steps + 1)]


def test_commit_counts_paper_linear():
    # Section 3.2: linear schedule, T = 16, n = 1024 -> 64 new tokens per round
    assert commit_counts("linear", 16, 1024)[:, 0].tolist() == [64 * t for t in range(1, 17)]


def test_random_mask_count_is_uniform_on_1_to_n():
    # linear: k = ceil((1 - u) n) for u ~ U[0, 1): each k in {1..n} has probability 1/n
    n = 8
    u = (torch.arange(800) + 0.5) / 800  # an even grid over [0, 1)
    k = random_mask(u, torch.rand(800, n), "linear").sum(-1)
    assert torch.bincount(k, minlength=n + 1).tolist() == [0] + [100] * n
    assert random_mask(torch.zeros(1), torch.rand(1, n), "linear").all()  # u = 0: everything masked
    assert random_mask(torch.zeros(1), torch.rand(1, n), "cosine").all()
    # cosine masks more than linear (Section 4.7): masked fraction cos(pi u / 2) >= 1 - u
    kc = random_mask(u, torch.rand(800, n), "cosine").sum(-1)
    assert kc.float().mean() > k.float().mean()


def test_random_mask_picks_the_smallest_noise():
    u_pos = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    mask = random_mask(torch.tensor([0.5]), u_pos, "linear")  # k = ceil(0.5 * 4) = 2
    assert mask.tolist() == [[False, True, False, True]]


def test_sample_tokens_inverse_cdf():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(1, 5, 4)
    u = torch.tensor([[0.05, 0.15, 0.35, 0.65, 0.99]])
    tokens, p = sample_tokens(logits, u)
    assert tokens.tolist() == [[0, 1, 2, 3, 3]]
    assert torch.allclose(p, probs[tokens])
    greedy, p0 = sample_tokens(logits, u, temperature=0)
    assert greedy.tolist() == [[3] * 5] and torch.allclose(p0, torch.full_like(p0, 0.4))


def test_commit_algorithm1_keeps_committed_tokens():
    tokens = torch.tensor([[5, M, M, M]])
    committed = tokens != M
    sampled = torch.tensor([[9, 1, 2, 3]])
    confidence = torch.tensor([[-9.0, -1.0, -3.0, -2.0]])  # the committed token scores lowest
    new, keep = commit_algorithm1(tokens, committed, sampled, confidence, torch.tensor([3]), M)
    assert new.tolist() == [[5, 1, M, 3]]  # position 0 unchanged (P_obs = 1), top-2 new ones added
    assert keep.tolist() == [[True, True, False, True]]


def test_commit_algorithm3_revises_committed_tokens():
    tokens = torch.tensor([[5, 7, M, M]])
    committed = tokens != M
    fixed = torch.tensor([[False, True, False, False]])  # an edited token that must stay
    sampled = torch.tensor([[9, 8, 2, 3]])
    confidence = torch.tensor([[-9.0, -9.0, -3.0, -2.0]])
    new, keep = commit_algorithm3(tokens, committed, fixed, sampled, confidence, torch.tensor([3]), M)
    assert new.tolist() == [[9, 7, M, 3]]  # position 0 revised, position 1 fixed, one new token
    assert keep.tolist() == [[True, True, False, True]]


def test_guided_logits_scale_one_is_conditional():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, K, generator=g), torch.randn(2, 3, K, generator=g)
    assert torch.allclose(guided_logits(cond, uncond, 1.0), cond, atol=1e-6)  # uncond + (cond - uncond): rounding
    assert torch.allclose(guided_logits(cond, uncond, 0.0), uncond)
    assert torch.allclose(guided_logits(cond, uncond, 2.0), 2 * cond - uncond, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Training losses
# ----------------------------------------------------------------------------------------


def test_variant1_masks_exactly_and_loss_covers_only_masked_positions():
    model, text, y = tiny_model(), captions(4), images(4)
    rec = Recorder(model)
    loss = model.loss(text, y, 1, generator=torch.Generator().manual_seed(3))
    (mask,) = masks_from_seed(3, 4, 1)
    assert torch.equal(rec.inputs[0], torch.where(mask, M, y))  # [mask] exactly at masked positions
    loss.backward()
    grad = rec.logits[0].grad.abs().sum(-1)  # (B, n)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask] > 0)
    expected = F.cross_entropy(rec.logits[0][mask], y[mask])
    assert torch.allclose(loss, expected)


def test_variant2_pass2_is_variant1_on_y_mix():
    model, text, y = tiny_model(), captions(4), images(4)
    rec = Recorder(model)
    loss = model.loss(text, y, 2, generator=torch.Generator().manual_seed(4))
    mask1, mask2 = masks_from_seed(4, 4, 2)
    assert torch.equal(rec.inputs[0], torch.where(mask1, M, y))
    y_mix = torch.where(mask1, rec.logits[0].argmax(-1), y)  # pass 1 fills only the masked positions
    assert torch.equal(rec.inputs[1], torch.where(mask2, M, y_mix))
    loss.backward()
    grad = rec.logits[1].grad.abs().sum(-1)
    assert torch.all(grad[~mask2] == 0) and torch.all(grad[mask2] > 0)
    assert not rec.logits[0].requires_grad  # pass1_grad=False: pass 1 ran under no_grad


def test_variant3_algorithm2_and_loss_covers_all_positions():
    model, text, y = tiny_model(), captions(4), images(4)
    rec = Recorder(model)
    loss = model.loss(text, y, 3, generator=torch.Generator().manual_seed(5))
    mask1, mask2 = masks_from_seed(5, 4, 2)
    assert torch.equal(rec.inputs[0], torch.where(mask1, M, y))  # line 5: Y_mask
    y_pred = torch.where(mask1, rec.logits[0].argmax(-1), y)  # line 6, keeping the tokens pass 1 was shown
    assert torch.equal(rec.inputs[1], torch.where(mask2, M, y_pred))  # line 7: Y_obs
    loss.backward()
    assert torch.all(rec.logits[1].grad.abs().sum(-1) > 0)  # line 9: loss on all positions
    assert torch.allclose(loss, F.cross_entropy(rec.logits[1].flatten(0, 1), y.flatten()))


def test_variant3_literal_line6_overwrites_every_position():
    model, text, y = tiny_model(pass1_keep_seen=False), captions(4), images(4)
    rec = Recorder(model)
    model.loss(text, y, 3, generator=torch.Generator().manual_seed(5))
    mask1, mask2 = masks_from_seed(5, 4, 2)
    y_pred = rec.logits[0].argmax(-1)  # Y_pred at every position, shown ones included
    assert not torch.equal(y_pred[~mask1], y[~mask1])  # a random model does not copy its input
    assert torch.equal(rec.inputs[1], torch.where(mask2, M, y_pred))


def test_variant3_sampled_pass1_with_gradient():
    model = tiny_model(pass1="sample", pass1_grad=True)
    rec = Recorder(model)
    loss = model.loss(captions(4), images(4), 3, generator=torch.Generator().manual_seed(6))
    loss.backward()
    assert rec.logits[0].requires_grad and rec.logits[0].grad.abs().sum() > 0  # straight-through reaches pass 1
    model_ng = tiny_model(pass1="sample")
    loss_ng = model_ng.loss(captions(4), images(4), 3, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(loss, loss_ng)  # the straight-through estimator leaves forward values unchanged


def test_full_and_ar_inputs():
    model, text, y = tiny_model(), captions(3), images(3)
    rec = Recorder(model)
    model.loss(text, y, "full")
    assert torch.all(rec.inputs[0] == M)
    model.loss(text, y, "ar")
    assert torch.equal(rec.inputs[1], torch.cat([torch.full((3, 1), M), y[:, :-1]], 1))  # start token, shift


def test_ar_logits_are_causal():
    model, text, y = tiny_model().eval(), captions(2), images(2)
    kv, mask = model.encode_text(text)
    y2 = y.clone()
    y2[:, 7:] = (y2[:, 7:] + 1) % K  # change the future
    a = model.round_logits(y, kv, mask, causal=True)
    b = model.round_logits(y2, kv, mask, causal=True)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])


def test_caption_dropout_uses_the_empty_caption():
    model = tiny_model(caption_dropout=0.5).train()
    calls = []
    model.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].clone()))
    text = captions(64)
    model.loss(text, images(64), 1, generator=torch.Generator().manual_seed(0))
    seen = calls[0]
    dropped = (seen != text).any(-1)
    assert 10 < dropped.sum() < 54
    assert torch.equal(seen[dropped], model.empty_caption(int(dropped.sum()), L))
    assert seen[dropped][0, :2].tolist() == [38, 39]  # [sot, eot] padded


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_loss_decreases_on_a_fixed_batch(variant):
    model, text, y = tiny_model(), captions(8), images(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss = model.loss(text, y, variant, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_unknown_variant_is_a_user_error():
    with pytest.raises(EmageError, match="unknown variant"):
        tiny_model().loss(captions(1), images(1), 4)
    with pytest.raises(EmageError, match="image tokens"):
        tiny_model().loss(captions(1), images(1)[:, :5], 1)


# ----------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [1, 3])
@pytest.mark.parametrize("schedule,steps", [("cosine", 8), ("linear", 5), ("cosine", 16)])
def test_committed_counts_per_round_match_the_schedule(algorithm, schedule, steps):
    model = tiny_model().eval()
    tokens, history = model.generate(
        captions(3), steps=steps, algorithm=algorithm, schedule=schedule, num_candidates=2,
        generator=torch.Generator().manual_seed(1), return_history=True,
    )
    assert history.shape == (steps, 6, N)
    counts = (history != M).sum(-1)  # (T, B')
    assert torch.equal(counts, commit_counts(schedule, steps, N).expand(-1, 6))
    assert not (tokens == M).any() and torch.equal(tokens, history[-1])
    assert tokens.min() >= 0 and tokens.max() < K


def test_algorithm1_never_changes_a_committed_token():
    model = tiny_model().eval()
    _, history = model.generate(captions(4), steps=8, algorithm=1, generator=torch.Generator().manual_seed(2), return_history=True)
    for t in range(1, 8):
        before, after = history[t - 1], history[t]
        committed = before != M
        assert torch.equal(after[committed], before[committed])


def test_algorithm3_revises_committed_tokens():
    model = tiny_model().eval()
    _, history = model.generate(captions(4), steps=8, algorithm=3, generator=torch.Generator().manual_seed(2), return_history=True)
    changed = 0
    for t in range(1, 8):
        before, after = history[t - 1], history[t]
        committed = before != M
        assert torch.all(after[committed] != M)  # committed positions stay unmasked (line 5)
        changed += int((after[committed] != before[committed]).sum())
    assert changed > 0  # ... but their values are revised


def test_full_algorithm_is_one_pass():
    model = tiny_model().eval()
    rec = Recorder(model)
    tokens, history = model.generate(captions(2), algorithm="full", return_history=True)
    assert len(rec.logits) == 1 and history.shape == (1, 2, N) and not (tokens == M).any()


def test_text_encoder_runs_once_per_caption():
    model = tiny_model().eval()
    calls = []
    model.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    rec = Recorder(model)
    model.generate(captions(3), steps=6, num_candidates=4, guidance_scale=3.0)
    assert calls == [6]  # 3 captions + 3 negatives, once; never per round or per candidate
    assert len(rec.logits) == 6 and rec.logits[0].shape[0] == 2 * 3 * 4  # guidance: one doubled batch per round


def test_ar_with_and_without_cache_agree_under_greedy_decoding():
    model = tiny_model().eval()
    text = captions(3)
    cached = model.generate(text, algorithm="ar", temperature=0, use_cache=True)
    uncached = model.generate(text, algorithm="ar", temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    guided = model.generate(text, algorithm="ar", temperature=0, guidance_scale=2.0, use_cache=True)
    guided_uncached = model.generate(text, algorithm="ar", temperature=0, guidance_scale=2.0, use_cache=False)
    assert torch.equal(guided, guided_uncached)
    # greedy AR = argmax of the causal decoder's next-token logits at every position
    kv, mask = model.encode_text(text)
    logits = model.round_logits(torch.cat([torch.full((3, 1), M), cached[:, :-1]], 1), kv, mask, causal=True)
    assert torch.equal(logits.argmax(-1), cached)


@pytest.mark.parametrize("algorithm", [1, 3, "ar"])
def test_guidance_scale_one_equals_no_guidance(algorithm):
    model = tiny_model().eval()
    text = captions(2)
    plain = model.generate(text, steps=6, algorithm=algorithm, generator=torch.Generator().manual_seed(7))
    negative = captions(2, seed=9)
    one = model.generate(text, steps=6, algorithm=algorithm, guidance_scale=1.0, negative_tokens=negative, generator=torch.Generator().manual_seed(7))
    assert torch.equal(plain, one)
    three = model.generate(text, steps=6, algorithm=algorithm, guidance_scale=3.0, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(plain, three)


def test_guidance_matches_the_formula_on_the_first_round():
    model = tiny_model().eval()
    text = captions(2)
    rec = Recorder(model)
    model.generate(text, steps=1, algorithm=1, guidance_scale=2.5)
    kv, mask = model.encode_text(text)
    kv0, mask0 = model.encode_text(model.empty_caption(2, L))
    start = torch.full((2, N), M)
    cond, uncond = model.round_logits(start, kv, mask), model.round_logits(start, kv0, mask0)
    assert torch.allclose(rec.logits[0], torch.cat([cond, uncond]), atol=1e-5)


@pytest.mark.parametrize("algorithm", [1, 3, "ar"])
def test_result_does_not_depend_on_the_rest_of_the_batch(algorithm):
    model = tiny_model().eval()
    a, b, c = captions(3, seed=11)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    first = model.generate(torch.stack([a, b]), steps=6, algorithm=algorithm, num_candidates=2, generator=g())
    second = model.generate(torch.stack([a, c]), steps=6, algorithm=algorithm, num_candidates=2, generator=g())
    assert torch.equal(first[:2], second[:2])  # caption a's two candidates
    assert not torch.equal(first[2:], second[2:])


@pytest.mark.parametrize("algorithm", ["full", 1, 3, "ar"])
def test_same_seed_same_tokens(algorithm):
    model = tiny_model().eval()
    text = captions(2)
    run = lambda seed: model.generate(text, steps=5, algorithm=algorithm, num_candidates=3, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    x = run(0)
    assert x.shape == (6, N) and torch.equal(x, run(0)) and not torch.equal(x, run(1))
    assert not torch.equal(x[0], x[1])  # candidates of one caption differ


@pytest.mark.parametrize("algorithm", [1, 3])
def test_editing_keeps_the_kept_tokens_and_fills_the_rest(algorithm):
    model = tiny_model().eval()
    init = images(2, seed=3)
    keep = torch.zeros(2, N, dtype=torch.bool)
    keep[0, :4] = True
    keep[1, ::2] = True
    tokens, history = model.generate(
        captions(2), steps=4, algorithm=algorithm, init_tokens=init, keep_mask=keep, num_candidates=2,
        generator=torch.Generator().manual_seed(0), return_history=True,
    )
    keep2, init2 = keep.repeat_interleave(2, 0), init.repeat_interleave(2, 0)
    assert torch.all(history[:, keep2] == init2[keep2])  # fixed in every round
    assert not (tokens == M).any()
    free = (~keep2).sum(-1)
    expected = torch.stack([commit_counts("cosine", 4, int(f))[:, 0] for f in free], 1) + keep2.sum(-1)
    assert torch.equal((history != M).sum(-1), expected)


def test_default_algorithm_follows_the_variant():
    model = tiny_model().eval()
    text = captions(2)
    for variant, algorithm in [(1, 1), (2, 1), (3, 3), ("full", "full")]:
        model.variant = variant
        assert torch.equal(
            model.generate(text, steps=4, generator=torch.Generator().manual_seed(0)),
            model.generate(text, steps=4, algorithm=algorithm, generator=torch.Generator().manual_seed(0)),
        )


def test_padding_after_the_end_token_is_ignored():
    model, text, y = tiny_model().eval(), captions(3), images(3)
    noisy = text.clone()
    after_end = torch.arange(L) > text.argmax(-1, keepdim=True)
    noisy[after_end] = 5  # garbage where the padding was
    a = model.round_logits(y, *model.encode_text(text))
    b = model.round_logits(y, *model.encode_text(noisy))
    assert torch.allclose(a, b, atol=1e-5)


def test_empty_caption_matches_the_tokenizer():
    from clip_text import Tokenizer
    from shapes_tokenizers import SHAPES_BPE_PATH

    model = Emage(EmageConfig.shapes())
    assert torch.equal(model.empty_caption(2, 24), Tokenizer(SHAPES_BPE_PATH)(["", ""], context_length=24))


def test_paper_preset_size():
    with torch.device("meta"):  # count without allocating 1 GB
        model = Emage(EmageConfig.paper())
    total = sum(p.numel() for p in model.parameters())
    text = sum(p.numel() for p in model.text_encoder.parameters())
    assert (round(total / 1e5), round(text / 1e5), model.config.n) == (2505, 1237, 1024)  # docstring of paper()


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(pass1="sample", caption_dropout=0.1).eval()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("#version: 0.2\n")
    (tmp_path / "vqgan").mkdir()
    out = tmp_path / "run" / "emage"
    save_checkpoint(model, out, variant=3, step=123, tokenizer_path=vocab, vqgan_dir=tmp_path / "vqgan", extra={"lr": 1e-3})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["vqgan_dir"] == "../../vqgan" and meta["variant"] == 3 and meta["tokenizer"] == "vocab.txt"
    loaded, info = load_checkpoint(out)
    assert loaded.config == model.config and info["variant"] == 3 and info["step"] == 123
    assert info["vqgan_dir"] == str((tmp_path / "vqgan").resolve())
    assert info["tokenizer_path"] == str((out / "vocab.txt").resolve()) and info["extra"] == {"lr": 1e-3}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.generate(captions(2), steps=4, generator=g()), model.generate(captions(2), steps=4, algorithm=3, generator=g()))


def test_checkpoint_mismatch_names_the_tensor(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("x")
    save_checkpoint(tiny_model(), tmp_path / "ck", variant=1, step=0, tokenizer_path=vocab, vqgan_dir=tmp_path)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["config"]["codebook_size"] = 32
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(EmageError, match=r"tok_emb\.weight has shape \(17, 32\), config.json implies \(33, 32\)"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(EmageError, match="not an Emage checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("preset", ["paper", "shapes"])
def test_the_size_check_counts_the_parameters_the_model_has(preset):
    """_check_config refuses huge configs from a count made without building the model; that
    count must be the model's own (built here on the meta device, no memory)."""
    from emage import _parameter_count

    config = getattr(EmageConfig, preset)()
    with torch.device("meta"):
        model = Emage(config)
    assert _parameter_count(config) == sum(p.numel() for p in model.parameters())
