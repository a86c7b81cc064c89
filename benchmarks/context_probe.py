"""Does a generator read its context? Cross-entropy of masked tokens with most of the image visible.

    python benchmarks/context_probe.py checkpoints/shapes/emage

The first 64 evaluation captions are rendered (seed 0) and tokenised with the checkpoint's
VQGAN. For each masking fraction, random positions become [mask] and one decoder pass
predicts them. Printed: the mean cross-entropy (nats) of all masked tokens and of masked
object tokens (not the most common, background, code), and how often the most likely code
is right. A model that reads its context scores far lower at 5 % masking than at 100 %.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shapes  # noqa: E402
import vqgan  # noqa: E402
from eval_fid import _load_generator  # noqa: E402


@torch.no_grad()
def probe(checkpoint, fractions=(0.05, 0.25, 0.5, 0.75, 1.0), captions: int = 64) -> list[dict]:
    model, tokenizer, vq, _ = _load_generator(checkpoint, "cpu")
    model.eval()
    chosen = shapes.eval_captions()[:captions]
    y = vq.encode(vqgan.to_tensor([shapes.render(c, 0) for c in chosen])).flatten(1)  # (B, n)
    background = torch.mode(y.flatten()).values
    text_kv, text_mask = model.encode_text(tokenizer(chosen, context_length=model.config.text.context_length))
    rows = []
    for fraction in fractions:
        masked = torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) < fraction
        logits = model.round_logits(torch.where(masked, torch.full_like(y, model.config.mask_id), y), text_kv, text_mask)
        nll = -logits.log_softmax(-1).gather(-1, y[..., None])[..., 0]  # (B, n)
        objects = masked & (y != background)
        rows.append({"masked": fraction, "nll": nll[masked].mean().item(), "nll_objects": nll[objects].mean().item(),
                     "top1_objects": (logits.argmax(-1) == y)[objects].float().mean().item()})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="Emage checkpoint directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| masked | cross-entropy (nats) | on object tokens | top-1 on object tokens |\n|---|---|---|---|")
    for r in probe(args.checkpoint):
        print(f"| {r['masked']:.0%} | {r['nll']:.3f} | {r['nll_objects']:.3f} | {r['top1_objects']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
