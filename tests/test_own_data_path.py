"""From public components to samples, exactly as the README's Training and Evaluation sections
write it, on files in the real formats made TINY with random weights by the reference code:

    taming's Gumbel f8 VQGAN          last.ckpt (Lightning layout) -> python vqgan.py convert
    OpenAI's ViT-L-14.pt              TorchScript archive           -> python clip_text.py convert --trust-torchscript
    openai/clip-vit-large-patch14     Hugging Face folder (config.json, model.safetensors, merges.txt,
                                      vocab.json, tokenizer.json)   -> python clip_text.py convert, or --text-init
    image-caption pairs               a folder (x.jpg + x.txt) and an img2dataset tar -> python data.py prepare
    training                          torchrun --nproc_per_node 2 train.py --recipe recipes/paper.toml --set ...
                                      (gloo), then --resume, and --text-init ViT-L-14.pt --trust-torchscript
    sampling                          sample.py from a checkpoint copied elsewhere (--vqgan), eval_fid.py
                                      generate (--vqgan), export_onnx.py, sample.py --backend onnx --onnx-dir

Shapes and key names are the real ones; only the sizes are small (a 32 px image -> 4 x 4 tokens
of a 64-code VQGAN with 32 channels, a 1-layer CLIP text tower of width 64 over CLIP's real
49,408-id vocabulary). The oracles (taming-transformers, transformers, open_clip's vocabulary
file) write the inputs; the test skips when one is missing.
"""
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open_clip_torch (its wheel ships bpe_simple_vocab_16e6.txt.gz) is not installed", allow_module_level=True)

import clip_text  # noqa: E402
import data  # noqa: E402
import emage  # noqa: E402
import eval_fid  # noqa: E402
import export_onnx  # noqa: E402
import inception  # noqa: E402
import sample  # noqa: E402
import shapes  # noqa: E402
import train  # noqa: E402
import vqgan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# taming's configs/..._gumbel_f8.yaml ddconfig with fewer channels (taming's GroupNorm needs multiples
# of 32) and one block per level: still f = 8 with attention at the 32 px level, as the real one.
GUMBEL_F8_TINY = dict(double_z=False, z_channels=32, resolution=256, in_channels=3, out_ch=3, ch=32,
                      ch_mult=[1, 1, 2, 4], num_res_blocks=1, attn_resolutions=[32], dropout=0.0)
N_EMBED = 64
IMAGE_SIZE = 32  # data.py prepare --image-size: 32 px -> 4 x 4 tokens
# A CLIP ViT-L/14 with every size cut down but the vocabulary and the context (the real BPE is used).
CLIP_TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_attention_heads=1, num_hidden_layers=1,
                 max_position_embeddings=77, projection_dim=32)  # one 64-dimensional head, OpenAI's rule
CLIP_VISION = dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1, image_size=32,
                   patch_size=16, projection_dim=32)
SHRINK = ["--set", "width=32", "--set", "layers=1", "--set", "heads=2"]  # the paper preset, cut down
CAPTIONS = ["a red circle", "a blue square", "a green triangle above a red circle", "a small yellow square",
            "a cyan circle to the left of a blue triangle", "a large purple circle"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------
# The public files, in their real formats
# ----------------------------------------------------------------------------------------


class TamingGumbelVQ(torch.nn.Module):
    """The autoencoder part of taming's GumbelVQ (models/vqgan.py), under its attribute names."""

    def __init__(self):
        super().__init__()
        z = GUMBEL_F8_TINY["z_channels"]
        self.encoder = taming_model.Encoder(**GUMBEL_F8_TINY)
        self.decoder = taming_model.Decoder(**GUMBEL_F8_TINY)
        self.quantize = taming_quantize.GumbelQuantize(z, z, n_embed=N_EMBED, kl_weight=1e-8)
        self.quant_conv = torch.nn.Conv2d(z, z, 1)
        self.post_quant_conv = torch.nn.Conv2d(z, z, 1)


def write_taming_last_ckpt(path: Path) -> None:
    """last.ckpt as taming's release holds it: {"state_dict": autoencoder + loss keys, ...} and the
    Lightning 1.x callback state keyed by the ModelCheckpoint class (pickled by name)."""
    torch.manual_seed(0)
    state = dict(TamingGumbelVQ().state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(name)
    fake.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": name})
    saved = {k: sys.modules.get(k) for k in ("pytorch_lightning", "pytorch_lightning.callbacks", name)}
    sys.modules.update({"pytorch_lightning": types.ModuleType("pytorch_lightning"),
                        "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"), name: fake})
    try:
        torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": state,
                    "callbacks": {fake.ModelCheckpoint: {"best_model_path": "x.ckpt"}}, "optimizer_states": []}, path)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def write_hf_clip_folder(folder: Path) -> None:
    """What `git clone https://huggingface.co/openai/clip-vit-large-patch14` gives, tiny: a CLIPModel's
    config.json + model.safetensors, and the tokenizer as tokenizer.json, vocab.json and merges.txt
    (transformers 5 writes only tokenizer.json; the hub folder also has the other two, which the
    tokenizers library writes from it)."""
    torch.manual_seed(1)
    config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=32)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    bpe = clip_text.find_bpe()  # OpenAI's file, from the open_clip wheel
    reference = clip_text.Tokenizer(bpe)
    tokenizer = transformers.CLIPTokenizer(vocab=dict(reference.encoder), merges=clip_text.read_merges(bpe))
    tokenizer.save_pretrained(folder)
    tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).model.save(str(folder))
    with torch.no_grad():  # transformers' own ids and text features of the captions, kept for the test
        ids = torch.tensor([tokenizer(c, padding="max_length", max_length=77)["input_ids"] for c in CAPTIONS])
        features = model.get_text_features(input_ids=ids)
    torch.save({"ids": ids, "features": getattr(features, "pooler_output", features)}, folder.parent / "reference.pt")


