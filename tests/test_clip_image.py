"""clip_image on its own: the vision tower's CLIP semantics, preprocessing, checkpoint round
trips, the re-ranker, the contrastive loss and the shapes training helpers. Parity with
transformers is in test_clip_image_oracle.py."""
import json
from pathlib import Path
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_image
import clip_text
import shapes
from shapes_tokenizers import SHAPES_BPE_PATH, SHAPES_VOCAB_SIZE

TINY = clip_image.VisionConfig(image_size=32, patch_size=8, width=32, heads=2, layers=2, embed_dim=16)
TEXT = clip_text.TextConfig(vocab_size=SHAPES_VOCAB_SIZE, context_length=16, width=32, heads=2, layers=1,
                            embed_dim=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_presets_match_openai_towers():
    b32, l14 = clip_image.VisionConfig.vit_b32(), clip_image.VisionConfig.vit_l14()
    assert (b32.grid, b32.width, b32.layers, b32.embed_dim) == (7, 768, 12, 512)
    assert (l14.grid, l14.width, l14.layers, l14.heads, l14.embed_dim) == (16, 1024, 24, 16, 768)
    with torch.device("meta"):
        count = sum(p.numel() for p in clip_image.VisionEncoder(l14).parameters())
    assert 303_000_000 < count < 304_500_000  # CLIP ViT-L/14's image tower: 303.97M (open_clip's count)


def test_pooled_is_the_projected_class_token():
    torch.manual_seed(0)
    encoder = clip_image.VisionEncoder(TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states, pooled = encoder(x)
        assert states.shape == (2, 17, 32) and pooled.shape == (2, 16)  # class token + 4 x 4 patches
        assert torch.allclose(pooled, encoder.ln_post(states[:, 0]) @ encoder.proj, atol=1e-6)


def test_every_token_sees_every_patch():
    torch.manual_seed(0)
    encoder = clip_image.VisionEncoder(TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 24:, 24:] += 1  # change only the last patch
    with torch.no_grad():
        a, b = encoder(x)[0], encoder(y)[0]
    assert ((a - b).abs().amax(-1) > 1e-4).all()  # no causal mask: the class token and the first patch change


def test_wrong_image_size_is_a_user_error():
    encoder = clip_image.VisionEncoder(TINY)
    with pytest.raises(clip_image.ClipImageError, match=r"\[B, 3, 32, 32\]"):
        encoder(torch.zeros(1, 3, 64, 64))


def test_preprocess_normalises_and_resizes_shorter_side_then_crops():
    image = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    x = clip_image.preprocess(image, 32)
    expected = (1 - torch.tensor(clip_image.MEAN)) / torch.tensor(clip_image.STD)
    assert torch.allclose(x[0, :, 5, 7], expected)
    wide = np.zeros((2, 40, 80, 3), dtype=np.uint8)
    wide[:, :, 60:] = 255  # right quarter white: after resizing to 32 x 64 and cropping the centre 32 x 32 ...
    y = clip_image.preprocess(wide, 32)
    assert y.shape == (2, 3, 32, 32)
    assert torch.allclose(y[0, :, :, :20], (0 - torch.tensor(clip_image.MEAN)).div(torch.tensor(clip_image.STD))
                          .view(3, 1, 1).expand(3, 32, 20), atol=1e-5)  # ... the left part is black


def test_native_round_trip_and_reranker_is_cosine_similarity(tmp_path):
    torch.manual_seed(1)
    model = clip_image.CLIP(TEXT, TINY)
    clip_image.save_clip(model, tmp_path / "clip", SHAPES_BPE_PATH)
    assert (tmp_path / "clip" / SHAPES_BPE_PATH.name).is_file()
    reranker = clip_image.load_reranker(tmp_path / "clip")
    loaded = reranker.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    g = torch.Generator().manual_seed(2)
    candidates = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    caption = "a red circle above a blue square"
    scores = reranker(candidates, caption)
    tokens = clip_text.Tokenizer(SHAPES_BPE_PATH)([caption], context_length=16)
    with torch.no_grad():
        image = model.visual(clip_image.preprocess(candidates, 32))[1]
        text = model.text(tokens)[1]
    expected = F.cosine_similarity(image, text.expand_as(image), dim=-1)
    assert scores.shape == (4,) and scores.dtype == np.float32
    assert np.allclose(scores, expected.numpy(), atol=1e-5)
    # the vision tower alone loads from the whole-CLIP folder; the re-ranker refuses a single tower
    vision = clip_image.load_clip_image(tmp_path / "clip")
    assert all(torch.equal(vision.state_dict()[k], v) for k, v in model.visual.state_dict().items())
    clip_image.save_clip_image(model.visual, tmp_path / "vision")
    with pytest.raises(clip_image.ClipImageError, match="one tower"):
        clip_image.load_reranker(tmp_path / "vision")


def test_mismatched_weights_are_refused(tmp_path):
    clip_image.save_clip(clip_image.CLIP(TEXT, TINY), tmp_path, SHAPES_BPE_PATH)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["vision"]["layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(clip_image.ClipImageError, match="does not match"):
        clip_image.load_clip(tmp_path)


def test_contrastive_loss_closed_form_and_shared_captions():
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    distinct = ["a red circle", "a blue square", "a green triangle", "a cyan square"]
    expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert torch.allclose(clip_image.contrastive_loss(logits, distinct), expected)
    # rows 0 and 2 share a caption: each is a positive of the other, with half the target mass each
    shared = ["a red circle", "a blue square", "a red circle", "a cyan square"]
    target = torch.tensor([[.5, 0, .5, 0], [0, 1, 0, 0], [.5, 0, .5, 0], [0, 0, 0, 1]])
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(clip_image.contrastive_loss(logits, shared), expected)


def test_mutated_captions_differ_by_one_detail_and_stay_in_the_split():
    rng = random.Random(0)
    for _ in range(300):
        caption = shapes.sample_caption(rng, "train")
        mutated = clip_image.mutate_caption(caption, rng)
        a, b = shapes.parse(caption), shapes.parse(mutated)
        assert mutated != caption and not b.is_novel
        assert len(a.objects) == len(b.objects)
        changed = sum(x != y for x, y in zip(a.objects, b.objects)) + (a.relation != b.relation)
        assert changed == 1


def test_shapes_batch_pairs_each_caption_with_a_hard_negative():
    images, captions = clip_image.shapes_batch(random.Random(1), 8)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 8
    for image, caption in zip(images, captions):
        assert shapes.score(image, caption)  # every image shows its own caption


def test_command_line_errors_are_one_line(tmp_path, capsys):
    assert clip_image.main(["score", "x.png", "--caption", "a red circle", "--clip", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # read with files.open_image
    assert clip_image.main(["score", str(tmp_path / "broken.png"), "--caption", "a red circle",
                            "--clip", str(clip_image.SHAPES_CLIP)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a readable image" in err and err.count("\n") == 1


def test_train_shapes_never_replaces_a_checkpoint_without_overwrite(tmp_path, capsys, monkeypatch):
    before = {p.name: p.read_bytes() for p in clip_image.SHAPES_CLIP.iterdir()}
    assert clip_image.main(["train-shapes", "--out", str(clip_image.SHAPES_CLIP), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in clip_image.SHAPES_CLIP.iterdir()} == before  # the shipped one
    monkeypatch.chdir(tmp_path)  # the default --out: runs/shapes-clip under the working directory
    quick = ["train-shapes", "--steps", "1", "--batch-size", "4"]
    assert clip_image.main(quick) == 0
    out = tmp_path / "runs" / "shapes-clip"
    first = (out / "model.safetensors").read_bytes()
    assert clip_image.main([*quick, "--seed", "1"]) == 1 and (out / "model.safetensors").read_bytes() == first
    assert clip_image.main([*quick, "--seed", "1", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert json.loads((out / "config.json").read_text())["training"]["seed"] == 1


def test_committed_shapes_clip_reproduces_its_recorded_evaluation():
    """The shipped checkpoint loads, and re-evaluating it gives the numbers train-shapes stored."""
    model, tokenizer = clip_image.load_clip(clip_image.SHAPES_CLIP)
    assert model.visual.config == clip_image.VisionConfig.shapes() and model.text.config == clip_image.shapes_text_config()
    recorded = json.loads((clip_image.SHAPES_CLIP / "config.json").read_text())["training"]
    measured = clip_image.retrieval_accuracy(model, tokenizer)
    assert measured["beats_hard_negative"] == pytest.approx(recorded["beats_hard_negative"], abs=1e-6)
    assert measured["retrieval_top1"] == pytest.approx(recorded["retrieval_top1"], abs=1e-6)
    assert measured["beats_hard_negative"] > 0.75  # an image prefers its caption to a one-detail change


def test_the_text_tower_of_a_native_whole_clip_loads_for_text_init(tmp_path):
    """train.py --text-init reads clip_image.py's whole CLIP (Table 5's CLIP row): its text.* weights."""
    torch.manual_seed(0)
    text = clip_text.TextConfig(vocab_size=clip_image.SHAPES_VOCAB_SIZE, context_length=24, width=64, heads=4, layers=2,
                                embed_dim=32)
    model = clip_image.CLIP(text, clip_image.VisionConfig.shapes())
    clip_image.save_clip(model, tmp_path / "clip", clip_image.SHAPES_BPE_PATH)
    tower = clip_text.load_clip_text(tmp_path / "clip")
    assert tower.config == text
    assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in tower.state_dict().items())
    vocabulary = clip_text.vocabulary_beside(tmp_path / "clip")  # what train.py tokenises captions with
    assert vocabulary == tmp_path / "clip" / clip_image.SHAPES_BPE_PATH.name
    assert clip_text.Tokenizer(vocabulary).vocab_size == text.vocab_size
    meta = json.loads((tmp_path / "clip" / "config.json").read_text())
    for hostile in ("../clip/" + vocabulary.name, "/etc/passwd", "..", 7):
        (tmp_path / "clip" / "config.json").write_text(json.dumps({**meta, "tokenizer": hostile}))
        assert clip_text.vocabulary_beside(tmp_path / "clip") is None


def test_train_shapes_at_the_generators_text_size_writes_a_tower_text_init_reads(tmp_path):
    """`train-shapes --text-size emage` (paper_experiments' Table 5 CLIP row): the generator's
    3-layer, width-128 tower, paired with the shapes vision tower."""
    out = tmp_path / "clip"
    assert clip_image.main(["train-shapes", "--text-size", "emage", "--steps", "1", "--batch-size", "4",
                            "--out", str(out)]) == 0
    tower = clip_text.load_clip_text(out)
    assert (tower.config.width, tower.config.layers, tower.config.context_length) == (128, 3, 24)


def test_train_starts_from_a_native_whole_clip_with_the_vocabulary_it_names(tmp_path, capsys):
    """Table 5's CLIP row: train.py --text-init CLIP_FOLDER tokenises with the folder's own
    vocabulary; a --bpe of another size is a one-line error, not a failed weight copy."""
    import data
    import emage
    import train
    import vqgan

    torch.manual_seed(0)
    config = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, n_embed=32, quantizer="vector", norm_groups=4)
    vqgan.save_vqgan(vqgan.VQGAN(config), tmp_path / "vqgan")
    data.prepare(data.ShapesSource(32, seed=0), tmp_path / "vqgan", tmp_path / "tokens", shard_size=32, progress=False)
    text = clip_text.TextConfig(vocab_size=SHAPES_VOCAB_SIZE, context_length=24, width=32, heads=2, layers=1, embed_dim=32)
    clip_image.save_clip(clip_image.CLIP(text, clip_image.VisionConfig.shapes()), tmp_path / "clip", SHAPES_BPE_PATH)
    flags = ["--data", str(tmp_path / "tokens"), "--variant", "1", "--steps", "1", "--batch-size", "4", "--lr", "1e-12",
             "--eval-every", "1000", "--set", "layers=1", "--text-init", str(tmp_path / "clip")]
    assert train.main([*flags, "--bpe", str(clip_text.find_bpe()), "--out", str(tmp_path / "r0")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{SHAPES_VOCAB_SIZE} ids" in err
    assert train.main([*flags, "--out", str(tmp_path / "run")]) == 0
    model, info = emage.load_checkpoint(tmp_path / "run" / "latest")
    assert model.config.text == text and Path(info["tokenizer_path"]).name == SHAPES_BPE_PATH.name
    tower = clip_text.load_clip_text(tmp_path / "clip")
    assert torch.allclose(model.text_encoder.token_embedding.weight, tower.token_embedding.weight, atol=1e-6)  # lr 1e-12
