"""data.py: the shapes stream, the image-caption sources, `prepare` and the token-shard reader."""
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import files
import shapes
import vqgan

HELD_OUT = ("purple triangle", "yellow square", "cyan circle")  # SHAPES.md, written out independently


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: a second thread only adds synchronisation (and the CI CPU may be shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vqgan(path):
    """A random 32x32 -> 4x4-token VQGAN: fast, and the shards it writes are still a function of the pixels."""
    torch.manual_seed(0)
    config = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, n_embed=32, quantizer="vector", norm_groups=4)
    model = vqgan.VQGAN(config)
    vqgan.save_vqgan(model, path)
    return vqgan.load_vqgan(path)


def expected_codes(model, image, size=32):
    x = data.image_to_tensor(files.center_crop_resize(image.convert("RGB"), size))[None]
    return model.encode(x).reshape(-1).numpy()


# -- the shapes stream --------------------------------------------------------------------


def test_shapes_stream_never_yields_a_held_out_pair_or_an_evaluation_caption():
    two_object_eval = {c for c in shapes.eval_captions() if len(shapes.parse(c).objects) == 2}
    captions = [data.shapes_example(7, i)[0] for i in range(3000)]
    for caption in captions:
        assert not any(pair in caption for pair in HELD_OUT), caption
        assert caption not in two_object_eval
    assert len(set(captions)) > 1000  # and it is not degenerate


def test_shapes_stream_is_seeded_and_disjoint_per_rank():
    first = [c for c, _ in (data.shapes_example(0, i) for i in range(8))]
    again, image = data.shapes_example(0, 3)
    assert again == first[3] and np.array_equal(np.asarray(image), np.asarray(data.shapes_example(0, 3)[1]))
    stream0, stream1 = iter(data.ShapesStream(0, rank=0, world_size=2)), iter(data.ShapesStream(0, rank=1, world_size=2))
    assert [next(stream0)[0] for _ in range(4)] == first[0::2]  # the ranks split one global stream
    assert [next(stream1)[0] for _ in range(4)] == first[1::2]
    assert [c for c, _ in (data.shapes_example(1, i) for i in range(8))] != first  # another seed, another stream


