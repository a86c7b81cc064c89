"""sample.py beyond plain generation: editing (inpainting, outpainting, variation), negative
prompts, and re-ranking of candidates (by the generator itself or by CLIP), on a tiny random checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_image
import clip_text
import emage
import extensions
import sample
import vqgan
from shapes_tokenizers import SHAPES_BPE_PATH

PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random Emage checkpoint (variant 3, guidance-ready) over a random shapes VQGAN, and a random shapes CLIP."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    small = vqgan.VQGANConfig(resolution=64, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                              z_channels=8, embed_dim=8, n_embed=64, quantizer="vector", norm_groups=1)  # 64 px -> 8 x 8
    vqgan.save_vqgan(vqgan.VQGAN(small), root / "vqgan")
    tokenizer = clip_text.Tokenizer(SHAPES_BPE_PATH)
    text = clip_text.TextConfig(vocab_size=tokenizer.vocab_size, context_length=24, width=32, heads=2, layers=1,
                                embed_dim=32)
    config = emage.EmageConfig(text=text, codebook_size=small.n_embed, grid=(8, 8), width=32,
                               layers=1, heads=2)
    emage.save_checkpoint(emage.Emage(config), root / "emage", variant=3, step=1,
                          tokenizer_path=SHAPES_BPE_PATH, vqgan_dir=root / "vqgan")
    clip_image.save_clip(clip_image.CLIP(clip_image.shapes_text_config(), clip_image.VisionConfig.shapes()),
                         root / "clip", SHAPES_BPE_PATH)
    Image.new("RGB", (64, 64)).save(root / "black.png")
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[8:30, 4:26] = (230, 40, 40)
    image[30:50, 36:56] = (50, 90, 240)
    Image.fromarray(image).save(root / "input.png")
    return root


@pytest.fixture(scope="module")
def pipe(tiny) -> sample.Pipeline:
    return sample.Pipeline.load(tiny / "emage", "cpu")


def args_for(tiny, *extra):
    return sample.build_parser().parse_args([PROMPT, "--init-image", str(tiny / "input.png"), *extra])


# ---- selections -------------------------------------------------------------------------


def test_region_covers_every_cell_it_touches():
    pixels = sample.region_pixels((10, 0, 17, 8), (64, 64))  # x 10..16 touches cell columns 1 and 2, row 0
    cells = sample.cells_to_redraw(pixels, (8, 8)).reshape(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0, 1:3] = True
    assert torch.equal(cells, expected)
    with pytest.raises(sample.SampleError, match="x0 < x1"):
        sample.region_pixels((20, 0, 10, 8), (64, 64))


def test_mask_image_white_is_redrawn_and_resized(tmp_path):
    mask = np.zeros((16, 16), dtype=np.uint8)  # a quarter-size mask: resized (nearest) to the canvas
    mask[:4, :4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    cells = sample.cells_to_redraw(sample.mask_pixels(tmp_path / "mask.png", (64, 64)), (8, 8)).reshape(8, 8)
    assert cells[:2, :2].all() and cells.sum() == 4


def test_random_subset_takes_the_fraction_of_the_selection():
    selected = torch.zeros(64, dtype=torch.bool)
    selected[10:30] = True
    chosen = sample.random_subset(selected, 0.25, torch.Generator().manual_seed(0))
    assert chosen.sum() == 5 and not (chosen & ~selected).any()
    assert sample.random_subset(selected, 0.001, torch.Generator().manual_seed(0)).sum() == 1  # at least one


# ---- editing ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, redrawn", [
    (["--region", "32,24,64,56"], 16),  # 4 x 4 cells
    (["--strength", "0.25"], 16),  # variation: a quarter of all 64 tokens
    (["--region", "0,0,64,16", "--strength", "0.5"], 8),  # half of the top two rows
])
@pytest.mark.parametrize("algorithm", [1, 3])
def test_editing_never_changes_tokens_outside_the_mask(pipe, tiny, flags, redrawn, algorithm):
    args = args_for(tiny, *flags)
    canvas, init, keep = sample.edit_inputs(args, pipe)
    assert canvas.size == (64, 64) and init.shape == keep.shape == (1, 64)
    assert (~keep).sum() == redrawn
    tokens, history = pipe.generate(PROMPT, seed=3, num_images=3, steps=4, algorithm=algorithm, init_tokens=init,
                                    keep_mask=keep, return_history=True)
    fixed = keep.expand(3, -1)
    for state in history:  # every round, every candidate
        assert torch.equal(state[fixed], init.expand(3, -1)[fixed])
    assert not (tokens == pipe.model.config.mask_id).any()
    assert not torch.equal(tokens[0][~keep[0]], tokens[1][~keep[0]])  # the redrawn part is sampled


def test_outpainting_keeps_the_placed_image(pipe, tiny):
    small = Image.fromarray(np.full((32, 24, 3), 200, dtype=np.uint8))  # 24 wide, 32 high
    small.save(tiny / "small.png")
    args = sample.build_parser().parse_args([PROMPT, "--init-image", str(tiny / "small.png"), "--place", "8,16"])
    canvas, init, keep = sample.edit_inputs(args, pipe)
    assert np.asarray(canvas)[16:48, 8:32].min() == 200 and np.asarray(canvas)[:16].max() == 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 1:4] = True  # the cells fully covered by the pasted image
    assert torch.equal(keep.reshape(8, 8), expected)


def test_edit_command_line_writes_the_image_and_the_strip(tiny, tmp_path, capsys):
    out = tmp_path / "edit.png"
    code = sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(out), "--steps", "3",
                        "--init-image", str(tiny / "input.png"), "--region", "32,24,64,56", "--show-edit",
                        "--upscale", "1", "--device", "cpu"])
    assert code == 0
    with Image.open(out) as image:
        assert image.size == (64, 64) and '"region": "32,24,64,56"' in image.text["parameters"]
    with Image.open(tmp_path / "edit-edit.png") as strip:
        assert strip.size == (3 * 64 + 4, 64)
        mask = np.asarray(strip)[:, 66:130]
    assert mask[24:56, 32:64].min() == 255 and mask[:24].max() == 0


@pytest.mark.parametrize("flags, message", [
    (["--region", "1,2,3"], "--region takes 4 integers"),
    (["--region", "0,0,64,64", "--mask", "m.png"], "one of --mask, --region and --place"),
    (["--strength", "1.5"], "--strength"),
    (["--algorithm", "ar"], "algorithm 1 or 3"),
    (["--place", "100,100"], "outside the 64x64 canvas"),
])
def test_editing_user_errors_are_one_line(tiny, tmp_path, capsys, flags, message):
    code = sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(tmp_path / "x.png"),
                        "--steps", "2", "--device", "cpu", "--init-image", str(tiny / "input.png"), *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_editing_flags_need_an_init_image(tiny, capsys):
    assert sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--region", "0,0,8,8"]) == 1
    assert "--init-image" in capsys.readouterr().err


# ---- negative prompts ----------------------------------------------------------------------


def test_negative_prompt_of_the_empty_caption_is_plain_guidance(pipe):
    options = dict(seed=5, num_images=3, steps=4, guidance_scale=3.0)
    plain = pipe.generate(PROMPT, **options)
    empty = pipe.generate(PROMPT, negative_prompt="", **options)
    assert torch.equal(plain, empty)
    other = pipe.generate(PROMPT, negative_prompt="a green triangle", **options)
    assert not torch.equal(plain, other)  # a real negative prompt does change the images


# ---- re-ranking ----------------------------------------------------------------------------


def test_reranking_keeps_the_argmax_of_the_clip_similarity(tiny, pipe, tmp_path, capsys):
    out = tmp_path / "best.png"
    code = sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(out), "--steps", "3",
                        "--seed", "4", "--num-images", "2", "--candidates", "3", "--rerank", "clip", "--clip", str(tiny / "clip"),
                        "--upscale", "1", "--device", "cpu"])
    assert code == 0
    defaults = sample.build_parser().get_default
    candidates = pipe.decode(pipe.generate(PROMPT, seed=4, num_images=6, steps=3, guidance_scale=defaults("guidance"),
                                           temperature=defaults("temperature")))  # the same 2 x 3 draws
    reranker = clip_image.load_reranker(tiny / "clip")
    for i in range(2):
        group = np.stack([np.asarray(c) for c in candidates[3 * i:3 * i + 3]])
        scores = reranker(group, PROMPT)
        assert len(set(scores.tolist())) == 3  # distinct scores: the choice is visible
        with Image.open(out.with_name(f"best-{i}.png")) as kept:
            assert np.array_equal(np.asarray(kept), group[int(np.argmax(scores))])
    assert "kept" in capsys.readouterr().err


MIRRORED = PROMPT.replace("left", "right")


@pytest.mark.parametrize("flags, contrast", [([], None), (["--contrast", "mirror"], MIRRORED),
                                             (["--contrast", "a blue square"], "a blue square")])
def test_default_reranking_keeps_the_argmax_of_the_self_score(tiny, pipe, tmp_path, capsys, flags, contrast):
    """Against no contrast unless --contrast names one (mirror: the prompt mirrored)."""
    out = tmp_path / "best.png"
    code = sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(out), "--steps", "3",
                        "--seed", "4", "--num-images", "2", "--upscale", "1", "--device", "cpu", *flags])
    assert code == 0
    C, defaults = sample.DEFAULT_CANDIDATES, sample.build_parser().get_default
    assert C > 1 and f"self scores of the {C} candidates" in capsys.readouterr().err
    tokens = pipe.generate(PROMPT, seed=4, num_images=2 * C, steps=3, guidance_scale=defaults("guidance"),
                           temperature=defaults("temperature"))  # the same 2 x C draws
    text = pipe.text_tokens([PROMPT]).expand(2 * C, -1)
    against = pipe.text_tokens([contrast]).expand(2 * C, -1) if contrast else None
    scores = extensions.self_score(pipe.model, text, tokens, generator=torch.Generator().manual_seed(4),
                                   contrast_tokens=against).view(2, C)
    candidates = pipe.decode(tokens)
    for i in range(2):
        assert len(set(scores[i].tolist())) == C  # distinct scores: the choice is visible
        with Image.open(out.with_name(f"best-{i}.png")) as kept:
            assert np.array_equal(np.asarray(kept), np.asarray(candidates[i * C + int(scores[i].argmax())]))
            parameters = json.loads(kept.text["parameters"])
            assert parameters["rerank"] == "self" and parameters.get("contrast") == contrast


def test_the_judge_is_retired(tiny, tmp_path, capsys):
    """Re-ranking is the self-score or CLIP; the caption-image judge and its flags are gone."""
    for flags in (["--judge", "auto"], ["--judge-weight", "5"]):
        with pytest.raises(SystemExit) as exit_info:
            sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(tmp_path / "x.png"), *flags])
        assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert not (Path(sample.__file__).parent / "judge.py").exists()
    assert not (sample.DEMO_CHECKPOINT.parent / "judge").exists()


def test_an_empty_contrast_is_a_user_error(tiny, tmp_path, capsys):
    code = sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(tmp_path / "x.png"),
                        "--contrast", " ", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "--contrast is empty" in err and "Traceback" not in err


def test_best_of_keeps_the_candidate_with_the_highest_self_score(pipe):
    tokens = pipe.generate(PROMPT, seed=2, num_images=5, steps=3)
    scores = pipe.self_scores(PROMPT, tokens, seed=2, contrast=MIRRORED)
    assert not np.allclose(scores, pipe.self_scores(PROMPT, tokens, seed=2))  # the contrast counts
    best = pipe.best_of(PROMPT, 5, seed=2, contrast=MIRRORED, steps=3)
    assert torch.equal(best, tokens[int(np.argmax(scores))][None])
    plain = pipe.best_of(PROMPT, 5, seed=2, steps=3)  # no contrast by default
    assert torch.equal(plain, tokens[int(np.argmax(pipe.self_scores(PROMPT, tokens, seed=2)))][None])
    assert torch.equal(pipe.best_of(PROMPT, 1, seed=2, steps=3), pipe.generate(PROMPT, seed=2, steps=3))  # plain draw


def test_self_reranking_on_onnx_is_a_user_error(tiny, tmp_path, capsys):
    code = sample.main([PROMPT, "--backend", "onnx", "--onnx-dir", str(tmp_path), "--candidates", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "--rerank self needs the PyTorch generator" in err and "Traceback" not in err


def test_reranking_without_a_clip_checkpoint_is_a_user_error(tiny, tmp_path, capsys):
    code = sample.main([PROMPT, "--checkpoint", str(tiny / "emage"), "--out", str(tmp_path / "x.png"),
                        "--candidates", "2", "--rerank", "clip", "--clip", str(tmp_path / "missing"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "does not exist" in err and "Traceback" not in err


def test_prompt_outside_the_shapes_grammar_warns_in_one_line_and_still_generates(tiny, tmp_path, capsys):
    out = tmp_path / "dog.png"
    assert sample.main(["a dog on a sofa", "--checkpoint", str(tiny / "emage"), "--out", str(out), "--steps", "2",
                        "--device", "cpu"]) == 0
    assert out.is_file()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "only knows the shapes world" in warnings[0]


def test_region_edits_of_the_shipped_demo_pass_in_a_majority_of_seeds():
    """Issue #12's measure on the committed demo: ask for another object in place of the second
    one and redraw its cells (benchmarks/edit_rerank.py region-edit; measured: 74 of 100)."""
    import argparse

    from benchmarks import edit_rerank

    args = argparse.Namespace(checkpoint=str(sample.DEMO_CHECKPOINT), steps=16, seeds=100, save=None,
                              temperature=sample.DEFAULT_TEMPERATURE, guidance=1.0)
    report = edit_rerank.region_edit(args)
    assert report["pass_rate"] > 0.5
    assert all(0 < r["cells_redrawn"] < 64 for r in report["results"])  # only the region is redrawn


def test_rerank_benchmark_ranks_the_same_draws_twice():
    """benchmarks/edit_rerank.py rerank on the shipped demo, 4 captions: with one candidate both
    re-rankers keep it, and no re-ranker beats "any of C passes"."""
    from benchmarks import edit_rerank

    parser_args = ["rerank", "--every", "60", "--candidates", "1", "3", "--seeds", "1", "--steps", "4"]
    args = edit_rerank.build_parser().parse_args(parser_args)
    rows = edit_rerank.rerank(args)["rows"]
    accuracy = lambda row, kind: row[kind]["all"]["accuracy"]  # noqa: E731
    assert rows["1"]["self"] == rows["1"]["clip"] == rows["1"]["any_of_c"]
    for kind in ("self", "clip"):
        assert accuracy(rows["3"], kind) <= accuracy(rows["3"], "any_of_c")
    assert accuracy(rows["1"], "any_of_c") <= accuracy(rows["3"], "any_of_c")
