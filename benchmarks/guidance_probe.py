"""Does every round need guidance's unconditional pass? Probed on the shipped demo.

    python benchmarks/guidance_probe.py --rounds 1-4 [--candidates 1]

Runs `eval_fid.shapes_accuracy` (temperature 0.7, guidance 1.5, T = 16, 480 pairs) with
guidance only in the rounds --rounds FIRST-LAST: other rounds decode the conditional rows alone
(their logits stand in for both halves, so guided_logits returns them unchanged). The
decoder is wrapped, not changed, so the result is what a guidance interval in `generate`
would give at (16 + guided rounds) / 32 of its decoder rows.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emage  # noqa: E402
import eval_fid  # noqa: E402


def guided_only(first: int, last: int) -> None:
    decode, generate = emage.Emage._decode, emage.Emage.generate
    state = {"inside": False, "calls": 0}

    def limited_decode(self, x, text_kv, text_mask, causal=False, caches=None):
        if state["inside"]:
            state["calls"] += 1
            if not first <= state["calls"] <= last:
                half = x.shape[0] // 2
                cond = decode(self, x[:half], text_kv[:half], text_mask[:half], causal, caches)
                return torch.cat([cond, cond])
        return decode(self, x, text_kv, text_mask, causal, caches)

    def counted_generate(self, *args, **kwargs):
        state.update(inside=True, calls=0)
        try:
            return generate(self, *args, **kwargs)
        finally:
            state["inside"] = False

    emage.Emage._decode, emage.Emage.generate = limited_decode, counted_generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", required=True, help="FIRST-LAST: the rounds (1-16) that use guidance")
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    first, last = (int(r) for r in args.rounds.split("-"))
    guided_only(first, last)
    report = eval_fid.shapes_accuracy("checkpoints/shapes/emage", candidates=args.candidates, steps=16,
                                      temperature=0.7, guidance_scale=1.5)
    summary = {split: report[split] for split in ("seen", "novel", "all")}
    print(f"guidance in rounds {args.rounds} of 16, {args.candidates} candidates: {summary}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
