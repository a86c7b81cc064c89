"""The paper's experiments on the shapes world, every model trained to its plateau.

    python benchmarks/paper_experiments.py all              # train what is missing, evaluate, write docs/paper/
    python benchmarks/paper_experiments.py status           # what is done, what is left, and an ETA
    python benchmarks/paper_experiments.py report           # rewrite docs/paper/ from the finished runs
    python benchmarks/paper_experiments.py latency          # time the evaluated models now (nothing else running)
    python benchmarks/paper_experiments.py latency --started --only v3-s0 --only ar-s0   # also runs still training
    python benchmarks/paper_experiments.py matched --curves A/curves.json --curves B/curves.json   # Table 3 over matched steps

Tables (docs/paper/tables.md, each also as JSON):
- Table 3: fully NAR, #1, #2, #3 and the autoregressive baseline, trained with the paper's losses
  only (Section 3.2-3.4: no object masking, no mirror loss). Every model of the suite reads the
  demo's colour x pattern codes, so each has extensions.py's colour-factored embedding and head
  (train.py sets `colours` from that tokenizer). Seen and novel accuracy at T = 16, one
  candidate, no re-ranking, with standard errors; latency per image at batch 1 and 16; the
  steps and CPU-seconds the plateau cost. #1, #3 and AR are trained with two seeds, and
  the gaps between them are compared seed by seed. The two seed-1 runs the rule stopped
  before the cap are also trained to it (v1-s1-cap, ar-s1-cap), and every Table 3 run is read
  over the same step windows (matched.json: where the rule stopped a run does not enter).
- Section 4.7: linear against cosine masking, in training and at inference.
- Table 6: T in {1, 2, 4, 8, 16, 32} for the plateau #3 and #1 models, timed at batch 1 and
  16; and #3 at each T against the cached autoregressive loop at batch 16: is any T as
  accurate and faster?
- Table 5: #1 and AR with the text tower initialised randomly, from a CLIP-style tower trained
  contrastively on shapes pairs, or from a BERT trained by masked-language modelling on shapes captions.
- Learning curves: accuracy against step and against training FLOPs (curves_step.png,
  curves_flops.png; Section 4.7's and Table 5's runs in curves_towers.png).
- What the plateau models draw: one image each for eight two-object captions (samples.png).

Every model of a table shares the tokenizer, model size, data, optimizer and stopping rule:
`train.py --until-plateau` evaluates all 240 evaluation captions every 500 steps and stops when
nothing in the second half of the run beats the best of the first half by one standard error
(train.plateaued), never before step 8,000 and at the latest at 16,000, at a constant learning
rate after the warm-up. Runs live in --runs and
resume where they stopped: run `all` again after an interruption and nothing finished is redone.
--jobs 2 trains two models side by side, one thread each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from files import write_json, write_text  # noqa: E402  (atomic)
import shapes  # noqa: E402
from benchmarks import paper_figures  # noqa: E402

RUNS = ROOT / "runs" / "paper"
OUT = ROOT / "docs" / "paper"
T6_ROUNDS = (1, 2, 4, 8, 16, 32)
FEWEST_STEPS, CAP_STEPS = 8000, 16000  # the stopping rule's bounds for every model of the suite
TEMPERATURE = 0.7  # sample.py's default, for every model and table


@dataclass(frozen=True)
class Model:
    """One training run of the suite."""

    name: str
    variant: str
    seed: int = 0
    sets: tuple[str, ...] = ()
    evals: tuple[tuple[str, dict], ...] = ()  # extra evaluations beyond T = 16 (label, generate options)
    tower: str | None = None  # Table 5: the text tower starts from "clip" or "bert" (TOWERS), None: random
    to_cap: bool = False  # trained to the 16,000-step cap whatever the stopping rule says (a fixed budget)

    @property
    def label(self) -> str:
        return {"full": "fully NAR", "ar": "autoregressive"}.get(self.variant, f"#{self.variant}")

    @property
    def run_label(self) -> str:
        """The label with what sets this run apart: "#3 cosine-trained, seed 0", "#1, clip tower, seed 0"."""
        return f"{self.label}{' cosine-trained' if 'cosine' in self.name else ''}" \
               f"{f', {self.tower} tower' if self.tower else ''}, seed {self.seed}{', to the cap' if self.to_cap else ''}"


TABLE6 = tuple((f"T={t}", {"steps": t}) for t in T6_ROUNDS if t != 16)
LINEAR_INFERENCE = (("linear inference", {"schedule": "linear"}),)
# In the order they are trained: Table 3's first seed, Section 4.7, Table 5, then the second seeds.
MODELS = (
    Model("full-s0", "full"),
    Model("v1-s0", "1", evals=TABLE6),
    Model("v2-s0", "2"),
    Model("v3-s0", "3", evals=TABLE6 + LINEAR_INFERENCE),
    Model("ar-s0", "ar"),
    Model("v3-cosine-s0", "3", sets=("train_schedule=cosine",), evals=LINEAR_INFERENCE),
    Model("v1-clip", "1", tower="clip"),
    Model("ar-clip", "ar", tower="clip"),
    Model("v1-bert", "1", tower="bert"),
    Model("ar-bert", "ar", tower="bert"),
    Model("v1-s1", "1", seed=1),
    Model("v3-s1", "3", seed=1),
    Model("ar-s1", "ar", seed=1),
    # The two seed-1 runs the rule stopped before the cap, trained again to it: did they stop too early?
    Model("v1-s1-cap", "1", seed=1, to_cap=True),
    Model("ar-s1-cap", "ar", seed=1, to_cap=True),
)
SMOKE_MODELS = ("full-s0", "v1-s0", "v3-s0", "ar-s0", "v1-clip", "v1-bert")
# Table 5's pretrained text towers, all of the Table-3 tower's size (3 layers of width 128, 24
# positions), pretrained on shapes captions: [command, steps, smoke steps].
TOWERS = {
    "clip": (["clip_image.py", "train-shapes", "--text-size", "emage", "--max-minutes", "60", "--threads", "1"], 1000, 3),
    "bert": (["bert_text.py", "train-shapes", "--threads", "1"], 2000, 3),
}


@dataclass
class Settings:
    """What every model of the suite shares."""

    runs: Path
    out: Path
    device: str = "cpu"
    smoke: bool = False
    jobs: int = 1
    seeds: int = 2
    captions: list[str] | None = None  # None: all evaluation captions
    latency_repeats: int = 7
    lock: threading.Lock = field(default_factory=threading.Lock)

    def train_flags(self, model: Model) -> list[str]:
        size = ["--set", "width=128", "--set", "layers=3", "--set", "mlp_ratio=2.0"]  # the demo's decoder
        if self.smoke:
            budget = ["--steps", "6", "--eval-every", "2", "--until-plateau", "2", "--eval-captions", "8",
                      "--shapes-examples", "96", "--shapes-cache", str(self.runs / "tokens")]
        else:
            fewest = CAP_STEPS if model.to_cap else FEWEST_STEPS
            budget = ["--steps", str(CAP_STEPS), "--eval-every", "500", "--until-plateau", str(fewest), "--eval-captions", "240",
                      "--shapes-examples", "60000", "--shapes-cache", str(ROOT / "data" / "shapes-patterns-60k")]
        return ["--recipe", "none", "--variant", model.variant, "--seed", str(model.seed), "--batch-size", "32",
                "--lr", "1e-3", "--lr-schedule", "constant", "--eval-temperature", str(TEMPERATURE), "--keep", "2",
                "--vqgan", str(ROOT / "checkpoints" / "shapes" / "patterns"), "--device", self.device,
                *(["--threads", "1"] if self.device == "cpu" else []), *size, *budget,
                *[x for kv in model.sets for x in ("--set", kv)],
                *(["--text-init", str(self.runs / "towers" / model.tower)] if model.tower else [])]


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def metrics(run: Path) -> list[dict]:
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else ():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, accuracy on all evaluation captions) of every training evaluation of a run."""
    return [(r["step"], r["accuracy_all"]) for r in metrics(run) if "accuracy_all" in r]


