"""Why #2 trails #1 at the plateau: is it the one-step prediction, or what the rounds commit?

    python benchmarks/variant2_probe.py                      # runs/paper/{v1-s0,v2-s0,v3-s0}/latest

For 256 training examples (a fixed draw), each model sees the true tokens with a share r of
them masked, and we report how often its argmax matches the truth at the masked positions
("true context", what #1 trains on), and again when half of those positions are filled with
the model's own argmax first ("own guesses", close to #2's Y_mix); over all masked positions
and over those where the truth is an object token. Then it samples 128
images per model (Algorithm 1 or 3 as trained, T = 16, temperature 0.7) and reports the
share of non-background tokens against the data's: a model that draws too few objects shows
a smaller share.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import extensions  # noqa: E402
from emage import load_tokenizer  # noqa: E402

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def masked_accuracy(model, text_kv, text_mask, y, r: float, generator, background: int) -> tuple[float, ...]:
    """Argmax accuracy at the masked positions (all, then object positions only) with the true
    context, and the same with half of them first filled by the model's own argmax."""
    M = model.config.mask_id
    mask = torch.rand(y.shape, generator=generator) < r
    pred = model.round_logits(torch.where(mask, M, y), text_kv, text_mask).argmax(-1)
    still = mask & (torch.rand(y.shape, generator=generator) < 0.5)
    mixed = torch.where(mask & ~still, pred, y)
    pred2 = model.round_logits(torch.where(still, M, mixed), text_kv, text_mask).argmax(-1)
    hit = lambda p, where: (p[where] == y[where]).float().mean().item()  # noqa: E731
    objects = y != background
    return hit(pred, mask), hit(pred, mask & objects), hit(pred2, still), hit(pred2, still & objects)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper")
    p.add_argument("--models", nargs="+", default=["v1-s0", "v2-s0", "v3-s0"])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shapes-patterns-60k")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shards = data.TokenShards(args.data)
    indices = torch.randint(0, len(shards), (256,), generator=torch.Generator().manual_seed(1)).tolist()
    captions, y = shards.batch(indices)
    background = collections.Counter(y.flatten().tolist()).most_common(1)[0][0]
    print(f"data: foreground share {(y != background).float().mean().item():.3f} (background code {background})")
    for name in args.models:
        model, info = extensions.load_checkpoint(args.runs / name / "latest")
        text = load_tokenizer(info["tokenizer_path"])(captions, context_length=model.config.text.context_length)
        with torch.no_grad():
            text_kv, text_mask = model.encode_text(text)
            generator = torch.Generator().manual_seed(2)
            rows = [masked_accuracy(model, text_kv, text_mask, y, r, generator, background) for r in RATIOS]
            sampler = torch.Generator().manual_seed(0)
            drawn = torch.cat([model.generate(text[i:i + 32], steps=16, temperature=0.7, generator=sampler)
                               for i in range(0, 128, 32)])
        share = (drawn != background).float().mean(1)
        print(f"{name} (step {info['step']}): generated foreground share {share.mean().item():.3f}, "
              f"empty images {(share == 0).float().mean().item():.3f}")
        for r, (truth, truth_objects, own, own_objects) in zip(RATIOS, rows):
            print(f"  r = {r:.1f}: true context {truth:.3f} (object tokens {truth_objects:.3f}), "
                  f"own guesses {own:.3f} (object tokens {own_objects:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
