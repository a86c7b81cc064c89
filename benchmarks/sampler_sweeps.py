"""Sampler settings swept on one trained checkpoint (the shipped demo by default).

Accuracy on the fixed evaluation captions (`eval_fid.shapes_accuracy`: all of them, 2 seeds
each, SHAPES.md scorer) and a batch-1 latency measured in the same process (median of 5 after
a warm-up).

    python benchmarks/sampler_sweeps.py table6      # Table 6 on the demo: T in {1, 2, 4, 8, 16, 32}
    python benchmarks/sampler_sweeps.py guidance    # beyond the paper: classifier-free guidance sweep
    python benchmarks/sampler_sweeps.py temperature # beyond the paper: token sampling temperature sweep

Results are printed as a Markdown table and written to benchmarks/results/<table>.json and .md.
The paper's tables with every model trained to its plateau are benchmarks/paper_experiments.py.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
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


def table6(args) -> list[dict]:
    return [{"T": steps, **evaluate(args.checkpoint, args, steps=steps, guidance_scale=args.guidance)}
            for steps in (1, 2, 4, 8, 16, 32)]


def guidance(args) -> list[dict]:
    return [{"guidance": scale, **evaluate(args.checkpoint, args, steps=args.eval_steps, guidance_scale=scale)}
            for scale in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)]


def temperature(args) -> list[dict]:
    return [{"temperature": t, **evaluate(args.checkpoint, args, steps=args.eval_steps, temperature=t,
                                          guidance_scale=args.guidance)}
            for t in (1.0, 0.85, 0.7, 0.5, 0.3)]


TABLES = {
    "table6": (table6, ["T", "seen", "novel", "all", "latency_s"]),
    "guidance": (guidance, ["guidance", "seen", "novel", "all", "latency_s"]),
    "temperature": (temperature, ["temperature", "seen", "novel", "all", "latency_s"]),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("table", choices=tuple(TABLES), help="which experiment")
    parser.add_argument("--checkpoint", type=Path, default=sample.DEMO_CHECKPOINT,
                        help="the #3 model evaluated by table6 and guidance")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="token sampling temperature at evaluation (the temperature table sweeps it)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale of Table 6 and the temperature table")
    parser.add_argument("--candidates", type=int, default=1,
                        help="candidates per image, the best kept by the self-score (sample.py draws 8)")
    parser.add_argument("--eval-steps", type=int, default=16, help="rounds T when evaluating iterative models")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per evaluation caption")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, columns = TABLES[args.table]
    command = "python benchmarks/sampler_sweeps.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report(args.table, run(args), columns, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