def trained(run: Path) -> int | None:
    """The final step of a finished training (plateau reached, not before the fewest steps the
    run was last given, or cap hit), else None."""
    records = metrics(run)
    fewest = read_json(run / "min_steps.json", 0) or 0
    ends = [r["step"] for r in records if r.get("plateau") and r["step"] >= fewest]
    latest = read_json(run / "latest.json", {}) or {}
    cap = read_json(run / "cap.json")
    if ends:
        return ends[-1]
    if cap is not None and latest.get("step") == cap:
        return cap
    return None


# ----------------------------------------------------------------------------------------
# Training and evaluating one model
# ----------------------------------------------------------------------------------------


CHILDREN: set[subprocess.Popen] = set()  # running children, told to stop (and save) on SIGTERM or SIGINT
STOPPING = threading.Event()


def stop_children(signum, frame) -> None:
    STOPPING.set()
    for proc in list(CHILDREN):
        proc.send_signal(signal.SIGTERM)  # train.py saves a checkpoint and exits


def run_child(command: list[str], log: Path, threads: int = 1) -> tuple[int, float, float]:
    """(exit code, wall seconds, CPU seconds) of one child process, its output appended to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(command)}   # {now()}\n")
        out.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        CHILDREN.add(proc)
        _, status, usage = os.wait4(proc.pid, 0)
        CHILDREN.discard(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_utime + usage.ru_stime


TOWER_LOCKS = {name: threading.Lock() for name in TOWERS}


def pretrain_tower(name: str, s: Settings) -> bool:
    """Table 5's text tower `name` in --runs/towers/NAME, pretrained once (tower.json records it)."""
    folder = s.runs / "towers" / name
    with TOWER_LOCKS[name]:
        if (folder.parent / f"{name}.json").is_file():
            return True
        command, steps, smoke_steps = TOWERS[name]
        folder.parent.mkdir(parents=True, exist_ok=True)
        started = now()
        code, wall, cpu = run_child([sys.executable, str(ROOT / command[0]), *command[1:], "--out", str(folder),
                                     "--steps", str(smoke_steps if s.smoke else steps), "--overwrite"],
                                    folder.parent / f"{name}.log")  # --overwrite: an interrupted attempt of ours
        if code != 0:
            print(f"[paper] tower {name}: pretraining failed ({code}); see {folder.parent / f'{name}.log'}", flush=True)
            return False
        report = (folder.parent / f"{name}.log").read_text().splitlines()[-1]
        write_json(folder.parent / f"{name}.json", {"started": started, "finished": now(), "wall_s": round(wall, 1),
                                                    "cpu_s": round(cpu, 1), "report": report})
        return True


def train_model(model: Model, s: Settings) -> bool:
    run = s.runs / model.name
    run.mkdir(parents=True, exist_ok=True)
    flags = s.train_flags(model)
    if trained(run) is not None:
        return True
    if model.tower and not pretrain_tower(model.tower, s):
        return False
    write_json(run / "cap.json", int(flags[flags.index("--steps") + 1]))
    resume = ["--resume"] if (run / "latest.json").is_file() else []
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--out", str(run), *resume]
    segments = [close_segment(x, run) for x in read_json(run / "segments.json", [])]
    segments.append({"started": now(), "started_at": time.time(), "command": shlex.join(command[1:])})
    write_json(run / "segments.json", segments)  # open until the child returns: a killed suite keeps its start
    code, wall, cpu = run_child(command, run / "train.log")
    segments[-1].update(finished=now(), wall_s=round(wall, 1), cpu_s=round(cpu, 1), exit=code)
    write_json(run / "segments.json", segments)
    if code != 0:
        print(f"[paper] {model.name}: train.py exited with {code}; see {run / 'train.log'}", flush=True)
    return trained(run) is not None