def test_batch_indices_visit_every_example_once_per_epoch_and_are_pure():
    n, b = 10, 4
    stream = np.concatenate([data.batch_indices(s, b, n, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # every epoch reshuffles
    assert np.array_equal(data.batch_indices(2, b, n, 3), stream[8:12])  # no hidden state


# -- sources, prepare and the reader ------------------------------------------------------


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """Six captioned shapes images (PNG and JPEG, one not square), two corrupt files (a JPEG truncated after
    its header, bytes that are no image), one image without a caption."""
    root = tmp_path_factory.mktemp("images")
    items = []
    for i in range(6):
        caption, image = data.shapes_example(11, i)
        if i == 2:  # a wide image: centre-cropped to its middle 64x64
            wide = Image.new("RGB", (96, 64))
            wide.paste(image, (16, 0))
            image = wide
        items.append((f"img{i}", caption, image, "png" if i % 2 == 0 else "jpg"))
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    files = {}
    for key, caption, image, ext in items:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if ext == "png" else "JPEG", quality=95)
        files[key] = (caption, buffer.getvalue(), ext)
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    files["truncated"] = ("a red circle", jpeg.getvalue()[: len(jpeg.getvalue()) * 2 // 3], "jpg")
    files["junk"] = ("a blue square", b"\x89PNG not really" * 10, "png")
    files["nocaption"] = (None, files["img0"][1], "png")
    for key, (caption, blob, ext) in sorted(files.items()):
        path = folder / "sub" / f"{key}.{ext}"
        path.write_bytes(blob)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption + "\n")
    tar_path = root / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:  # img2dataset's layout: key.jpg, key.txt, key.json consecutive
        for key, (caption, blob, ext) in sorted(files.items()):
            members = [(f"{key}.{ext}", blob), (f"{key}.json", b"{}")] + ([(f"{key}.txt", caption.encode())] if caption else [])
            for name, payload in members:
                info = tarfile.TarInfo(f"00000/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return {"root": root, "folder": folder, "tar": tar_path, "items": items}


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "vqgan"
    return path, tiny_vqgan(path)


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_prepare_round_trips_images_and_captions_and_skips_broken_files(image_set, vq, tmp_path, kind):
    vq_path, model = vq
    source = data.open_source(str(image_set[kind]))
    assert isinstance(source, data.FolderSource if kind == "folder" else data.TarSource)
    meta = data.prepare(source, vq_path, tmp_path / "tokens", shard_size=3, batch_size=4, progress=False)
    assert meta["num_examples"] == 6 and meta["skipped"] == {"unreadable": 2, "no_caption": 1}
    assert meta["grid"] == [4, 4] and meta["codebook_size"] == 32 and meta["image_size"] == 32
    shards = data.TokenShards(tmp_path / "tokens")
    assert len(shards) == 6
    got = {shards.caption(i): shards[i][1] for i in range(len(shards))}
    for key, caption, image, ext in image_set["items"]:
        if ext == "jpg":  # what the decoder of the stored JPEG gives
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            image = Image.open(io.BytesIO(buffer.getvalue()))
        assert got[caption].dtype == np.uint16
        np.testing.assert_array_equal(got[caption], expected_codes(model, image))
    captions, codes = shards.batch([0, 5])
    assert codes.dtype == torch.int64 and codes.shape == (2, 16) and len(captions) == 2


def test_images_over_the_size_limit_are_skipped_as_unreadable(tmp_path):
    """Folder and tar items are read with files.open_image: an image claiming more than
    files.MAX_IMAGE_PIXELS is refused from its header (a FileError) and skipped like a broken file."""
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.new("1", (9000, 8000)).save(folder / "big.png")  # 72 MP in a small file
    (folder / "big.txt").write_text("a red circle")
    ((key, load),) = data.FolderSource(folder).items()
    assert key == "big" and data.load_example(load, 32) == ("a red circle", None)
    with tarfile.open(tmp_path / "big.tar", "w") as tar:
        tar.add(folder / "big.png", "00000/big.png")
        tar.add(folder / "big.txt", "00000/big.txt")
    keys = []
    for key, load in data.TarSource([tmp_path / "big.tar"]).items():  # the tar is open while iterating
        keys.append(key)
        with pytest.raises(files.FileError, match="over the limit"):
            load()[1]()
        assert data.load_example(load, 32) == ("a red circle", None)
    assert keys == ["big/00000/big"]
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    ok, = [load for _, load in data.FolderSource(_write(tmp_path / "ok", image, "a red square")).items()]
    caption, crop = data.load_example(ok, 16)
    assert caption == "a red square" and crop.size == (16, 16) and crop.getpixel((8, 8)) == (200, 10, 10)


def _write(folder, image, caption):
    folder.mkdir()
    image.save(folder / "x.png")
    (folder / "x.txt").write_text(caption)
    return folder


def test_prepare_resumes_from_the_first_incomplete_shard(vq, tmp_path):
    vq_path, _ = vq
    out = tmp_path / "tokens"
    source = data.ShapesSource(10, seed=5)
    data.prepare(source, vq_path, out, shard_size=4, progress=False)
    tokens = {p.name: p.read_bytes() for p in out.glob("tokens-*.npy")}
    stamp = (out / "tokens-00000.npy").stat().st_mtime_ns
    (out / "shard-00001.json").unlink()  # as if interrupted while writing shard 1
    (out / "tokens-00001.npy").write_bytes(b"half a file")
    (out / "meta.json").unlink()
    meta = data.prepare(source, vq_path, out, shard_size=4, progress=False)
    assert meta["num_examples"] == 10 and len(meta["shards"]) == 3
    assert (out / "tokens-00000.npy").stat().st_mtime_ns == stamp  # complete shards are not redone
    assert {p.name: p.read_bytes() for p in out.glob("tokens-*.npy")} == tokens
    with pytest.raises(data.DataError, match="another source"):
        data.prepare(data.ShapesSource(10, seed=6), vq_path, out, shard_size=4, progress=False)


def test_token_shards_memory_map_and_reject_incomplete_directories(vq, tmp_path):
    vq_path, _ = vq
    out = tmp_path / "tokens"
    data.prepare(data.ShapesSource(5, seed=1), vq_path, out, shard_size=2, progress=False)
    shards = data.TokenShards(out)
    assert all(isinstance(t, np.memmap) for t in shards.tokens)
    assert [shards.caption(i) for i in range(5)] == [data.shapes_example(1, i)[0] for i in range(5)]
    lines = (out / "captions-00000.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["000000000", "000000001"]
    (out / "meta.json").unlink()
    with pytest.raises(data.DataError, match="no meta.json"):
        data.TokenShards(out)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert data.main(["prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: [^\n]+\n", err)
