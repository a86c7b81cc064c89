"""The README's pictures, redrawn from the committed demo checkpoints.

    python benchmarks/figures.py            # docs/samples.png, docs/rounds.png, docs/edit.png

samples.png: ten prompts (the last two with held-out colour-shape pairs), seed 0, T = 16,
sample.py's default temperature, guidance and re-ranking, each image over its caption and the
scorer's verdict (SHAPES.md). rounds.png: the first prompt after each of the 16 rounds, as in the
paper's Figure 5 (`sample.py --show-steps`). edit.png: input | mask | output of a region
edit (`sample.py --init-image ... --region ... --show-edit`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
import shapes  # noqa: E402
from train import image_grid  # noqa: E402

PROMPTS = [
    "a red circle to the left of a blue square",
    "a large green triangle",
    "a small yellow circle above a purple square",
    "a blue square",
    "a cyan triangle to the right of a red square",
    "a large purple circle",
    "a small green square below a large red triangle",
    "a blue circle above a yellow triangle",
    "a purple triangle",  # held-out pairs (SHAPES.md): never in training
    "a large yellow square to the left of a small cyan circle",
]
EDIT_SOURCE = "a red circle to the left of a blue square"
EDIT_PROMPT = "a red circle to the left of a green triangle"
EDIT_REGION = "32,0,64,64"


def samples(pipe: sample.Pipeline, out: Path, seed: int) -> None:
    default = sample.build_parser().get_default  # what `python sample.py "prompt"` uses
    images = [pipe.decode(pipe.best_of(p, sample.DEFAULT_CANDIDATES, seed=seed, guidance_scale=default("guidance"),
                                       temperature=default("temperature")))[0] for p in PROMPTS]
    verdicts = ["pass" if shapes.score(im, p) else "fail" for im, p in zip(images, PROMPTS)]
    image_grid(images, [f"{p} [{v}]" for p, v in zip(PROMPTS, verdicts)], scale=3, cols=5).save(out)
    print(f"wrote {out}: {verdicts.count('pass')} of {len(PROMPTS)} pass the scorer")


def run_sample(argv: list[str]) -> None:
    if sample.main(argv) != 0:
        raise SystemExit(f"sample.py {' '.join(argv)} failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the three PNGs")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of every picture")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = sample.Pipeline.load()
    samples(pipe, args.out / "samples.png", args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_sample([PROMPTS[0], "--seed", str(args.seed), "--show-steps", "--upscale", "2", "--out", str(work / "r.png")])
        (work / "r-steps.png").replace(args.out / "rounds.png")
        shapes.render(EDIT_SOURCE, args.seed, **pipe.render_options).save(work / "input.png")
        run_sample([EDIT_PROMPT, "--seed", str(args.seed), "--init-image", str(work / "input.png"), "--region", EDIT_REGION,
                    "--show-edit", "--upscale", "3", "--out", str(work / "e.png")])
        (work / "e-edit.png").replace(args.out / "edit.png")
    print(f"wrote {args.out / 'rounds.png'} and {args.out / 'edit.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