def evaluate_model(model: Model, s: Settings) -> None:
    """accuracy.json: T = 16 (and the model's extra evaluations), one candidate, no re-ranking."""
    run = s.runs / model.name
    done = read_json(run / "accuracy.json")
    if done is not None and done.get("step") == trained(run):
        return
    if done is not None:  # measured at an earlier stop of a run that has trained on since: kept beside
        os.replace(run / "accuracy.json", run / f"accuracy-step{done.get('step')}.json")
    run_subcommand("evaluate-one", model, s, "evaluation")


def run_subcommand(command: str, model: Model, s: Settings, what: str) -> None:
    """`paper_experiments.py COMMAND NAME` in a child process (its memory freed when it exits),
    its output in the run's evaluate.log; a failure is reported, not raised."""
    run = s.runs / model.name
    code, _, _ = run_child([sys.executable, str(Path(__file__).resolve()), command, model.name, "--runs", str(s.runs),
                            "--device", s.device, *(["--smoke"] if s.smoke else [])], run / "evaluate.log")
    if code != 0:
        print(f"[paper] {model.name}: {what} failed ({code}); see {run / 'evaluate.log'}", flush=True)


def evaluate_one(model: Model, s: Settings) -> None:
    """In its own process: the accuracies of one trained model, and its FLOPs per training step."""
    import eval_fid

    run = s.runs / model.name
    step = trained(run)
    checkpoint = run / f"step-{step:07d}"
    rows = {}
    for label, options in (("T=16", {"steps": 16}),) + model.evals:
        report = eval_fid.shapes_accuracy(checkpoint, captions=s.captions, seeds=s.seeds, progress=False,
                                          device=s.device, temperature=TEMPERATURE, **options)
        rows[label] = {split: {"accuracy": report[split]["accuracy"], "count": report[split]["count"]}
                       for split in ("seen", "novel", "all")}
    write_json(run / "accuracy.json", {"checkpoint": str(checkpoint.relative_to(ROOT)) if checkpoint.is_relative_to(ROOT)
                                       else str(checkpoint), "step": step, "evaluated": now(),
                                       "train_flops_per_step": train_flops(checkpoint), "rows": rows})


def grid_captions(s: Settings) -> list[str]:
    """The captions of the sample picture: the first four seen and four novel two-object
    evaluation captions (in the smoke run, from its few captions)."""
    captions = s.captions if s.captions is not None else shapes.eval_captions()
    pairs = [c for c in captions if len(shapes.parse(c).objects) == 2] or captions
    seen, novel = ([c for c in pairs if shapes.is_novel(c) == want] for want in (False, True))
    return seen[:4] + novel[:4]


def samples_one(model: Model, s: Settings) -> None:
    """In its own process: one image per grid caption from the plateau checkpoint (seed 0,
    T = 16, temperature 0.7), kept in the run with whether each passed."""
    import eval_fid

    run, step = s.runs / model.name, trained(s.runs / model.name)
    captions = grid_captions(s)
    report = eval_fid.shapes_accuracy(run / f"step-{step:07d}", captions=captions, seeds=1, progress=False,
                                      device=s.device, temperature=TEMPERATURE, save_dir=run / "grid")
    write_json(run / "grid.json", {"step": step, "captions": captions, "passed": [r["passed"] for r in report["results"]],
                                   "images": [f"s0_{k:04d}.png" for k in range(len(captions))]})


def sample_model(model: Model, s: Settings) -> None:
    """grid.json and grid/: the plateau model's sample row for docs/paper/samples.png, drawn once."""
    run = s.runs / model.name
    if (read_json(run / "grid.json") or {}).get("step") != trained(run):
        run_subcommand("samples-one", model, s, "drawing its samples")


def train_flops(checkpoint: Path) -> int:
    """Matrix-multiply FLOPs of one training step (forward and backward) at batch 32."""
    import torch

    import extensions
    from benchmarks.flops import counted_flops

    model, info = extensions.load_checkpoint(checkpoint)
    c = model.config
    text = torch.randint(0, c.text.vocab_size, (32, c.text.context_length))
    image = torch.randint(0, c.codebook_size, (32, c.n))
    model.train()
    return counted_flops(lambda: model.loss(text, image, info["variant"]).backward())


def current_accuracy(run: Path) -> dict | None:
    """accuracy.json, if it was measured at the step where the run now stands finished."""
    acc = read_json(run / "accuracy.json")
    return acc if acc is not None and acc.get("step") == trained(run) else None


# ----------------------------------------------------------------------------------------
# Latency: every finished model, interleaved, nothing else running
# ----------------------------------------------------------------------------------------


def measure_latency(models: list[Model], s: Settings) -> dict:
    """Median seconds per image, caption -> tokens -> pixels, at batch 1 and 16, models interleaved."""
    import torch

    import eval_fid

    torch.set_num_threads(1 if s.device == "cpu" else torch.get_num_threads())
    loaded = {m.name: eval_fid._load_generator(s.runs / m.name / f"step-{timed_step(s.runs / m.name):07d}", s.device)[:3]
              for m in models}
    cells = [(m.name, batch, t) for m in models for batch in (1, 16)
             for t in ((16,) + tuple(t for t in T6_ROUNDS if t != 16) * (m.name in ("v1-s0", "v3-s0")))]
    times = {cell: [] for cell in cells}
    caption = "a red circle to the left of a blue square"

    def once(name, batch, t):
        model, tokenizer, vq = loaded[name]
        text = tokenizer([caption] * batch, context_length=model.config.text.context_length).to(s.device)
        started = time.perf_counter()
        with torch.no_grad():
            tokens = model.generate(text, steps=t, temperature=TEMPERATURE)
            vq.decode(tokens.view(-1, *model.config.grid))
        if s.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / batch

    for cell in cells:
        once(*cell)  # warm-up
    for _ in range(s.latency_repeats):
        for cell in cells:
            times[cell].append(once(*cell))
    result = {}
    for (name, batch, t), values in times.items():
        result.setdefault(name, {})[f"b{batch}_T{t}"] = statistics.median(values)
    return {"measured": now(), "device": s.device, "repeats": s.latency_repeats, "seconds_per_image": result}


