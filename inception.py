"""The FID InceptionV3, from scratch: the network, its weights file, and the input resizing.

FID is defined by one network, the TensorFlow graph `inception-2015-12-05` (pool_3
features). `load_inception(path)` builds it from the published PyTorch port of those
weights, read as tensors only. `eval_fid.py` computes FID with it.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class FIDError(ValueError):
    """A mistake the user can fix: a missing file, wrong weights, too few images."""


# ---------------------------------------------------------------------------
# The FID InceptionV3
# ---------------------------------------------------------------------------
# FID is defined by one network: the TensorFlow graph `inception-2015-12-05`
# (pool_3 features) that the original TTUR code used. pytorch-fid ported it as
# `pt_inception-2015-12-05-6726825d.pth`; torch-fidelity ships the same bytes as
# `weights-inception-2015-12-05-6726825d.pth`. Module names below mirror theirs
# (which are torchvision's), so the key mapping is one-to-one. The network is
# torchvision's Inception3 except where marked `Patch:`.

INCEPTION_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # 95,628,359 bytes
KNOWN_SHA256 = {  # file name -> SHA-256 of the published file (both releases hold the same bytes)
    "pt_inception-2015-12-05-6726825d.pth": INCEPTION_SHA256,
    "weights-inception-2015-12-05-6726825d.pth": INCEPTION_SHA256,
}
INPUT_SIZE = 299  # the graph's input resolution
FEATURE_DIM = 2048  # pool_3 features


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # Patch: TensorFlow's 3x3 average pool divides by the number of real pixels
    # under the window; torchvision counts the zero padding too.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)  # (B, 480 + in_ch, H', W'), spatial size halved


class InceptionC(nn.Module):
    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], 1)  # (B, 768, 17, 17)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    def __init__(self, in_ch: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.max_pool:
            # Patch: the FID graph's last block (Mixed_7c) max-pools here where
            # every other Inception uses an average pool; FID is defined by the graph.
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)  # (B, 2048, 8, 8)


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x `resize_bilinear(align_corners=False)` computes it.

    Patch: the FID graph resizes its input to 299x299 with TF1's legacy bilinear
    rule: source coordinate = output index * (in / out), no half-pixel offset, no
    antialiasing. torch's `interpolate` uses half-pixel centres, which shifts the
    image by a fraction of a pixel and changes FID. x: float (B, C, H, W).
    """
    def taps(n_in: int):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo.to(src.dtype)).to(x.dtype)

    y_lo, y_hi, dy = taps(x.shape[2])
    x_lo, x_hi, dx = taps(x.shape[3])
    top = x[:, :, y_lo, :]  # (B, C, size, W)
    bottom = x[:, :, y_hi, :]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx  # (B, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


class InceptionV3(nn.Module):
    """The FID InceptionV3: images -> 2048-d pool_3 features (and the graph's 1008-way logits)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        # Patch: 1008 classes, not torchvision's 1000: the 2015 graph's softmax has
        # 1008 outputs. Unused by FID; kept so every tensor of the file is loaded.
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W), uint8 or float, values in [0, 255] -> (B, 2048) float32 features."""
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)  # (B, 3, 299, 299)
        # Patch: the graph maps [0, 255] to [-1, 1) as (x - 128) / 128, not x / 127.5 - 1.
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): pool_3, the 8x8 average pool

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 2048) pool features -> (B, 1008) logits of the 2015 graph (Inception Score uses them)."""
        return self.fc(features)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_state_dict(source: dict, model: InceptionV3, origin: str) -> dict:
    """Map a pytorch-fid / torch-fidelity state dict onto `model`, checking every key and shape.

    The names are the same on both sides; `num_batches_tracked` (a BatchNorm
    training counter, unused at inference) is taken when present and zero otherwise.
    """
    expected = model.state_dict()
    mapped = {}
    for key, tensor in source.items():
        if key not in expected:
            raise FIDError(f"{origin} has a tensor {key!r} that the FID InceptionV3 does not: "
                           "pass the pt_inception-2015-12-05 weights file")
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[key].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise FIDError(f"{origin}: {key} has shape {shape}, the FID InceptionV3 needs "
                           f"{tuple(expected[key].shape)}: pass the pt_inception-2015-12-05 weights file")
        mapped[key] = tensor
    for key, tensor in expected.items():
        if key not in mapped:
            if not key.endswith("num_batches_tracked"):
                raise FIDError(f"{origin} lacks {key}: pass the pt_inception-2015-12-05 weights file")
            mapped[key] = torch.zeros_like(tensor)
    return mapped


def load_inception(path, check_hash: bool = True) -> InceptionV3:
    """Build the FID InceptionV3 from a weights file (eval mode, no gradients); `.sha256` holds the file's hash.

    The file is read with `torch.load(weights_only=True)`: tensors only, no code.
    Its SHA-256 is compared with the published one when the file has a published
    name (a renamed copy is loaded, and the command line says whether it matches).
    """
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"Inception weights not found at {path}: download {INCEPTION_URLS[0]} "
                       "and pass its path with --inception")
    digest = sha256_file(path)
    want = KNOWN_SHA256.get(path.name)
    if check_hash and want is not None and digest != want:
        raise FIDError(f"{path} has SHA-256 {digest}, the published file has {want}: it is damaged or "
                       "another model; download it again (or pass --no-hash-check to use it anyway)")
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FIDError(f"cannot read {path} as a tensor file ({first}); pass the pt_inception-2015-12-05 "
                       "weights file") from None
    if not isinstance(source, dict):
        raise FIDError(f"{path} holds a {type(source).__name__}, not a state dict: pass the "
                       "pt_inception-2015-12-05 weights file")
    model = InceptionV3()
    model.load_state_dict(inception_state_dict(source, model, str(path)), strict=True)
    model.sha256 = digest
    return model.eval().requires_grad_(False)
