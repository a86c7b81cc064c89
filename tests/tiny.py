"""Tiny random models and inputs shared by tests/test_emage.py and tests/test_extensions.py."""
import torch

from clip_text import TextConfig
from emage import Emage, EmageConfig

K, GRID, L = 16, (3, 4), 8  # codebook, token grid (n = 12), caption length
N = GRID[0] * GRID[1]
M = K  # the [mask] id


def tiny_config(**overrides) -> EmageConfig:
    text = TextConfig(vocab_size=40, context_length=L, width=32, heads=2, layers=1, embed_dim=32)
    return EmageConfig(text=text, codebook_size=K, grid=GRID, width=32, layers=2, heads=2, **overrides)


def tiny_model(seed=0, beyond=None, **overrides) -> Emage:
    """A random model (with `beyond`: extensions.build) with large weights: at the usual init the
    text barely moves the logits."""
    torch.manual_seed(seed)
    if beyond is None:
        model = Emage(tiny_config(**overrides))
    else:
        import extensions

        model = extensions.build(tiny_config(**overrides), beyond)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith("text_encoder."):
                p.normal_(std=0.3)
    return model


def captions(batch, seed=0):
    """Random captions [sot, words..., eot, 0...] of different lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, L, dtype=torch.long)
    for b in range(batch):
        length = int(torch.randint(1, L - 1, (1,), generator=g))
        tokens[b, 0] = 38
        tokens[b, 1 : 1 + length] = torch.randint(1, 38, (length,), generator=g)
        tokens[b, 1 + length] = 39  # end token: the largest id
    return tokens


def images(batch, seed=0):
    return torch.randint(0, K, (batch, N), generator=torch.Generator().manual_seed(seed))


class Recorder:
    """Records the decoder's input token ids (tok_emb) and output logits (head), in call order."""

    def __init__(self, model):
        self.inputs, self.logits = [], []
        model.tok_emb.register_forward_hook(lambda m, args, out: self.inputs.append(args[0].clone()))

        def keep(m, args, out):
            if out.requires_grad:
                out.retain_grad()
            self.logits.append(out)

        model.head.register_forward_hook(keep)