# ----------------------------------------------------------------------------------------
# Tables and curves
# ----------------------------------------------------------------------------------------


def cell(row: dict, split: str) -> str:
    p, n = row[split]["accuracy"], row[split]["count"]
    return f"{p:.3f} ± {shapes.standard_error(p, n):.3f}"


def level(flat: dict) -> str:
    """second_half() as a table cell: mean ± standard error (how many evaluations)."""
    return f"{flat['mean']:.3f} ± {flat['se']:.3f} ({flat['evaluations']})" if flat["se"] is not None else ""


def tidy(line: str) -> str:
    """A pretraining command's last line for the docs: floats to three places, no machine paths."""
    line = re.sub(r"^wrote \S+: ", "", line)
    return re.sub(r"\d+\.\d{4,}", lambda m: f"{float(m.group()):.3f}", line)


def markdown(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def close_segment(segment: dict, run: Path) -> dict:
    """A training segment whose suite was killed before it returned (no "finished"), closed at
    the last metrics.jsonl record it wrote: its time, and the CPU seconds train.py had used."""
    if "finished" in segment:
        return segment
    start = segment["started_at"]  # train_model writes it with every open segment
    last = next((r for r in reversed(metrics(run)) if r.get("time", 0) >= start), {"time": start})
    wall = last["time"] - start
    finished = datetime.fromtimestamp(last["time"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {**segment, "finished": finished, "wall_s": round(wall, 1),
            "cpu_s": round(last.get("cpu_s", wall), 1), "exit": "interrupted",
            "note": "closed at its last metrics record: the suite was stopped while it ran"}


def second_half(run: Path, step: int) -> dict:
    """The training evaluations after step / 2 up to `step`, the half the stopping rule judged
    flat: their mean accuracy (all 240 captions each) ± the standard error of that mean. It
    averages over checkpoints, which the one checkpoint of the table's own evaluation cannot."""
    values = [r["accuracy_all"] for r in metrics(run) if "accuracy_all" in r and step / 2 < r["step"] <= step]
    if not values:
        return {"mean": None, "se": None, "evaluations": 0}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "evaluations": len(values)}


def run_cost(run: Path) -> dict:
    segments = [close_segment(x, run) for x in read_json(run / "segments.json", [])]
    return {"cpu_s": sum(x["cpu_s"] for x in segments), "wall_s": sum(x["wall_s"] for x in segments),
            "ran": [f"{x['started']} - {x['finished']}" for x in segments]}


def report(s: Settings, models=MODELS) -> str:
    """docs/paper/: tables.md, one JSON per table, and the learning curves. A table none of whose
    runs is among `models` (as with --only) is left out; one whose runs are not finished says so."""
    latency = read_json(s.out / "latency.json", {}) or {}
    per_image = latency.get("seconds_per_image", {})
    state = {m.name: current_accuracy(s.runs / m.name) for m in models}
    names = set(state)
    sections, tables = [], {}

    def add(key: str, built: tuple[object, str]) -> None:
        tables[key] = built[0]
        sections.append(built[1])

    if any(in_table3(m) for m in models):
        add("table3", table3_section(models, state, per_image, s))
        matched = matched_steps({m.run_label: curve(s.runs / m.name) for m in models
                                 if in_table3(m) and state[m.name] is not None})
        add("matched", (matched, matched_section(matched)))
    if names & {"v1-s1", "v3-s1", "ar-s1"}:
        add("seeds", seeds_section(state, s))
    if names & {"v3-s0", "v3-cosine-s0"}:
        add("schedules", schedules_section(state))
    if names & {"v3-s0", "v1-s0"}:
        add("table6", table6_section(state, per_image))
        batch16 = against_cached_ar(state, per_image)
        add("batch16", (batch16, batch16_section(batch16)))
    if any(m.tower for m in models):
        add("table5", table5_section(state, s))

    ran = [[m.name, "; ".join(run_cost(s.runs / m.name)["ran"]) or "not started"] for m in models]
    sections.append("## When each part ran\n\n" + markdown(["run", "training segments"], ran) +
                    (f"\n\nLatency measured {latency['measured']} ({latency['repeats']} repeats, medians, "
                     f"interleaved, nothing else running)." if latency else ""))
    s.out.mkdir(parents=True, exist_ok=True)
    for name, value in tables.items():
        write_json(s.out / f"{name}.json", value)
    drawn = draw_curves(s, models)
    pictured = draw_samples(s, models)
    curves = [("Table 3's runs", ["curves_step.png", "curves_flops.png"]),
              ("Section 4.7's cosine-trained #3 and Table 5's pretrained towers, beside the seed-0 runs they are "
               "compared with", ["curves_towers.png"])]
    text = ("# The paper's experiments at their plateau\n\nWritten by `python benchmarks/paper_experiments.py all`; "
            "see docs/results.md for the reading of these numbers.\n\n" + "\n\n".join(sections) +
            "\n\n## Learning curves\n" +
            "".join(f"\n{what}:\n\n" + "\n\n".join(f"![{CURVE_PICTURES[f]}]({f})" for f in files if f in drawn) + "\n"
                    for what, files in curves if set(files) & drawn) +
            ("\n## What the plateau models draw\n\nOne image per caption (seed 0, T = 16, temperature 0.7); a green "
             "frame passed `shapes.score`, a red one failed.\n\n![samples of every plateau model](samples.png)\n"
             if pictured else ""))
    write_text(s.out / "tables.md", text)
    return text


CURVE_PICTURES = {"curves_step.png": "accuracy against step", "curves_flops.png": "accuracy against training FLOPs",
                  "curves_towers.png": "accuracy against step, Section 4.7 and Table 5"}


def table3_section(models, state: dict, per_image: dict, s: Settings) -> tuple[list, str]:
    rows, json_rows = [], []
    for m in models:
        if not in_table3(m):  # Table 5's and Section 4.7's own models
            continue
        acc, cost, lat = state[m.name], run_cost(s.runs / m.name), per_image.get(m.name, {})
        if acc is None:
            rows.append([m.label, seed_cell(m), "not finished", "", "", "", "", "", "", ""])
            continue
        r, flat = acc["rows"]["T=16"], second_half(s.runs / m.name, acc["step"])
        fmt = lambda key: f"{lat[key]:.4f}" if key in lat else "not measured"  # noqa: E731
        rows.append([m.label, seed_cell(m), cell(r, "seen"), cell(r, "novel"), cell(r, "all"), level(flat), fmt("b1_T16"),
                     fmt("b16_T16"), acc["step"], f"{cost['cpu_s'] / 60:.0f}"])
        json_rows.append({"model": m.label, "seed": m.seed, "to_cap": m.to_cap, **r, "second_half": flat,
                          "plateau_step": acc["step"], **cost, "latency_b1_s": lat.get("b1_T16"),
                          "latency_b16_s": lat.get("b16_T16"), "train_flops_per_step": acc["train_flops_per_step"]})
    return json_rows, ("## Table 3: the variants at their plateau\n\nT = 16 rounds (the autoregressive model: one "
                       "step per token), temperature 0.7, one candidate, no re-ranking; accuracy ± one standard error "
                       "over the (caption, seed) pairs of the last checkpoint; \"second half\": the mean of the "
                       "training evaluations after half the plateau step (240 captions each) ± the standard error of "
                       "that mean (how many), a level less tied to one checkpoint; latency in seconds per image, "
                       "caption to pixels.\n\n" +
                       markdown(["model", "seed", "seen", "novel", "all", "second half", "s/image, batch 1",
                                 "s/image, batch 16", "plateau step", "CPU-minutes"], rows))


def schedules_section(state: dict) -> tuple[list, str]:
    rows, json_rows = [], []
    for name, train in (("v3-s0", "linear"), ("v3-cosine-s0", "cosine")):
        acc = state.get(name)
        for label, inference in (("linear inference", "linear"), ("T=16", "cosine")):
            if acc is None or label not in acc["rows"]:
                rows.append([train, inference, "not finished", "", ""])
                continue
            r = acc["rows"][label]
            rows.append([train, inference, cell(r, "seen"), cell(r, "novel"), cell(r, "all")])
            json_rows.append({"train": train, "inference": inference, **r})
    return json_rows, ("## Section 4.7: linear and cosine masking\n\n#3, seed 0, T = 16.\n\n" +
                       markdown(["training", "inference", "seen", "novel", "all"], rows))


def table6_section(state: dict, per_image: dict) -> tuple[list, str]:
    rows, json_rows = [], []
    for name in ("v3-s0", "v1-s0"):
        acc, lat = state.get(name), per_image.get(name, {})
        for t in T6_ROUNDS:
            label = f"T={t}"
            if acc is None or label not in acc["rows"]:
                rows.append([name[:2].replace("v", "#"), t, "not finished", "", "", ""])
                continue
            r = acc["rows"][label]
            b1, b16 = lat.get(f"b1_T{t}"), lat.get(f"b16_T{t}")
            rows.append([f"#{name[1]}", t, cell(r, "seen"), cell(r, "novel"), cell(r, "all"),
                         f"{b1:.4f}" if b1 else "not measured", f"{b16:.4f}" if b16 else "not measured"])
            json_rows.append({"model": f"#{name[1]}", "T": t, **r, "latency_b1_s": b1, "latency_b16_s": b16})
    return json_rows, ("## Table 6: rounds T\n\nThe plateau models of Table 3, seed 0.\n\n" +
                       markdown(["model", "T", "seen", "novel", "all", "s/image, batch 1", "s/image, batch 16"], rows))


def table5_section(state: dict, s: Settings) -> tuple[dict, str]:
    rows, json_rows = [], []
    for tower, names in (("random", ("v1-s0", "ar-s0")), ("CLIP-style, contrastive", ("v1-clip", "ar-clip")),
                         ("BERT, masked-language modelling", ("v1-bert", "ar-bert"))):
        for name in names:
            acc, label = state.get(name), "#1" if name.startswith("v1") else "autoregressive"
            if acc is None:
                rows.append([tower, label, "not finished", "", "", "", "", ""])
                continue
            r, flat, cost = acc["rows"]["T=16"], second_half(s.runs / name, acc["step"]), run_cost(s.runs / name)
            rows.append([tower, label, cell(r, "seen"), cell(r, "novel"), cell(r, "all"), level(flat), acc["step"],
                         f"{cost['cpu_s'] / 60:.0f}"])
            json_rows.append({"tower": tower, "model": label, **r, "second_half": flat, "plateau_step": acc["step"],
                              **cost})
    towers = {name: read_json(s.runs / "towers" / f"{name}.json") for name in TOWERS}
    pretraining = "; ".join(f"{name}: {tidy(t['report'])}" for name, t in towers.items() if t) or "not pretrained yet"
    return {"rows": json_rows, "towers": towers}, (
        "## Table 5: the text tower\n\nThe same 3-layer, width-128 text tower, initialised three ways (the random "
        "row is Table 3's seed 0), then trained with the decoder. T = 16 for #1; \"second half\" as in Table 3.\n\n" +
        markdown(["text tower", "model", "seen", "novel", "all", "second half", "plateau step", "CPU-minutes"], rows) +
        f"\n\nPretraining (`clip_image.py train-shapes --text-size emage`, `bert_text.py train-shapes`): {pretraining}.")


def seed_cell(m: Model) -> str:
    return f"{m.seed}, to the cap" if m.to_cap else str(m.seed)


def seeds_section(state: dict, s: Settings) -> tuple[dict, str]:
    """Table 3's claims under both seeds: each seed's accuracy, and the gaps #3 - #1 and AR - #3
    seed by seed, in the table's own evaluation and in the second-half means."""
    runs = {"#1": "v1", "#3": "v3", "autoregressive": "ar"}
    result, rows = {}, []
    for label, prefix in runs.items():
        for seed in range(2):
            name = f"{prefix}-s{seed}"
            acc = state.get(name)
            if acc is not None:
                result.setdefault(label, {})[seed] = {"all": acc["rows"]["T=16"]["all"]["accuracy"],
                                                      "second_half": second_half(s.runs / name, acc["step"])["mean"]}
        per_seed = result.get(label, {})
        cells = [f"{per_seed[seed]['all']:.3f} / {per_seed[seed]['second_half']:.3f}" if seed in per_seed
                 else "not finished" for seed in range(2)]
        both = [per_seed[seed]["second_half"] for seed in range(2) if seed in per_seed]
        rows.append([label, *cells, f"{statistics.fmean(both):.3f}" if len(both) == 2 else ""])
    gaps = []
    for high, low in (("#3", "#1"), ("autoregressive", "#3")):
        for seed in range(2):
            a, b = result.get(high, {}).get(seed), result.get(low, {}).get(seed)
            if a and b:
                gaps.append(f"{high} - {low}, seed {seed}: {a['all'] - b['all']:+.3f} "
                            f"(second halves {a['second_half'] - b['second_half']:+.3f})")
    text = ("## Table 3 under two seeds\n\nAccuracy of all 480 pairs / mean of the second half's training "
            "evaluations, per seed.\n\n" + markdown(["model", "seed 0", "seed 1", "mean of the second halves"], rows) +
            ("\n\n" + "; ".join(gaps) + "." if gaps else ""))
    return result, text


# Step windows every Table 3 run is read over: from half the fewest steps to them, then the two
# quarters of the cap beyond. A run that stopped before a window's end leaves that cell empty.
WINDOWS = ((4500, 8000), (8500, 12000), (12500, 16000))


def matched_steps(curves: dict[str, list]) -> dict:
    """Each run's training evaluations averaged over the same WINDOWS of steps: {label: [mean,
    standard error of that mean, how many] or None per window}. Unlike a run's last checkpoint or
    its second half, the steps compared do not depend on where the stopping rule ended it."""
    result = {}
    for label, points in curves.items():
        last, cells = max(step for step, _ in points), []
        for low, high in WINDOWS:
            values = [a for step, a in points if low <= step <= high]
            covered = last >= high and len(values) > 1
            cells.append([statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)), len(values)]
                         if covered else None)
        result[label] = cells
    return result


