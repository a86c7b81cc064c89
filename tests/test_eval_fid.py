"""eval_fid.py: the FID InceptionV3 against torch-fidelity's, the Fréchet distance's closed forms,
the statistics cache, the COCO caption sampler and the command line."""
import importlib
import importlib.util
import json
import math
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import clip_text
import emage
import eval_fid
import sample
import extensions
import inception as inception_net  # the module; `inception` is a fixture below
import shapes_tokenizers
import vqgan
from eval_fid import FIDError, frechet_distance


# ---------------------------------------------------------------------------
# Fixtures: random weights in the published file's key layout
# ---------------------------------------------------------------------------

def _random_inception_state(seed: int) -> dict:
    """Random weights that keep activations O(1) through all 94 conv layers (He init, BN near identity)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in inception_net.InceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / value[0].numel())
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif key.endswith(("bn.bias", "running_mean")):
            state[key] = 0.1 * torch.randn(value.shape, generator=g)
        else:  # fc
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def random_state() -> dict:
    return _random_inception_state(0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, random_state) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_state, path)
    return path


@pytest.fixture(scope="module")
def inception(weights):
    return inception_net.load_inception(weights)


def _torch_fidelity_module():
    """torch-fidelity's Inception feature extractor module, loaded without its package __init__
    (which imports torchvision, unusable here): a bare package object stands in for it."""
    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity is a test dependency: pip install --no-deps torch-fidelity"
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        for key in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[key]
        sys.modules.update(saved)


# ---------------------------------------------------------------------------
# InceptionV3 parity
# ---------------------------------------------------------------------------

@torch.no_grad()
def test_features_match_torch_fidelity(weights, inception):
    """Same file into both (torch-fidelity loads it with strict=True, so the key layouts are equal);
    2048-d features and 1008 logits agree, through upsampling (uint8 input) and downsampling of a
    non-square image (float input)."""
    module = _torch_fidelity_module()
    theirs = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits"],
                                                feature_extractor_weights_path=str(weights))
    g = torch.Generator().manual_seed(1)
    for shape, dtype in [((1, 3, 64, 64), torch.uint8), ((1, 3, 331, 307), torch.float32)]:
        images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        features, logits = theirs(images)
        ours = inception(images.to(dtype))
        assert ours.shape == (1, 2048)
        assert ours.std() > 0.3  # the random network is not degenerate, so the comparison means something
        assert (ours - features).abs().max() <= 1e-4
        assert (inception.logits(ours) - logits).abs().max() <= 1e-4


def test_299_input_is_not_resized():
    images = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8).float()
    assert torch.equal(inception_net.resize_bilinear_tf1(images, 299), images)


def test_resize_is_tensorflow1_bilinear():
    """TF1 maps output i to source i * in/out with no half-pixel offset: [a, b] -> [a, (a+b)/2, b, b]."""
    x = torch.tensor([[0.0, 8.0], [16.0, 24.0]])[None, None]  # (1, 1, 2, 2)
    y = inception_net.resize_bilinear_tf1(x, 4)[0, 0]
    expected = torch.tensor([[0.0, 4.0, 8.0, 8.0], [8.0, 12.0, 16.0, 16.0],
                             [16.0, 20.0, 24.0, 24.0], [16.0, 20.0, 24.0, 24.0]])
    assert torch.equal(y, expected)
    half_pixel = torch.nn.functional.interpolate(x, size=4, mode="bilinear", align_corners=False)[0, 0]
    assert not torch.equal(half_pixel, expected)  # the deviation the Patch: comment is about
    downsampled = inception_net.resize_bilinear_tf1(torch.arange(6.0)[None, None, None].expand(1, 1, 6, 6), 3)
    assert torch.equal(downsampled[0, 0, 0], torch.tensor([0.0, 2.0, 4.0]))  # every second column, no averaging


# ---------------------------------------------------------------------------
# Loading the weights
# ---------------------------------------------------------------------------

def test_load_without_counters_and_hash(tmp_path, random_state, inception):
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in random_state.items() if not k.endswith("num_batches_tracked")}, path)
    model = inception_net.load_inception(path)
    for key, value in inception.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.sha256 == inception_net.sha256_file(path) and len(model.sha256) == 64
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_published_name_with_wrong_bytes_is_refused(tmp_path):
    for name in ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"):
        path = tmp_path / name
        path.write_bytes(b"not the weights")
        with pytest.raises(FIDError, match="SHA-256"):
            inception_net.load_inception(path)
    with pytest.raises(FIDError, match="cannot read"):  # the hash check can be waived; the content still is checked
        inception_net.load_inception(path, check_hash=False)
    assert inception_net.KNOWN_SHA256["pt_inception-2015-12-05-6726825d.pth"].startswith("6726825d")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"AuxLogits.fc.weight": torch.zeros(1000, 768)}), "AuxLogits.fc.weight"),
    (lambda s: s.update({"fc.weight": torch.zeros(1000, 2048)}), "fc.weight"),
    (lambda s: s.pop("Mixed_7c.branch_pool.bn.running_var"), "Mixed_7c.branch_pool.bn.running_var"),
])
def test_foreign_state_dicts_are_named(random_state, inception, change, message):
    state = dict(random_state)
    change(state)
    with pytest.raises(FIDError, match=message.replace(".", r"\.")):
        inception_net.inception_state_dict(state, inception, "foreign.pth")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_code_is_never_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, protocol=2))
    with pytest.raises(FIDError):
        inception_net.load_inception(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------

def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = _spd(rng, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.01, 3, 50), rng.uniform(0.01, 3, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_identical_zero_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.standard_normal(40), rng.standard_normal(40), _spd(rng, 40), _spd(rng, 40)
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-9
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_matches_sqrtm_formula_when_well_conditioned():
    rng = np.random.default_rng(3)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d) + np.eye(d), _spd(rng, d) + np.eye(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_rank_deficient_covariances():
    """S1 = A A^T, S2 = B B^T of rank 5 in 64-d: tr((S1 S2)^1/2) is the nuclear norm of A^T B."""
    rng = np.random.default_rng(4)
    d, r = 64, 5
    a, b = rng.standard_normal((d, r)), rng.standard_normal((d, r))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    nuclear = np.linalg.svd(a.T @ b, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    got = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) < 1e-8 * np.trace(s1)
    # covariances of 10 samples in 256-d (rank 9): finite, and 0 against themselves
    x = rng.standard_normal((10, 256))
    sigma = np.cov(x, rowvar=False)
    assert frechet_distance(x.mean(0), sigma, x.mean(0), sigma) < 1e-8 * np.trace(sigma)


def test_mismatched_statistics_are_an_error():
    with pytest.raises(FIDError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------
# Statistics and cache
# ---------------------------------------------------------------------------

def test_running_stats_equal_numpy_cov():
    rng = np.random.default_rng(5)
    x = 1e4 + rng.standard_normal((300, 20))  # far from zero: the shifted sums stay exact
    stats = eval_fid.RunningStats()
    for chunk in np.array_split(x, 7):
        stats.update(chunk.astype(np.float32))
    mu, sigma = stats.result()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-7, atol=1e-9)


def test_too_few_samples_needs_consent():
    stats = eval_fid.RunningStats()
    stats.update(np.random.default_rng(6).standard_normal((20, 32)))
    with pytest.raises(FIDError, match="--allow-few"):
        stats.result()
    mu, sigma = stats.result(allow_few=True)
    assert sigma.shape == (32, 32) and np.linalg.matrix_rank(sigma) == 19
    with pytest.raises(FIDError, match="non-finite"):
        stats.update(np.full((1, 32), np.nan))


def test_stats_cache_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(8), _spd(rng, 8)
    path = tmp_path / "sub" / "stats.npz"
    eval_fid.save_stats(path, mu, sigma, 123, "ab" * 32)
    loaded = eval_fid.load_stats(path)
    assert np.array_equal(loaded["mu"], mu) and np.array_equal(loaded["sigma"], sigma)
    assert loaded["n"] == 123 and loaded["inception_sha256"] == "ab" * 32
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's own cache format
    assert eval_fid.load_stats(tmp_path / "pytorch_fid.npz")["n"] is None
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(FIDError, match="cannot read"):
        eval_fid.load_stats(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

def _coco_json(path: Path, n_images: int = 30) -> Path:
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg"} for i in range(n_images)]
    annotations = [{"id": 5 * i + j, "image_id": 1000 + i, "caption": f" A photo  {i} caption {j}.\n"}
                   for i in range(n_images) for j in range(5)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def test_coco_caption_sampling(tmp_path):
    path = _coco_json(tmp_path / "captions_val2014.json")
    items = eval_fid.read_captions(path, 10, seed=0)
    assert items == eval_fid.coco_captions(path, 10, seed=0)  # generate and reference draw the same list
    assert items != eval_fid.coco_captions(path, 10, seed=1)
    assert len({item["image_id"] for item in items}) == 10  # one caption per sampled image
    for item in items:
        i = item["image_id"] - 1000
        assert item["caption"].startswith(f"A photo {i} caption ")  # whitespace cleaned, caption of that image
        assert item["file_name"] == f"COCO_val2014_{item['image_id']:012d}.jpg"
    with pytest.raises(FIDError, match="fewer than"):
        eval_fid.coco_captions(path, 31)


def test_text_captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a red circle\n\n  a blue   square \nthird\n", encoding="utf-8")
    assert [c["caption"] for c in eval_fid.read_captions(path, 2)] == ["a red circle", "a blue square"]
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(FIDError, match="UTF-8"):
        eval_fid.read_captions(path, 2)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _image_folder(folder: Path, seed: int, n: int = 3, size: int = 48) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def cheap_features(monkeypatch):
    """The command-line tests check the plumbing; the network itself is checked against torch-fidelity above.
    A cheap stand-in for the forward pass: 64 pixel values of the (already 299x299) input (64 dimensions
    keep the 2048x2048 eigendecompositions, seconds each on a busy CPU, out of the default run)."""
    def forward(self, images):
        assert images.shape[1:] == (3, 299, 299)
        return images.float().flatten(1)[:, ::4177][:, :64] / 255  # (B, 64)
    monkeypatch.setattr(inception_net.InceptionV3, "forward", forward)


def _last_error_line(err: str) -> str:
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_cli_stats_then_fid(tmp_path, weights, cheap_features, capsys):
    folder = _image_folder(tmp_path / "a", seed=0)
    stats = tmp_path / "a.npz"
    assert eval_fid.main(["stats", str(folder), str(stats), "--inception", str(weights), "--allow-few",
                          "--device", "cpu", "--batch-size", "2"]) == 0
    cached = eval_fid.load_stats(stats)
    sha = inception_net.sha256_file(weights)
    assert cached["n"] == 3 and cached["inception_sha256"] == sha
    assert f"sha256 {sha} (NOT the published" in capsys.readouterr().err  # the weights' hash is printed
    report = tmp_path / "out" / "fid.json"
    assert eval_fid.main(["fid", str(folder), str(stats), "--inception", str(weights), "--allow-few",
                          "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert "FID 0.0000" in captured.out  # a folder and its cached statistics agree
    # Nothing long is silent: a line before the eigendecompositions, a bar while they run.
    assert "Fréchet distance: two eigendecompositions of 64x64" in captured.err
    assert "matrix square root (64x64, float64)" in captured.err and "2/2" in captured.err
    assert json.loads(report.read_text())["fid"] < 1e-9

    other = tmp_path / "b.npz"
    eval_fid.save_stats(other, cached["mu"] + 1, cached["sigma"], 3, sha)
    assert eval_fid.main(["fid", str(stats), str(other), "--inception", str(weights)]) == 0
    assert f"FID {64:.4f}" in capsys.readouterr().out  # equal covariances: ||1||^2 over 64 dims

    eval_fid.save_stats(other, cached["mu"], cached["sigma"], 3, "0" * 64)
    assert eval_fid.main(["fid", str(stats), str(other), "--inception", str(weights)]) == 1
    line = _last_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and "recompute" in line


@pytest.mark.parametrize("args, message", [
    (["fid", "{a}", "{a}", "--inception", "{w}"], "--allow-few"),
    (["fid", "{a}", "{missing}", "--inception", "{w}", "--allow-few"], "not a folder"),
    (["fid", "{a}", "{a}", "--inception", "{missing}"], "Inception weights not found"),
    (["stats", "{empty}", "{out}", "--inception", "{w}"], "no images"),
    (["fid", "{a}", "{bad_image}", "--inception", "{w}", "--allow-few"], "cannot read image"),
    (["generate", "--checkpoint", "{a}", "--captions", "{missing}", "--out", "{out}"], "not found"),
    (["shapes", "--checkpoint", "{a}", "--device", "nonsense"], "device"),
])
def test_cli_errors_are_one_line(tmp_path, weights, cheap_features, capsys, args, message):
    folder = _image_folder(tmp_path / "a", seed=1, n=2, size=8)
    bad = _image_folder(tmp_path / "bad", seed=1, n=2, size=8)
    (bad / "1.png").write_bytes(b"truncated")
    (tmp_path / "empty").mkdir()
    names = {"a": folder, "w": weights, "missing": tmp_path / "missing", "empty": tmp_path / "empty",
             "out": tmp_path / "out.npz", "bad_image": bad}
    assert eval_fid.main([a.format(**names) for a in args]) == 1
    line = _last_error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and message in line


# ---------------------------------------------------------------------------
# generate and shapes: a tiny random generator saved as a real checkpoint
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    vqgan.save_vqgan(vqgan.VQGAN(shapes_tokenizers.vqgan_config()), root / "vqgan")
    tokenizer = clip_text.Tokenizer(shapes_tokenizers.SHAPES_BPE_PATH)
    text = clip_text.TextConfig(vocab_size=tokenizer.vocab_size, context_length=24, width=32, heads=2, layers=1,
                                embed_dim=32)
    config = emage.EmageConfig(text=text, codebook_size=shapes_tokenizers.vqgan_config().n_embed, grid=(8, 8),
                               width=32, layers=1, heads=2)
    emage.save_checkpoint(emage.Emage(config), root / "emage", variant=3, step=7,
                          tokenizer_path=shapes_tokenizers.SHAPES_BPE_PATH, vqgan_dir=root / "vqgan")
    return root / "emage"


def _png_text(path: Path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def test_generate_writes_captioned_pngs_and_resumes(tmp_path, tiny_checkpoint, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(["a red circle", "a blue square", "a small green triangle",
                                   "a cyan square above a red circle", "a yellow circle", "unused"]), encoding="utf-8")
    out = tmp_path / "samples"
    args = ["generate", "--checkpoint", str(tiny_checkpoint), "--captions", str(captions), "--out", str(out),
            "--num-captions", "5", "--batch-size", "2", "--steps", "3", "--device", "cpu"]
    assert eval_fid.main(args) == 0
    paths = sorted(out.glob("*.png"))
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(5)]
    first = {p.name: p.read_bytes() for p in paths}
    with Image.open(paths[3]) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    text = _png_text(paths[3])
    assert text["caption"] == "a cyan square above a red circle" and text["index"] == "3"

    (out / "00001.png").unlink()
    (out / "00004.png").unlink()
    capsys.readouterr()
    assert eval_fid.main(args) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))} == first  # same images after resuming

    assert eval_fid.main(args[:-6] + ["--num-captions", "4", "--batch-size", "2", "--steps", "3"]) == 1
    assert "manifest.json" in _last_error_line(capsys.readouterr().err)  # another caption list: refused
    assert eval_fid.main(args + ["--rerank", "clip"]) == 1
    assert "--clip" in _last_error_line(capsys.readouterr().err)  # CLIP ranking without a CLIP: refused
    assert eval_fid.main(args + ["--bpe", str(shapes_tokenizers.SHAPES_BPE_PATH)]) == 1
    assert "--clip" in _last_error_line(capsys.readouterr().err)  # --bpe is the CLIP re-ranker's vocabulary


def test_generate_defaults_are_sample_py_s_and_guidance_scale_is_an_alias(monkeypatch, tmp_path, tiny_checkpoint,
                                                                         capsys):
    seen = []
    monkeypatch.setattr(eval_fid, "generate_folder", lambda *a, **kw: seen.append(kw) or 0)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n", encoding="utf-8")
    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--captions", str(captions), "--out", str(tmp_path / "o")]
    assert eval_fid.main(base) == 0
    assert (seen[0]["temperature"], seen[0]["guidance_scale"], seen[0]["candidates"]) == (
        sample.DEFAULT_TEMPERATURE, sample.DEFAULT_GUIDANCE, sample.DEFAULT_CANDIDATES)
    assert seen[0]["rerank"] is None  # the self-score, as sample.py ranks
    assert eval_fid.main(base + ["--guidance-scale", "2.5"]) == 0 and seen[1]["guidance_scale"] == 2.5
    assert eval_fid.main(base + ["--guidance", "3"]) == 0 and seen[2]["guidance_scale"] == 3.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        eval_fid.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "random half of the tokens, random_sets=4 times" in help_text  # what the self-score does on real data
    assert "--guidance GUIDANCE, --guidance-scale GUIDANCE" in help_text


def test_generate_keeps_the_best_candidate_by_the_self_score(tmp_path, tiny_checkpoint):
    items = [{"caption": "a red circle"}, {"caption": "a blue square above a green triangle"}]
    eval_fid.generate_folder(tiny_checkpoint, items, tmp_path / "out", candidates=3, batch_size=2, seed=4,
                             progress=False, steps=2, temperature=0.7, guidance_scale=1.5)
    model, tokenizer, vq, _ = eval_fid._load_generator(tiny_checkpoint, "cpu")
    generator = torch.Generator().manual_seed(4 * 1_000_003 + 0)  # batch 0 of seed 4
    images, scores = eval_fid.generate_scored(model, tokenizer, vq, [it["caption"] for it in items], generator,
                                              num_candidates=3, steps=2, temperature=0.7, guidance_scale=1.5)
    images, scores = images.reshape(2, 3, 64, 64, 3), scores.reshape(2, 3)
    for i in range(2):
        assert len(set(scores[i].tolist())) == 3  # distinct scores, so the choice is visible
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")), images[i, scores[i].argmax()])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["rerank"] == "self"


def test_generate_from_a_moved_checkpoint_with_vqgan(tmp_path, tiny_checkpoint, capsys):
    moved = tmp_path / "elsewhere" / "emage"
    shutil.copytree(tiny_checkpoint, moved)
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n", encoding="utf-8")
    args = ["generate", "--checkpoint", str(moved), "--captions", str(captions), "--out", str(tmp_path / "o"),
            "--steps", "2", "--candidates", "1"]
    assert eval_fid.main(args) == 1
    line = _last_error_line(capsys.readouterr().err)
    assert "--vqgan" in line and "moved" in line
    assert eval_fid.main(args + ["--vqgan", str(tiny_checkpoint.parent / "vqgan")]) == 0
    assert (tmp_path / "o" / "00000.png").is_file()


def test_generate_from_coco_json(tmp_path, tiny_checkpoint):
    path = _coco_json(tmp_path / "captions_val2014.json", n_images=4)
    out = tmp_path / "coco"
    assert eval_fid.main(["generate", "--checkpoint", str(tiny_checkpoint), "--captions", str(path), "--out", str(out),
                          "--num-captions", "3", "--steps", "2", "--seed", "5"]) == 0
    items = eval_fid.coco_captions(path, 3, seed=5)
    for i, item in enumerate(items):
        text = _png_text(out / f"{i:05d}.png")
        assert text["caption"] == item["caption"] and text["coco_image_id"] == str(item["image_id"])


def test_reranking_keeps_the_best_candidate(tmp_path, tiny_checkpoint):
    items = [{"caption": "a red circle"}, {"caption": "a blue square"}]
    scores_seen = []

    def brightest(candidates, caption):  # (C, H, W, 3) uint8 -> (C,) scores
        scores = candidates.reshape(len(candidates), -1).mean(1)
        scores_seen.append(scores)
        return scores

    eval_fid.generate_folder(tiny_checkpoint, items, tmp_path / "out", candidates=4, batch_size=2, seed=3,
                             rerank=brightest, progress=False, steps=2)
    model, tokenizer, vq, _ = eval_fid._load_generator(tiny_checkpoint, "cpu")
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 0)  # batch 0 of seed 3
    candidates = eval_fid.generate_images(model, tokenizer, vq, [it["caption"] for it in items], generator,
                                          num_candidates=4, steps=2).reshape(2, 4, 64, 64, 3)
    for i in range(2):
        assert len(set(scores_seen[i].tolist())) == 4  # distinct candidates, so the choice is visible
        best = candidates[i, int(np.argmax(scores_seen[i]))]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")), best)


def test_shapes_accuracy_counts_seen_and_novel(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    import shapes

    report_path = tmp_path / "shapes.json"
    assert eval_fid.main(["shapes", "--checkpoint", str(tiny_checkpoint), "--seeds", "2", "--steps", "2",
                          "--limit", "6", "--json", str(report_path)]) == 0
    assert "seen:" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert len(report["results"]) == 12 and report["all"]["count"] == 12
    assert report["seen"]["count"] + report["novel"]["count"] == 12

    # A generator that draws exactly what it is asked (the renderer) must score 1.0 on every caption;
    # one that always draws a red circle passes only on that caption.
    def render(model, tokenizer, vq, captions, generator, **kw):
        images = [np.asarray(shapes.render(c, seed=int(generator.initial_seed()) % 1000)) for c in captions]
        return np.stack(images), None

    monkeypatch.setattr(eval_fid, "generate_scored", render)
    report = eval_fid.shapes_accuracy(tiny_checkpoint, seeds=1, progress=False, steps=2)
    seen_kw = []
    monkeypatch.setattr(eval_fid, "generate_scored", lambda *a, **kw: seen_kw.append(kw) or render(*a, **kw))
    assert eval_fid.main(["shapes", "--checkpoint", str(tiny_checkpoint), "--seeds", "1", "--limit", "2",
                          "--choice-temperature", "2.5", "--schedule", "linear"]) == 0
    assert seen_kw[0]["choice_temperature"] == 2.5 and seen_kw[0]["schedule"] == "linear"
    novel = sum(shapes.is_novel(c) for c in shapes.eval_captions())
    assert report["all"] == {"accuracy": 1.0, "count": len(shapes.eval_captions())}
    assert report["novel"]["count"] == novel > 0

    monkeypatch.setattr(eval_fid, "generate_scored", lambda m, t, v, captions, g, **kw: (np.stack(
        [np.asarray(shapes.render("a large red circle", seed=0))] * len(captions)), None))
    captions = ["a large red circle", "a blue square", "a red circle", "a cyan circle"]
    report = eval_fid.shapes_accuracy(tiny_checkpoint, captions, seeds=2, progress=False)
    assert [r["passed"] for r in report["results"]] == [True, False, True, False] * 2
    assert report["seen"] == {"accuracy": 2 / 3, "count": 6} and report["novel"] == {"accuracy": 0.0, "count": 2}
    assert report["failures"]["seen"]["colour"] == 2 / 6 and report["failures"]["novel"]["colour"] == 1.0


def test_shapes_accuracy_scores_the_candidate_with_the_best_self_score(tiny_checkpoint, monkeypatch):
    import shapes

    circle = np.asarray(shapes.render("a large red circle", seed=0))
    square = np.asarray(shapes.render("a blue square", seed=0))

    def three_candidates(model, tokenizer, vq, captions, generator, num_candidates, **kw):
        assert num_candidates == 3
        # per caption: circle, square, circle; the self-score prefers the square for the first caption only
        scores = np.array([s for k in range(len(captions)) for s in ([0.0, 1.0, -1.0] if k == 0 else [1.0, 0.0, 0.5])])
        return np.stack([circle, square, circle] * len(captions)), scores

    monkeypatch.setattr(eval_fid, "generate_scored", three_candidates)
    captions = ["a large red circle", "a blue square"]
    report = eval_fid.shapes_accuracy(tiny_checkpoint, captions, seeds=1, progress=False, candidates=3)
    assert [r["passed"] for r in report["results"]] == [False, False]  # the square, then a circle, were kept
    assert [r["any_passed"] for r in report["results"]] == [True, True]
    assert report["any_of_candidates"]["all"]["accuracy"] == 1.0 and report["settings"]["candidates"] == 3


def test_generate_scored_returns_the_self_score_of_every_candidate(tiny_checkpoint):
    """With contrast=True against the mirrored caption where there is a relation (sample.py
    --contrast mirror), by default against nothing."""
    model, tokenizer, vq, _ = eval_fid._load_generator(tiny_checkpoint, "cpu")
    captions = ["a red circle", "a blue square above a red circle"]
    images, scores = eval_fid.generate_scored(model, tokenizer, vq, captions, torch.Generator().manual_seed(1),
                                              num_candidates=3, steps=2, contrast=True)
    again = torch.Generator().manual_seed(1)
    tokenize = lambda texts: tokenizer(texts, context_length=model.config.text.context_length)  # noqa: E731
    text = tokenize(captions).repeat_interleave(3, 0)
    tokens = model.generate(tokenize(captions), num_candidates=3, generator=again, steps=2)
    contrast = tokenize(["a red circle", "a blue square below a red circle"]).repeat_interleave(3, 0)
    expected = extensions.self_score(model, text, tokens, generator=again, contrast_tokens=contrast)
    assert images.shape[0] == 6 and np.allclose(scores, expected.numpy(), atol=1e-4)
    once_more = torch.Generator().manual_seed(1)
    model.generate(tokenize(captions), num_candidates=3, generator=once_more, steps=2)  # the same random state
    plain = extensions.self_score(model, text, tokens, generator=once_more)
    assert np.allclose(scores[:3], plain[:3].numpy(), atol=1e-4) and not np.allclose(scores[3:], plain[3:].numpy())
    _, off = eval_fid.generate_scored(model, tokenizer, vq, captions, torch.Generator().manual_seed(1),
                                      num_candidates=3, steps=2)
    assert np.allclose(off, plain.numpy(), atol=1e-4)


def test_reference_stats_of_sampled_coco_images(tmp_path, weights, cheap_features):
    """`reference` draws the same images as `generate` and centre-crops each to --size before Inception."""
    captions = _coco_json(tmp_path / "captions_val2014.json", n_images=6)
    images = tmp_path / "val2014"
    images.mkdir()
    rng = np.random.default_rng(9)
    for i, (h, w) in enumerate([(40, 60), (64, 48), (50, 50), (30, 90), (72, 40), (45, 45)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            images / f"COCO_val2014_{1000 + i:012d}.jpg", quality=95)
    out = tmp_path / "ref.npz"
    assert eval_fid.main(["reference", "--captions", str(captions), "--images", str(images), "--out", str(out),
                          "--num-captions", "4", "--size", "32", "--inception", str(weights), "--allow-few"]) == 0
    chosen = eval_fid.coco_captions(captions, 4, seed=0)
    crops = [eval_fid.center_crop_resize(eval_fid.read_rgb(images / c["file_name"]), 32) for c in chosen]
    assert all(crop.shape == (32, 32, 3) for crop in crops)
    mu, sigma = eval_fid.image_stats(inception_net.load_inception(weights), crops, allow_few=True, progress=False)
    stats = eval_fid.load_stats(out)
    assert stats["n"] == 4
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-12, atol=1e-15)
    (images / chosen[0]["file_name"]).unlink()
    assert eval_fid.main(["reference", "--captions", str(captions), "--images", str(images), "--out", str(out),
                          "--num-captions", "4", "--inception", str(weights)]) == 1


def test_the_generator_is_loaded_with_its_extensions():
    """The shipped demo uses extensions (colour-factored codes): eval_fid loads it through
    extensions.load_checkpoint, as sample.py does."""
    demo = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes" / "emage"
    model, tokenizer, vq, info = eval_fid._load_generator(demo, "cpu")
    assert model.beyond is not None and model.beyond.colours == 7 and vq.config.n_embed == model.config.codebook_size
    with pytest.raises(emage.EmageError, match="extensions.load_checkpoint"):
        emage.load_checkpoint(demo)


def test_images_are_read_bounded_and_cropped_as_before(tmp_path):
    """read_rgb goes through files.open_image (a file over the pixel limit is a FIDError, not a
    decoded bomb); center_crop_resize on arrays equals cropping the middle square and resizing
    it with PIL's bicubic filter."""
    Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")
    with pytest.raises(FIDError, match="cannot read image: .*over the limit"):
        eval_fid.read_rgb(tmp_path / "huge.png")
    rgb = np.random.default_rng(3).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    assert np.array_equal(eval_fid.read_rgb(tmp_path / "wide.png"), rgb)
    expected = np.array(Image.fromarray(rgb[:, 10:40]).resize((16, 16), Image.BICUBIC))
    assert np.array_equal(eval_fid.center_crop_resize(rgb, 16), expected)
    assert np.array_equal(eval_fid.center_crop_resize(rgb[:, 10:40], 30), rgb[:, 10:40])  # the right size: unchanged


def test_hostile_statistics_files_are_one_line_errors(tmp_path):
    import zipfile

    np.save(tmp_path / "plain.npy", np.zeros(3))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as archive:  # 80 MiB of zeros, 80 KB packed
        archive.writestr("mu.npy", b"\0" * (80 << 20))
    np.savez(tmp_path / "mismatch.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    for name, says in (("plain.npy", "not an .npz"), ("bomb.npz", "MiB unpacked"), ("mismatch.npz", "d x d")):
        with pytest.raises(eval_fid.FIDError, match=says):
            eval_fid.load_stats(tmp_path / name)
    np.savez(tmp_path / "good.npz", mu=np.ones(3), sigma=np.eye(3), n=5)
    assert eval_fid.load_stats(tmp_path / "good.npz")["n"] == 5