class OpenAIArchive(clip_text.TextEncoder):
    """OpenAI's CLIP module layout (clip/model.py): the text tower's parameters at the top level, an
    image tower under visual., logit_scale, and three hyper-parameters kept as tensors."""

    def __init__(self, text: clip_text.TextEncoder):
        super().__init__(text.config)
        self.load_state_dict(text.state_dict())
        self.visual = torch.nn.Module()
        self.visual.conv1 = torch.nn.Conv2d(3, 8, 16, 16, bias=False)
        self.visual.proj = torch.nn.Parameter(torch.randn(8, text.config.embed_dim))
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))
        for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, tokens):
        return super().forward(tokens)[1]


def write_openai_torchscript(path: Path, hf_folder: Path) -> None:
    """ViT-L-14.pt as OpenAI releases it: a TorchScript archive (the weights of the HF folder's text tower)."""
    text = clip_text.load_clip_text(hf_folder)
    tokens = clip_text.Tokenizer(hf_folder)(["a red circle"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the length check is traced as a constant
        torch.jit.save(torch.jit.trace(OpenAIArchive(text).eval(), tokens, check_trace=False), str(path))


def write_inception_weights(path: Path) -> None:
    """The FID Inception's state dict (pt_inception-2015-12-05-6726825d.pth's keys and shapes), random:
    He-initialised convolutions and BatchNorms near the identity keep the 2048 features finite."""
    g = torch.Generator().manual_seed(2)
    state = {}
    for key, value in inception.InceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = 1 + 0.1 * torch.rand(value.shape, generator=g)
        else:  # BatchNorm biases and means, the classifier
            state[key] = 0.05 * torch.randn(value.shape, generator=g)
    torch.save(state, path)


def write_coco(folder: Path, captions_path: Path) -> None:
    """captions_val2014.json and its val2014/ images, a few of them: COCO's file layout."""
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i, caption in enumerate(CAPTIONS):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        shapes.render(caption, seed=100 + i).resize((48, 40), Image.BICUBIC).save(folder / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "width": 48, "height": 40})
        annotations += [{"id": 10 * i + k, "image_id": i + 1, "caption": f"{caption}{' .' * k}"} for k in range(2)]
    captions_path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")


def write_pairs(folder: Path, tar_path: Path) -> None:
    """The same image-caption pairs as a folder (x.jpg + x.txt) and as an img2dataset shard
    (000000000.jpg, .txt, .json per example)."""
    folder.mkdir(parents=True)
    with tarfile.open(tar_path, "w") as tar:
        for i, caption in enumerate(CAPTIONS):
            buffer = io.BytesIO()
            shapes.render(caption, seed=i).resize((40, 40), Image.BICUBIC).save(buffer, format="JPEG", quality=95)
            members = {"jpg": buffer.getvalue(), "txt": caption.encode(), "json": json.dumps({"key": f"{i:09d}"}).encode()}
            (folder / f"{i:03d}.jpg").write_bytes(members["jpg"])
            (folder / f"{i:03d}.txt").write_text(caption, encoding="utf-8")
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("public")
    write_taming_last_ckpt(root / "last.ckpt")
    write_hf_clip_folder(root / "clip-vit-large-patch14")
    write_openai_torchscript(root / "ViT-L-14.pt", root / "clip-vit-large-patch14")
    write_pairs(root / "pairs", root / "00000.tar")
    write_inception_weights(root / "pt_inception-2015-12-05-6726825d.pth")
    write_coco(root / "val2014", root / "captions_val2014.json")
    return root


# ----------------------------------------------------------------------------------------
# The path
# ----------------------------------------------------------------------------------------


def call(main, argv) -> int:
    """A command's main(argv) as its exit code (clip_text.main exits only on errors)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    return rc or 0


def ok(main, argv, capsys) -> str:
    """Run a command's main(argv); it must succeed. Returns its stdout + stderr."""
    rc = call(main, argv)
    out = capsys.readouterr()
    assert rc == 0, (out.out + out.err)[-3000:]
    return out.out + out.err


def refused(main, argv, capsys) -> str:
    """Run a command's main(argv); it must fail with one error line, which is returned."""
    rc = call(main, argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc != 0 and len(lines) == 1, (rc, lines)
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_public_components_to_samples(public, tmp_path, capsys, monkeypatch):
    hf, work = public / "clip-vit-large-patch14", tmp_path
    monkeypatch.chdir(ROOT)  # the README's commands run from the repository root

    # The Hugging Face folder's merges.txt is CLIP's BPE: the same ids as transformers' tokenizer.
    ours, reference = clip_text.Tokenizer(hf), torch.load(public / "reference.pt", weights_only=True)
    assert ours.path == hf / "merges.txt"
    tokens = ours(CAPTIONS)  # (6, 77), padded with 0 where transformers pads with the end token
    valid = torch.arange(77) <= tokens.argmax(-1, keepdim=True)
    assert torch.equal(tokens[valid], reference["ids"][valid])

    # Converting the public checkpoints (README, Training, "On real data, from the public components").
    ok(vqgan.main, ["convert", public / "last.ckpt", work / "vqgan-gumbel-f8"], capsys)
    assert vqgan.load_vqgan(work / "vqgan-gumbel-f8").config.n_embed == N_EMBED
    assert "--trust-torchscript" in refused(clip_text.main, ["convert", public / "ViT-L-14.pt", work / "clip-openai"],
                                            capsys)  # TorchScript can run code: only when asked
    ok(clip_text.main, ["convert", public / "ViT-L-14.pt", work / "clip-openai", "--trust-torchscript"], capsys)
    assert "with the vocabulary merges.txt" in ok(clip_text.main, ["convert", hf, work / "clip-l14"], capsys)
    with torch.no_grad():
        pooled = [clip_text.load_clip_text(d)(tokens)[1] for d in (hf, work / "clip-openai", work / "clip-l14")]
    for p in pooled:  # the three routes give transformers' text features
        torch.testing.assert_close(p, reference["features"], atol=1e-4, rtol=0)
    ids = reference["ids"][0, :int(tokens[0].argmax()) + 1].tolist()  # CAPTIONS[0], through transformers
    assert f"ids: {ids}" in ok(clip_text.main, ["encode", "--checkpoint", work / "clip-l14", CAPTIONS[0]], capsys)

    # Tokenising image-caption pairs, from a folder and from an img2dataset tar: the same codes.
    for source, out in ((public / "pairs", "tokens"), (public / "00000.tar", "tokens-tar")):
        ok(data.main, ["prepare", "--source", source, "--vqgan", work / "vqgan-gumbel-f8", "--out", work / out,
                       "--image-size", IMAGE_SIZE, "--device", "cpu"], capsys)
    folder, tar = data.TokenShards(work / "tokens"), data.TokenShards(work / "tokens-tar")
    assert len(folder) == len(tar) == len(CAPTIONS) and folder.grid == (4, 4) and folder.codebook_size == N_EMBED
    assert [folder[i][0] for i in range(len(folder))] == CAPTIONS
    assert all(np.array_equal(folder[i][1], tar[i][1]) for i in range(len(folder)))

    # Two gloo processes on the paper's recipe, cut down with --set; the text tower and the
    # vocabulary come from the Hugging Face folder.
    run = work / "runs" / "paper"
    common = ["--recipe", "recipes/paper.toml", "--data", work / "tokens", "--text-init", hf, "--out", run,
              "--batch-size", "4", "--log-every", "1", "--eval-every", "2", "--eval-captions", "2", "--threads", "1",
              "--device", "cpu", *SHRINK]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", *map(str, common), "--steps", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stage = run  # a one-table recipe (paper.toml) writes straight into --out; [[stage]] tables into --out/NAME
    assert json.loads((stage / "latest.json").read_text())["step"] == 2 and (stage / "samples").is_dir()
    model, info = emage.load_checkpoint(stage / "step-0000002")
    assert model.config.text.width == 64 and model.config.width == 32 and model.config.grid == (4, 4)
    assert Path(info["tokenizer_path"]).name == "merges.txt"  # the folder's, copied into the checkpoint

    # Resuming: the same command with --resume (and a later --steps) continues where it stopped.
    ok(train.main, [*common, "--steps", "3", "--resume"], capsys)
    assert json.loads((stage / "latest.json").read_text())["step"] == 3

    # OpenAI's TorchScript release as --text-init, only with --trust-torchscript; its vocabulary
    # from --bpe, here a folder (a Hugging Face one: the same merges).
    openai = ["--recipe", "recipes/paper.toml", "--data", work / "tokens", "--text-init", public / "ViT-L-14.pt",
              "--bpe", hf, "--out", work / "runs" / "paper-openai", "--steps", "1", "--batch-size", "2",
              "--eval-every", "1", "--eval-captions", "2", "--device", "cpu", *SHRINK]
    assert "--trust-torchscript" in refused(train.main, openai, capsys)
    ok(train.main, [*openai, "--trust-torchscript"], capsys)
    _, info = emage.load_checkpoint(work / "runs" / "paper-openai" / "latest")
    assert info["step"] == 1 and Path(info["tokenizer_path"]).name == "merges.txt"

    # Sampling from the run, and from a checkpoint copied elsewhere (cp -rL .../latest): the VQGAN it
    # names relative to itself is not there, --vqgan supplies it.
    ok(sample.main, ["a red circle", "--checkpoint", stage / "latest", "--out", work / "in-place.png"], capsys)
    moved = work / "elsewhere" / "much" / "deeper" / "emage"  # another depth: the relative VQGAN path misses
    shutil.copytree(stage / "latest", moved)
    assert json.loads((moved / "config.json").read_text())["step"] == 3
    assert "--vqgan" in refused(sample.main, ["a red circle", "--checkpoint", moved, "--out", work / "x.png"], capsys)
    ok(sample.main, ["a red circle", "--checkpoint", moved, "--vqgan", work / "vqgan-gumbel-f8",
                     "--out", work / "red.png"], capsys)
    parameters = json.loads(Image.open(work / "red.png").text["parameters"])
    assert parameters["step"] == 3 and parameters["guidance"] == sample.DEFAULT_GUIDANCE

    # The zero-shot COCO protocol on the moved checkpoint: reference statistics, generation, FID.
    weights, coco = public / "pt_inception-2015-12-05-6726825d.pth", public / "captions_val2014.json"
    inception_flags = ["--inception", weights, "--no-hash-check", "--allow-few", "--device", "cpu"]  # random weights
    ok(eval_fid.main, ["reference", "--captions", coco, "--images", public / "val2014", "--out", work / "coco.npz",
                       "--num-captions", 4, "--size", IMAGE_SIZE, *inception_flags], capsys)
    ok(eval_fid.main, ["generate", "--checkpoint", moved, "--vqgan", work / "vqgan-gumbel-f8", "--captions", coco,
                       "--out", work / "samples", "--num-captions", 4, "--device", "cpu"], capsys)
    assert sorted(p.name for p in (work / "samples").glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    settings = json.loads((work / "samples" / "manifest.json").read_text())["settings"]
    assert settings["candidates"] == sample.DEFAULT_CANDIDATES and settings["rerank"] == "self"
    ok(eval_fid.main, ["generate", "--checkpoint", moved, "--vqgan", work / "vqgan-gumbel-f8", "--captions", coco,
                       "--out", work / "samples-clip", "--num-captions", 2, "--rerank", "clip", "--clip", hf,
                       "--candidates", 2, "--device", "cpu"], capsys)  # the paper's ranking, by the HF CLIPModel
    assert json.loads((work / "samples-clip" / "manifest.json").read_text())["settings"]["rerank"] == "clip"
    out = ok(eval_fid.main, ["fid", work / "samples", work / "coco.npz", *inception_flags, "--json", work / "fid.json"],
             capsys)
    assert "matrix square root (2048x2048, float64)" in out and "FID " in out  # the long step is announced
    assert json.loads((work / "fid.json").read_text())["n_a"] == 4

    # Export, then sample on ONNX Runtime from the exported folder.
    ok(export_onnx.main, ["--checkpoint", stage / "latest", "--out", work / "exports" / "paper"], capsys)
    ok(sample.main, ["a red circle", "--backend", "onnx", "--onnx-dir", work / "exports" / "paper",
                     "--out", work / "red-onnx.png"], capsys)
    assert Image.open(work / "red-onnx.png").size == (256, 256)  # 32 px, enlarged 8x to at least 256