def matched_section(result: dict) -> str:
    rows = [[label, *(f"{c[0]:.3f} ± {c[1]:.3f} ({c[2]})" if c else "" for c in cells)] for label, cells in result.items()]
    return ("## Table 3 over matched steps\n\nThe training evaluations (240 captions, one image each, T = 16) "
            "averaged over the same steps for every run, ± the standard error of that mean (how many): the steps "
            "compared do not depend on where the stopping rule ended a run. Empty: the run stopped before the "
            "window's end.\n\n" + markdown(["run", *(f"steps {a:,}-{b:,}" for a, b in WINDOWS)], rows))


def matched_from_files(paths: list[Path], s: Settings) -> str:
    """`matched`: the matched-steps table of Table 3's runs from curves.json files that reports
    wrote (for example one of the whole suite and one of runs added later with --only and --out),
    into matched.json and matched.md, and their curves together in matched_curves.png."""
    by_label = {m.run_label: m for m in MODELS if in_table3(m)}
    table3 = list(by_label)
    curves = {}
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict):
            raise SystemExit(f"error: {path} is not a curves.json that `report` wrote; pass one with --curves")
        curves.update({label: [tuple(x) for x in run["step_accuracy"]] for label, run in data.items() if label in table3})
    result = matched_steps({label: curves[label] for label in table3 if label in curves})
    text = (matched_section(result) + "\n\nFrom " + ", ".join(str(p) for p in paths) +
            ".\n\n![the curves of these runs](matched_curves.png)\n")
    s.out.mkdir(parents=True, exist_ok=True)
    write_json(s.out / "matched.json", result)
    write_text(s.out / "matched.md", text)
    paper_figures.line_plot({plot_key(by_label[label]): curves[label] for label in result}, "training step",
                            s.out / "matched_curves.png")
    return text


