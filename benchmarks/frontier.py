"""Accuracy against time per image for the shipped demo's sampler: candidates x rounds.

    python benchmarks/frontier.py                 # evaluate what is missing, time every setting, write docs/frontier.*
    python benchmarks/frontier.py --no-evaluate   # time and report the settings already evaluated

Each setting (C candidates ranked by the self-score, T rounds; temperature 0.7 and guidance 1.5
as sample.py draws) is evaluated once with `eval_fid.py shapes` on every evaluation caption
with 2 seeds (480 pairs), kept in --runs as JSON so that a rerun only adds what is missing.
Times are medians of interleaved runs (every setting once per repeat) of caption -> best
candidate -> pixels at batch 1, in one process. Writes docs/frontier.json, .md and .png.

The chosen default is the fastest setting whose seen and novel accuracies are both within one
standard error (of the difference) of the most accurate setting's.
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from files import atomic_write, read_json, write_json, write_text  # noqa: E402  (atomic writes, bounded reads)
from shapes import standard_error  # noqa: E402

DEMO = ROOT / "checkpoints" / "shapes" / "emage"
SETTINGS = ((1, 16), (2, 8), (2, 16), (4, 8), (4, 16), (8, 4), (8, 8), (8, 16))  # (candidates, rounds)
CAPTION = "a red circle to the left of a blue square"
TARGET_SECONDS = 0.15  # per image: the default's accuracy at a third of its time


def accuracy(candidates: int, rounds: int, runs: Path, evaluate: bool) -> dict | None:
    path = runs / f"c{candidates}-t{rounds}.json"
    if not path.is_file() and evaluate:
        print(f"evaluating {candidates} candidates x {rounds} rounds", flush=True)
        done = subprocess.run([sys.executable, str(ROOT / "eval_fid.py"), "shapes", "--checkpoint", str(DEMO),
                               "--temperature", "0.7", "--guidance", "1.5", "--candidates", str(candidates),
                               "--steps", str(rounds), "--json", str(path)], cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"error: evaluating {candidates} x {rounds} failed (see above); rerun to continue")
    if not path.is_file():
        return None
    report = read_json(path, "an evaluation")
    return {split: {"accuracy": report[split]["accuracy"], "count": report[split]["count"]} for split in ("seen", "novel", "all")}


def latencies(settings, repeats: int, threads: int) -> dict:
    import torch

    import sample

    torch.set_num_threads(threads)
    pipe = sample.Pipeline.load(DEMO, "cpu")

    def once(candidates, rounds, seed):
        started = time.perf_counter()
        pipe.decode(pipe.best_of(CAPTION, candidates, seed=seed, steps=rounds, temperature=0.7, guidance_scale=1.5))
        return time.perf_counter() - started

    for setting in settings:
        once(*setting, 0)  # warm-up
    times = {setting: [] for setting in settings}
    for i in range(repeats):
        for setting in settings:
            times[setting].append(once(*setting, i))
    return {setting: statistics.median(values) for setting, values in times.items()}


def plot(rows: list[dict], path: Path, target_seconds: float = TARGET_SECONDS) -> None:
    from PIL import Image, ImageDraw

    size, (left, top, right, bottom) = (760, 480), (70, 30, 720, 420)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xmax = math.ceil(max(r["seconds"] for r in rows + [{"seconds": target_seconds}]) * 1.1 / 0.1) * 0.1
    to_px = lambda x, y: (left + (right - left) * x / xmax, bottom - (bottom - top) * y)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(6):
        draw.text((left - 40, to_px(0, i / 5)[1] - 6), f"{i / 5:.1f}", fill="black")
    for i in range(round(xmax / 0.1) + 1):
        draw.text((to_px(i * 0.1, 0)[0] - 12, bottom + 6), f"{i * 0.1:.1f}", fill="black")
    x = to_px(target_seconds, 0)[0]
    for y in range(top, bottom, 8):  # dashed: the time target
        draw.line([x, y, x, y + 4], fill="gray")
    draw.text((x + 4, top + 4), f"{target_seconds} s target", fill="gray")
    draw.text((300, bottom + 30), "seconds per image (batch 1, CPU)", fill="black")
    draw.text((left, 8), "accuracy: seen (blue), novel (red); labels: candidates x rounds", fill="black")
    for r in rows:
        for split, colour in (("seen", (31, 119, 180)), ("novel", (214, 39, 40))):
            x, y = to_px(r["seconds"], r[split]["accuracy"])
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            draw.text((x + 6, y - 6), f"{r['candidates']}x{r['rounds']}", fill=colour)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def se(row: dict, split: str) -> float:
    return standard_error(row[split]["accuracy"], row[split]["count"])


def choose(rows: list[dict]) -> dict:
    """The fastest row whose seen and novel accuracies are within one standard error of the
    difference from the most accurate row's (by all pairs)."""
    best = max(rows, key=lambda r: r["all"]["accuracy"])
    close = lambda r: all(best[split]["accuracy"] - r[split]["accuracy"] <= math.hypot(se(best, split), se(r, split))  # noqa: E731
                          for split in ("seen", "novel"))
    return min((r for r in rows if close(r)), key=lambda r: r["seconds"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "frontier", help="where each setting's evaluation is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where frontier.json, .md and .png go")
    parser.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                        help="evaluate settings that have no result yet (minutes each)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per setting (medians)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the timed runs")
    args = parser.parse_args(argv)
    if not 1 <= args.repeats <= 1000 or not 1 <= args.threads <= 1024:
        parser.error("--repeats and --threads must be positive")
    args.runs.mkdir(parents=True, exist_ok=True)
    found = {setting: accuracy(*setting, args.runs, args.evaluate) for setting in SETTINGS}
    settings = [s for s, a in found.items() if a is not None]
    seconds = latencies(settings, args.repeats, args.threads)
    rows = [{"candidates": c, "rounds": t, "seconds": seconds[(c, t)], **found[(c, t)]} for c, t in settings]
    if not rows:
        raise SystemExit(f"error: no setting is evaluated in {args.runs}: run without --no-evaluate")
    chosen = choose(rows)
    lines = ["| candidates | rounds | seen | novel | s/image | vs 8 x 16 |", "|---|---|---|---|---|---|"]
    base = seconds.get((8, 16))
    for r in sorted(rows, key=lambda r: r["seconds"]):
        ratio = f"{r['seconds'] / base:.2f}x" if base else "not timed"
        mark = " (chosen)" if r is chosen else ""
        lines.append(f"| {r['candidates']}{mark} | {r['rounds']} | {r['seen']['accuracy']:.3f} ± {se(r, 'seen'):.3f} | "
                     f"{r['novel']['accuracy']:.3f} ± {se(r, 'novel'):.3f} | {r['seconds']:.3f} | {ratio} |")
    lines.append(f"\nChosen: {chosen['candidates']} candidates x {chosen['rounds']} rounds, the fastest setting within "
                 "one standard error of the most accurate one on both splits.")
    write_json(args.out / "frontier.json", {"threads": args.threads, "repeats": args.repeats, "rows": rows,
                                            "chosen": {"candidates": chosen["candidates"], "rounds": chosen["rounds"]}})
    write_text(args.out / "frontier.md", "\n".join(lines) + "\n")
    plot(rows, args.out / "frontier.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
