"""The paper's experiments, reproduced at small scale on the shapes world.

Each table trains (where needed) and evaluates with the project's own commands:
`train.py` for training, `eval_fid.shapes_accuracy` for accuracy on the fixed
evaluation captions (all of them, 2 seeds each, SHAPES.md scorer), and a
batch-1 latency measured in the same process (median of 5 after a warm-up).

    python benchmarks/paper_experiments.py table3      # Table 3: full NAR, #1, #2, #3, AR
    python benchmarks/paper_experiments.py table6      # Table 6: #3 with T in {1, 2, 4, 8, 16, 32}
    python benchmarks/paper_experiments.py schedules   # Section 4.7 / Fig. 4: linear vs cosine, train and inference
    python benchmarks/paper_experiments.py guidance    # beyond the paper: classifier-free guidance sweep
    python benchmarks/paper_experiments.py temperature # beyond the paper: token sampling temperature sweep

Models of one table share model size, batch and number of steps. Training runs
live in --runs (resumable: a finished run is reused); results are printed as a
Markdown table and written to benchmarks/results/<table>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import eval_fid  # noqa: E402
import sample  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LATENCY_CAPTION = "a red circle to the left of a blue square"


def train_run(out: Path, variant: str, steps: int, extra: list[str], threads: int) -> Path:
    """Train one model with train.py unless `out` already holds its final checkpoint."""
    final = out / f"step-{steps:07d}"
    if not final.is_dir():
        resume = ["--resume"] if (out / "latest.json").is_file() else []
        command = [sys.executable, str(ROOT / "train.py"), "--variant", variant, "--steps", str(steps),
                   "--out", str(out), "--threads", str(threads), *resume, *extra]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.0f}\n")
    return final


def latency(checkpoint: Path, candidates: int = 1, **options) -> float:
    """Median seconds to sample one image (caption -> tokens -> pixels) at batch 1.

    With candidates > 1 the image is the best of that many by the self-score, as sample.py keeps.
    """
    pipe = sample.Pipeline.load(checkpoint, "cpu")
    times = []
    for i in range(6):  # the first run warms up
        started = time.perf_counter()
        pipe.decode(pipe.best_of(LATENCY_CAPTION, candidates, seed=i, **options))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def evaluate(checkpoint: Path, args, **options) -> dict:
    """Accuracy over every evaluation caption (args.seeds each) at args.temperature, and the latency."""
    options.setdefault("temperature", args.temperature)
    report = eval_fid.shapes_accuracy(checkpoint, seeds=args.seeds, progress=False, candidates=args.candidates,
                                      **options)
    steps = options.get("steps", 16)
    timing = {k: v for k, v in options.items() if k in ("steps", "schedule", "algorithm", "guidance_scale", "temperature")}
    timing.setdefault("steps", steps)
    return {"seen": report["seen"]["accuracy"], "novel": report["novel"]["accuracy"],
            "all": report["all"]["accuracy"], "count": report["all"]["count"],
            "latency_s": latency(checkpoint, candidates=args.candidates, **timing)}


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict], columns: list[str], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, columns)
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(f"`{command}`\n\n{table}\n")
    print(table)


def common_training(args) -> list[str]:
    lr = ["--lr", str(args.lr)] if args.lr is not None else []
    return ["--batch-size", str(args.batch_size), "--eval-every", str(args.steps), *lr] + \
        [x for kv in args.set for x in ("--set", kv)] + shlex.split(args.train_args)


def table3(args) -> list[dict]:
    rows = []
    for variant in ("full", "1", "2", "3", "ar"):
        checkpoint = train_run(args.runs / f"table3-v{variant}", variant, args.steps, common_training(args), args.threads)
        steps = 1 if variant == "full" else args.eval_steps
        result = evaluate(checkpoint, args, steps=steps)
        rows.append({"model": {"full": "fully NAR", "ar": "autoregressive"}.get(variant, f"#{variant}"),
                     "rounds": steps if variant != "ar" else "n (one per token)", **result})
    return rows


def table6(args) -> list[dict]:
    return [{"T": steps, **evaluate(args.checkpoint, args, steps=steps, guidance_scale=args.guidance)}
            for steps in (1, 2, 4, 8, 16, 32)]


def schedules(args) -> list[dict]:
    rows = []
    for train_schedule in ("linear", "cosine"):
        extra = common_training(args) + ["--set", f"train_schedule={train_schedule}"]
        # Linear is the default schedule: the #3 run of Table 3 is the same command, so it is reused.
        name = "table3-v3" if train_schedule == "linear" else f"schedule-{train_schedule}"
        checkpoint = train_run(args.runs / name, "3", args.steps, extra, args.threads)
        for inference in ("linear", "cosine"):
            rows.append({"train": train_schedule, "inference": inference,
                         **evaluate(checkpoint, args, steps=args.eval_steps, schedule=inference)})
    return rows


def guidance(args) -> list[dict]:
    return [{"guidance": scale, **evaluate(args.checkpoint, args, steps=args.eval_steps, guidance_scale=scale)}
            for scale in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)]


def temperature(args) -> list[dict]:
    return [{"temperature": t, **evaluate(args.checkpoint, args, steps=args.eval_steps, temperature=t,
                                          guidance_scale=args.guidance)}
            for t in (1.0, 0.85, 0.7, 0.5, 0.3)]


TABLES = {
    "table3": (table3, ["model", "rounds", "seen", "novel", "all", "latency_s"]),
    "table6": (table6, ["T", "seen", "novel", "all", "latency_s"]),
    "schedules": (schedules, ["train", "inference", "seen", "novel", "all", "latency_s"]),
    "guidance": (guidance, ["guidance", "seen", "novel", "all", "latency_s"]),
    "temperature": (temperature, ["temperature", "seen", "novel", "all", "latency_s"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("table", choices=tuple(TABLES), help="which experiment")
    parser.add_argument("--checkpoint", type=Path, default=sample.DEMO_CHECKPOINT,
                        help="the #3 model evaluated by table6 and guidance")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper", help="where training runs are kept")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every model of a table")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch of every model of a table")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of every model (default: train.py's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="EmageConfig override passed to train.py for every model")
    parser.add_argument("--train-args", default="",
                        help="further train.py flags for every model, in one quoted string (data, tokenizer, cache)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="token sampling temperature at evaluation (the temperature table sweeps it)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale of Table 6 and the temperature table")
    parser.add_argument("--candidates", type=int, default=1,
                        help="candidates per image, the best kept by the self-score (sample.py draws 8)")
    parser.add_argument("--eval-steps", type=int, default=16, help="rounds T when evaluating iterative models")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per evaluation caption")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, columns = TABLES[args.table]
    command = "python benchmarks/paper_experiments.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report(args.table, run(args), columns, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