def against_cached_ar(state: dict, per_image: dict) -> dict:
    """Does #3 at some T beat the cached autoregressive loop at batch 16 with at least its accuracy?

    Compares every T of Table 6 with the AR model of seed 0 on all pairs: the accuracy
    difference, whether it is within one standard error of the two, and the time ratio.
    """
    ar, v3 = state.get("ar-s0"), state.get("v3-s0")
    ar_time = per_image.get("ar-s0", {}).get("b16_T16")
    if ar is None or v3 is None or ar_time is None:
        return {"rows": [], "ar": None}
    a = ar["rows"]["T=16"]["all"]
    rows = []
    for t in T6_ROUNDS:
        r, seconds = v3["rows"].get(f"T={t}", {}).get("all"), per_image.get("v3-s0", {}).get(f"b16_T{t}")
        if r is None or seconds is None:
            continue
        gap = r["accuracy"] - a["accuracy"]
        noise = math.hypot(shapes.standard_error(r["accuracy"], r["count"]), shapes.standard_error(a["accuracy"], a["count"]))
        rows.append({"T": t, "accuracy": r["accuracy"], "minus_ar": gap, "se": noise,
                     "at_least_ar": gap >= -noise, "seconds": seconds, "speedup": ar_time / seconds})
    return {"rows": rows, "ar": {"accuracy": a["accuracy"], "count": a["count"], "seconds": ar_time}}


