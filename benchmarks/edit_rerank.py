"""Beyond the paper, measured on the shapes world: re-ranking of candidates, and region edits.

    python benchmarks/edit_rerank.py rerank        # accuracy at T=16 with 1, 4, 8, 16 candidates, two re-rankers
    python benchmarks/edit_rerank.py region-edit   # pass rate of edits that swap one object for another

rerank: every evaluation caption (or every --every-th) gets max(--candidates) candidates
per seed from one generate call (eval_fid.generate_scored); for each C the first C
candidates are re-ranked twice, by the generator's own `extensions.self_score` (sample.py's
default) and by the shapes CLIP (`clip_image.load_reranker`, the paper's protocol), and
the best one is scored by `shapes.score` (SHAPES.md). The same draws serve every C and
both re-rankers, so the columns differ only by re-ranking. "any of C" is the upper bound
a perfect re-ranker would reach.

region-edit: a two-object evaluation caption is rendered (`shapes.render`, seed s, placed
as the model's training images were: `Pipeline.render_options`), the
second object is found by the scorer's detector, a different object is asked for in its
place ("a red circle above a blue square" -> "a red circle above a green triangle"), the
cells of its bounding box (2 px margin) are redrawn with sample.py's editing path
(init_tokens + keep_mask) and the result is scored against the new caption.
Results are printed as Markdown and written to benchmarks/results/<command>.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import clip_image  # noqa: E402
import eval_fid  # noqa: E402
import sample  # noqa: E402
import shapes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def rerank(args) -> dict:
    captions = shapes.eval_captions()[::args.every]
    model, tokenizer, vq, info = eval_fid._load_generator(args.checkpoint, "cpu")
    reranker = clip_image.load_reranker(args.clip)
    most = max(args.candidates)
    rankers = ("self", "clip")
    passed = {(r, c): [] for r in rankers for c in args.candidates}  # (re-ranker, C) -> [(caption, passed)]
    oracle = {c: [] for c in args.candidates}
    started = time.perf_counter()
    for s in range(args.seeds):
        for k in range(0, len(captions), args.batch_size):
            batch = captions[k:k + args.batch_size]
            generator = torch.Generator().manual_seed(s * 1_000_003 + k // args.batch_size)
            images, own = eval_fid.generate_scored(model, tokenizer, vq, batch, generator, num_candidates=most,
                                                   steps=args.steps, temperature=args.temperature,
                                                   guidance_scale=args.guidance)
            images = images.reshape(len(batch), most, *images.shape[1:])
            own = own.reshape(len(batch), most) if most > 1 else np.zeros((len(batch), 1))
            for caption, group, self_scores in zip(batch, images, own):
                scores = {"self": self_scores, "clip": reranker(group, caption)}  # (most,) each
                ok = [shapes.score(Image.fromarray(im), caption) for im in group]
                for c in args.candidates:
                    for r in rankers:
                        passed[r, c].append((caption, ok[int(np.argmax(scores[r][:c]))]))
                    oracle[c].append((caption, any(ok[:c])))
            print(f"seed {s}, captions {k + len(batch)}/{len(captions)}: {time.perf_counter() - started:.0f} s", flush=True)
    rows = {c: {**{r: shapes.accuracy_report(passed[r, c]) for r in rankers},
                "any_of_c": shapes.accuracy_report(oracle[c])} for c in args.candidates}
    print(f"\nshapes accuracy (seen / novel), T={args.steps}, {len(captions)} captions x {args.seeds} seeds "
          f"({info.get('variant')}, step {info.get('step')}), temperature {args.temperature}, "
          f"guidance {args.guidance}, CLIP {args.clip}\n")
    print("| candidates | self-score | CLIP | any of C passes |\n|---|---|---|---|")
    pair = lambda a: f"{a['seen']['accuracy']:.3f} / {a['novel']['accuracy']:.3f}"  # noqa: E731
    for c, r in rows.items():
        print(f"| {c} | {pair(r['self'])} | {pair(r['clip'])} | {pair(r['any_of_c'])} |")
    return {"settings": {**{k: str(v) for k, v in vars(args).items() if k != "run"}, "captions": len(captions)},
            "rows": {str(c): r for c, r in rows.items()}, "seconds": round(time.perf_counter() - started)}


def _swap_second_object(caption: shapes.Caption, rng: random.Random) -> shapes.Caption:
    """The caption with its second object replaced by another seen colour-shape pair (same size word)."""
    first, second = caption.objects
    while True:
        color, shape = rng.choice(list(shapes.COLORS)), rng.choice(shapes.SHAPES)
        pair = (color, shape)
        if pair not in shapes.HELD_OUT and pair != (second.color, second.shape) and pair != (first.color, first.shape):
            return shapes.Caption((first, shapes.Obj(color, shape, second.size)), caption.relation)


def region_edit(args) -> dict:
    two = [c for c in shapes.eval_captions() if shapes.parse(c).relation and not shapes.is_novel(c)]
    pipe = sample.Pipeline.load(args.checkpoint, "cpu")
    rng = random.Random(0)
    grid = pipe.model.config.grid
    cases = []
    for s in range(args.seeds):
        original = shapes.parse(two[s % len(two)])
        image = shapes.render(original, s, **pipe.render_options)  # the kind of image the model was trained on
        target = next(d for d in shapes.detect(image) if d.matches(original.objects[1]))
        x0, y0, x1, y1 = target.bbox  # inclusive
        region = (max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 3, 64), min(y1 + 3, 64))
        redraw = sample.cells_to_redraw(sample.region_pixels(region, (64, 64)), grid)
        cases.append((str(_swap_second_object(original, rng)), image, ~redraw))
    started = time.perf_counter()
    init = torch.cat([pipe.encode(image) for _, image, _ in cases])  # (S, n)
    keep = torch.stack([k for _, _, k in cases])  # (S, n)
    generator = torch.Generator().manual_seed(0)
    tokens = pipe.model.generate(pipe.text_tokens([c for c, _, _ in cases]), steps=args.steps, init_tokens=init,
                                 keep_mask=keep, generator=generator, temperature=args.temperature,
                                 guidance_scale=args.guidance)
    outputs = pipe.decode(tokens)
    results = [{"caption": c, "seed": s, "passed": bool(shapes.score(out, c)), "cells_redrawn": int((~k).sum())}
               for s, ((c, _, k), out) in enumerate(zip(cases, outputs))]
    rate = float(np.mean([r["passed"] for r in results]))
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        for s, ((c, image, k), out) in enumerate(zip(cases, outputs)):
            sample.edit_strip(image, k, out, grid).resize((4 * 196, 4 * 64), Image.NEAREST).save(
                Path(args.save) / f"edit-{s:03d}.png")
    print(f"\nregion edit, T={args.steps}: {sum(r['passed'] for r in results)}/{len(results)} seeds pass the scorer "
          f"({rate:.3f}); mean cells redrawn {np.mean([r['cells_redrawn'] for r in results]):.1f} of {grid[0] * grid[1]}")
    return {"settings": {k: str(v) for k, v in vars(args).items() if k != "run"}, "pass_rate": rate,
            "results": results, "seconds": round(time.perf_counter() - started)}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rerank", help="accuracy with 1, 4, 8, 16 candidates, re-ranked by the self-score and by CLIP",
                       formatter_class=fmt)
    p.add_argument("--clip", default=str(clip_image.SHAPES_CLIP), help="whole CLIP checkpoint")
    p.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 8, 16], help="candidate counts to compare")
    p.add_argument("--every", type=int, default=1, help="use every N-th evaluation caption (1 = all 240)")
    p.add_argument("--batch-size", type=int, default=16, help="captions per generate call")
    p.set_defaults(run=rerank)
    p = sub.add_parser("region-edit", help="pass rate of edits that ask for another object in a region", formatter_class=fmt)
    p.add_argument("--save", help="folder for input | mask | output strips")
    p.set_defaults(run=region_edit)
    for p in sub.choices.values():
        p.add_argument("--checkpoint", default=str(sample.DEMO_CHECKPOINT), help="Emage checkpoint")
        p.add_argument("--steps", type=int, default=16, help="mask-predict rounds T")
        ranking = p.prog.endswith("rerank")  # at sample.py's settings; region-edit without guidance
        p.add_argument("--seeds", type=int, default=2 if ranking else 100, help="seeds")
        p.add_argument("--threads", type=int, default=1, help="CPU threads")
        p.add_argument("--temperature", type=float, default=sample.DEFAULT_TEMPERATURE, help="token sampling temperature")
        p.add_argument("--guidance", type=float, default=sample.DEFAULT_GUIDANCE if ranking else 1.0,
                       help="classifier-free guidance scale (1 = off)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    report = args.run(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.command.replace('-', '_')}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