def batch16_section(result: dict) -> str:
    title = "## #3 against the cached autoregressive loop at batch 16\n\n"
    if not result["rows"]:
        return title + "Needs the plateau #3 and AR models of seed 0 and their latencies."
    ar = result["ar"]
    rows = [[r["T"], f"{r['accuracy']:.3f}", f"{r['minus_ar']:+.3f} ± {r['se']:.3f}", "yes" if r["at_least_ar"] else "no",
             f"{r['seconds']:.4f}", f"{r['speedup']:.2f}x"] for r in result["rows"]]
    wins = [r for r in result["rows"] if r["at_least_ar"] and r["speedup"] > 1]
    verdict = (f"#3 beats the cached loop at equal accuracy with T = {', '.join(str(r['T']) for r in wins)}."
               if wins else "No T of #3 is both as accurate as the cached loop (within one standard error) and faster.")
    return (title + f"All 480 pairs; the cached AR loop passes {ar['accuracy']:.3f} at {ar['seconds']:.4f} s per image. "
            "Speed-up > 1 means #3 is faster. " + verdict + "\n\n" +
            markdown(["T", "#3 accuracy", "minus AR ± SE", "as accurate", "s/image, batch 16", "speed-up"], rows))


def draw_curves(s: Settings, models=MODELS) -> set[str]:
    """Accuracy of the training evaluations: curves.json; Table 3's runs against step and against
    training FLOPs; Section 4.7's and Table 5's runs against step beside their seed-0 references
    (one plot of thirteen lines would hide them all). Returns the pictures drawn: those with a
    run to show."""
    series_step, series_flops, data = {}, {}, {}
    for m in models:
        points = curve(s.runs / m.name)
        if not points:
            continue
        flops = (read_json(s.runs / m.name / "accuracy.json") or {}).get("train_flops_per_step")
        key = plot_key(m)
        series_step[key] = points
        if flops:
            series_flops[key] = [(x * flops, y) for x, y in points]
        data[m.run_label] = {"step_accuracy": points, "train_flops_per_step": flops}
    write_json(s.out / "curves.json", data)
    by_label = {m.run_label: m for m in models}
    table3 = lambda series: {k: v for k, v in series.items() if in_table3(by_label[k[0]])}  # noqa: E731
    others = {k: v for k, v in series_step.items() if not in_table3(by_label[k[0]])
              or (by_label[k[0]].seed == 0 and by_label[k[0]].variant in ("1", "3", "ar"))}
    pictures = {"curves_step.png": (table3(series_step), "training step"),
                "curves_flops.png": (table3(series_flops), "training FLOPs"),
                "curves_towers.png": (others if any(not in_table3(by_label[k[0]]) for k in others) else {}, "training step")}
    for name, (series, axis) in pictures.items():
        if series:
            paper_figures.line_plot(series, axis, s.out / name)
    return {name for name, (series, _) in pictures.items() if series}


def draw_samples(s: Settings, models=MODELS) -> bool:
    """samples.png from the sample row (grid.json) of every finished model; False (and no
    file) while no model has its row."""
    from PIL import Image

    rows, captions = [], []
    for m in models:
        grid = read_json(s.runs / m.name / "grid.json")
        if grid is None or grid.get("step") != trained(s.runs / m.name):
            continue
        images = [Image.open(s.runs / m.name / "grid" / name).convert("RGB") for name in grid["images"]]
        rows.append((m.run_label, images, grid["passed"]))
        captions = grid["captions"]
    if rows:
        paper_figures.sample_grid(rows, captions, s.out / "samples.png")
    return bool(rows)


def run_kind(m: Model) -> str:
    """What sets a run apart within its variant, for its curve's style (paper_figures.STYLES)."""
    return m.tower or ("cosine" if "cosine" in m.name else "to the cap" if m.to_cap else f"seed {m.seed}")


def plot_key(m: Model) -> tuple:
    """A run's line in paper_figures.line_plot: (label, colour, dash)."""
    return (m.run_label, *paper_figures.curve_style(m.variant, run_kind(m)))


def in_table3(m: Model) -> bool:
    return not m.tower and "cosine" not in m.name


# ----------------------------------------------------------------------------------------
# The schedule: ETA, status, all
# ----------------------------------------------------------------------------------------


def expected_seconds(model: Model, s: Settings) -> float:
    """Seconds left for one model: its remaining expected steps at its measured (or a typical) speed."""
    run = s.runs / model.name
    if trained(run) is not None:
        return 0.0 if (run / "accuracy.json").is_file() else 120.0
    flags = s.train_flags(model)
    cap, fewest = (int(flags[flags.index(flag) + 1]) for flag in ("--steps", "--until-plateau"))
    done = [x for x in (trained(s.runs / m.name) for m in MODELS) if x]
    # the median stop so far, else twice the fewest steps (the rule compares the two halves of a run)
    expected = min(cap, max(fewest, statistics.median(done) if done else 2 * fewest))
    records = metrics(run)
    speeds = [r["steps_per_s"] for r in records if "steps_per_s" in r][-5:]
    speed = statistics.mean(speeds) if speeds else (3.5 if model.variant in ("2", "3") else 4.5)
    step = max([r["step"] for r in records], default=0)
    return max(0.0, expected - step) / speed * 1.15 + 120.0  # evaluations, and the final one


def eta(models, s: Settings) -> str:
    seconds = sum(expected_seconds(m, s) for m in models) / max(1, s.jobs)
    return f"{seconds / 60:.0f} min"


def status(models, s: Settings) -> None:
    for m in models:
        run = s.runs / m.name
        step = trained(run)
        records = metrics(run)
        last = max([r["step"] for r in records], default=0)
        accuracy = [r["accuracy_all"] for r in records if "accuracy_all" in r]
        state = ("evaluated" if (run / "accuracy.json").is_file() else "trained") if step else \
            (f"at step {last}" if last else "not started")
        print(f"{m.name:14s} {state:14s} best accuracy so far {max(accuracy, default=0):.3f}")
    print(f"ETA {eta(models, s)} with --jobs {s.jobs}")


def run_all(models, s: Settings) -> None:
    print(f"[paper] {len(models)} models in {s.runs}; ETA {eta(models, s)} with --jobs {s.jobs}", flush=True)

    def one(m: Model) -> None:
        if STOPPING.is_set():
            return
        if trained(s.runs / m.name) is None:
            print(f"[paper] {now()} {m.name}: training", flush=True)
        finished = train_model(m, s) and not STOPPING.is_set()
        if finished:
            evaluate_model(m, s)
            sample_model(m, s)
        with s.lock:
            report(s, models)
            state = "done" if finished else "stopped" if STOPPING.is_set() else "not finished (see its train.log)"
            print(f"[paper] {now()} {m.name}: {state}; ETA for the rest {eta(models, s)}", flush=True)

    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    with ThreadPoolExecutor(max_workers=s.jobs) as pool:
        list(pool.map(one, models))
    if STOPPING.is_set():
        print(f"[paper] {now()} stopped; the trainings saved their steps. Run `all` again to continue.", flush=True)
        report(s, models)
        return
    old = read_json(s.out / "latency.json", {}) or {}
    if sorted(old.get("seconds_per_image", {})) != sorted(m.name for m in finished_models(models, s)):
        time_finished(models, s)
    print(report(s, models))


def finished_models(models, s: Settings) -> list[Model]:
    return [m for m in models if current_accuracy(s.runs / m.name) is not None]


def timed_step(run: Path) -> int:
    """The checkpoint to time: the final one, or for a run still training its latest (the time
    of a sampling loop does not depend on the weights)."""
    return trained(run) or (read_json(run / "latest.json", {}) or {})["step"]


def time_finished(models, s: Settings, started: bool = False) -> None:
    """latency.json for every evaluated model (with started=True, every model with a checkpoint),
    interleaved; `all` redoes it when more have finished."""
    finished = [m for m in models if (s.runs / m.name / "latest.json").is_file()] if started else finished_models(models, s)
    if not finished:
        print("[paper] no model is evaluated yet: nothing to time", flush=True)
        return
    print(f"[paper] {now()} latency of {len(finished)} models, interleaved", flush=True)
    write_json(s.out / "latency.json", measure_latency(finished, s))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=("all", "status", "report", "latency", "matched", "evaluate-one", "samples-one"))
    parser.add_argument("name", nargs="?", help="evaluate-one, samples-one: the model's name (used by `all`)")
    parser.add_argument("--runs", type=Path, default=None, help=f"where the training runs live (default {RUNS})")
    parser.add_argument("--out", type=Path, default=None, help=f"where the tables and curves go (default {OUT})")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every model trains, is evaluated and timed")
    parser.add_argument("--jobs", type=int, default=2, help="models trained side by side (one thread each on a CPU)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only these models (repeatable): " + ", ".join(m.name for m in MODELS))
    parser.add_argument("--started", action="store_true",
                        help="latency: also time models still training, at their latest checkpoint")
    parser.add_argument("--curves", action="append", type=Path, default=[], metavar="CURVES_JSON",
                        help="matched: the curves.json files of earlier reports to read (repeatable; default the "
                             "--out folder's)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of six models on 96 examples and 8 captions: checks the machinery, not the paper")
    args = parser.parse_args(argv)
    if not 1 <= args.jobs <= 64:
        parser.error("--jobs must be between 1 and 64")
    runs = args.runs or (RUNS.with_name("paper-smoke") if args.smoke else RUNS)
    out = args.out or (runs / "docs" if args.smoke else OUT)
    s = Settings(runs=runs.resolve(), out=out.resolve(), device=args.device, smoke=args.smoke, jobs=args.jobs)
    models = [m for m in MODELS if not args.smoke or m.name in SMOKE_MODELS]
    unknown = set(args.only) - {m.name for m in models}
    if unknown:
        parser.error(f"unknown --only {sorted(unknown)}; choose from {[m.name for m in models]}")
    models = [m for m in models if not args.only or m.name in args.only]
    if args.smoke:
        s.seeds, s.latency_repeats, s.captions = 1, 2, shapes.eval_captions()[::30]
    for m in models:  # the suite's fewest steps hold for every run, also one stopped under an earlier rule
        if (s.runs / m.name).is_dir():
            flags = s.train_flags(m)
            write_json(s.runs / m.name / "min_steps.json", int(flags[flags.index("--until-plateau") + 1]))
    if args.command in ("evaluate-one", "samples-one"):
        one = next((m for m in MODELS if m.name == args.name), None)
        if one is None or trained(s.runs / one.name) is None:
            parser.error(f"{args.command} needs the name of a finished model, got {args.name!r}")
        (evaluate_one if args.command == "evaluate-one" else samples_one)(one, s)
    elif args.command == "status":
        status(models, s)
    elif args.command == "report":
        print(report(s, models))
    elif args.command == "matched":
        print(matched_from_files(args.curves or [s.out / "curves.json"], s))
    elif args.command == "latency":  # meant for a machine with nothing else running
        time_finished(models, s, started=args.started)
        print(report(s, models))
    else:
        run_all(models, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
