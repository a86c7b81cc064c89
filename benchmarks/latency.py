"""Sampling latency: non-autoregressive (#3, fully NAR) against autoregressive decoding.

The paper's headline (Table 3): 16 rounds of #3 take 0.95 s per 256x256 image on a V100,
its autoregressive baseline of the same size 48 s. This script measures, for one model
size at a time and with random weights (latency does not depend on the weights):

    #3 (Algorithm 3) with T in {4, 8, 16, 32}; fully NAR (one pass, T = 1);
    autoregressive with a key/value cache (the fair baseline) and without one

at batch 1 and 16, in the same process, as the median of timed runs after a warm-up.
Beside each time it reports the peak memory, the analytic matrix-multiply FLOPs per image
and the model FLOPs utilisation (MFU) against the fp32 (or --dtype) matrix-multiply peak
measured right before that loop in the same process and threads, so a shared machine
cannot flatter or spoil the ratio between loops.

Every time is taken twice: wall clock, and the CPU time of the process. On a machine shared
with other jobs the wall clock measures the load as much as the code; the CPU time (and
MFU-CPU: model FLOPs per CPU second over the matmul's FLOPs per CPU second) is what the code
itself costs. With several threads on an oversubscribed CPU, OpenMP threads wait for each
other at every operator: use --threads 1 there.

A latency is the whole `Emage.generate` call: text encoder (once per caption), every
decoding round and the token sampling; not the VQGAN decoder, which is common to both.

    python benchmarks/latency.py --preset shapes
    python benchmarks/latency.py --preset paper --batch 1 --loops t16 ar-kv ar
    python benchmarks/latency.py --preset paper --device cuda --dtype bf16

Loops too long to time within --max-loop-seconds are extrapolated instead, and the table
says so: the rounds of a NAR loop all cost the same (same shapes), so
time(T) = text + T * round, with text and round (= time(T = 1) - text) both measured; the
uncached AR step over a prefix of S tokens costs a + b S + c S^2 (linear layers, then
attention), fitted by least squares to timed steps at four prefix lengths and summed over
S = 1..n.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/latency.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from clip_text import TextConfig  # noqa: E402
from emage import Emage, EmageConfig, EmageError, sample_tokens  # noqa: E402
from files import write_json  # noqa: E402

PRESETS = ("shapes", "mid", "paper")
LOOPS = ("t4", "t8", "t16", "t32", "full", "ar-kv", "ar")  # command-line names of the timed loops
LOOP_TITLES = {
    "t4": "#3, T=4",
    "t8": "#3, T=8",
    "t16": "#3, T=16",
    "t32": "#3, T=32",
    "full": "fully NAR, T=1",
    "ar-kv": "AR, KV cache",
    "ar": "AR, no cache",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CAPTION_TOKENS = 16  # start + 14 words + end: a typical MS-COCO caption; the rest is padding


class BenchmarkError(ValueError):
    """A user error on the command line: an unknown preset, no GPU for --device cuda, ..."""


def preset_config(name: str) -> EmageConfig:
    """shapes: the shapes world; mid: 256 tokens, 8 + 8 layers of width 512; paper: Section 4."""
    if name == "shapes":
        return EmageConfig.shapes()
    if name == "mid":  # a 256x256 image through an f16 VQGAN (16 x 16 tokens, 1024 codes)
        text = TextConfig(vocab_size=49408, context_length=77, width=512, heads=8, layers=8, embed_dim=512)
        return EmageConfig(text=text, codebook_size=1024, grid=(16, 16), width=512, layers=8, heads=8)
    if name == "paper":
        return EmageConfig.paper()
    raise BenchmarkError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------------------
# Analytic FLOPs (2 per multiply-add of every matrix product; element-wise work not counted)
# ----------------------------------------------------------------------------------------


def text_flops(c: EmageConfig, length: int) -> int:
    """encode_text over `length` tokens: the CLIP tower (causal attention: L(L+1)/2 pairs),
    the pooled projection, and every decoder layer's cross-attention keys/values."""
    t = c.text
    per_layer = 2 * length * 12 * t.width**2 + 4 * t.width * length * (length + 1) // 2  # in_proj, out_proj, MLP 4x; attention
    return t.layers * per_layer + 2 * t.width * t.embed_dim + c.layers * 2 * length * t.width * 2 * c.width


def decoder_flops(c: EmageConfig, queries: int, pairs: int, text_length: int, head_rows: int) -> int:
    """One decoder call over `queries` new positions that attend to `pairs` (query, key)
    pairs in self-attention and to `text_length` text tokens; logits at `head_rows` rows."""
    D, hidden = c.width, int(c.mlp_ratio * c.width)
    per_layer = 2 * queries * (6 * D * D + 2 * D * hidden)  # qkv 3D^2, proj, cross q, cross proj; MLP
    per_layer += 4 * D * pairs + 4 * D * queries * text_length  # self- and cross-attention: scores + weighted sums
    return c.layers * per_layer + 2 * head_rows * D * c.codebook_size


def loop_flops(c: EmageConfig, loop: str, text_length: int) -> int:
    """Model FLOPs of one image: encode_text plus the decoder calls of the loop.

    NAR round: n queries x n keys. AR with a cache, step i (0-based): one query over i + 1
    keys. AR without a cache, step i: the causal prefix of S = i + 1 tokens, S(S+1)/2 pairs,
    and (as `generate` runs it) logits at all S rows.
    """
    n, L = c.n, text_length
    total = text_flops(c, L)
    if loop == "ar-kv":
        return total + sum(decoder_flops(c, 1, i + 1, L, 1) for i in range(n))
    if loop == "ar":
        return total + sum(decoder_flops(c, S, S * (S + 1) // 2, L, S) for S in range(1, n + 1))
    return total + loop_steps(loop) * decoder_flops(c, n, n * n, L, n)


def loop_steps(loop: str) -> int:
    return 1 if loop == "full" else int(loop[1:])


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes in use now (CPU: resident set size)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the VmHWM high-water mark (Linux)
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_memory(device: torch.device) -> int:
    """Peak bytes since reset_peak_memory: allocated by torch (CUDA), resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def time_call(fn, device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of one call of fn."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_rates(device: torch.device, dtype: torch.dtype, runs: int = 5, size: int | None = None) -> tuple[float, float]:
    """FLOPs per wall-clock second and per CPU second of a large square matrix product
    (medians of `runs` after a warm-up): the machine's practical ceiling for the dtype with
    the current threads. size: the side, default 2048 on CPU, 8192 on GPU."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    walls, cpus = zip(*(time_call(lambda: a @ b, device) for _ in range(runs)))
    return 2 * size**3 / statistics.median(walls), 2 * size**3 / statistics.median(cpus)


def matmul_peak(device: torch.device, dtype: torch.dtype, runs: int = 5, size: int | None = None) -> float:
    """FLOP/s (wall clock) of a large square matrix product; see matmul_rates."""
    return matmul_rates(device, dtype, runs, size)[0]


def text_tokens(c: EmageConfig, batch: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Random captions of CAPTION_TOKENS tokens: start, words, end (the largest id), padding 0."""
    L = c.text.context_length
    k = min(CAPTION_TOKENS, L)
    tokens = torch.zeros(batch, L, dtype=torch.long)
    tokens[:, 1 : k - 1] = torch.randint(1, c.text.vocab_size - 2, (batch, k - 2), generator=generator)
    tokens[:, 0], tokens[:, k - 1] = c.text.vocab_size - 2, c.text.vocab_size - 1
    return tokens.to(device)


@dataclass
class Timing:
    """Median wall-clock and CPU seconds of one call (or their extrapolation)."""

    wall: float
    cpu: float

    @classmethod
    def median(cls, pairs) -> "Timing":
        walls, cpus = zip(*pairs)
        return cls(statistics.median(walls), statistics.median(cpus))

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: "Timing") -> "Timing":
        return Timing(max(self.wall - other.wall, 0.0), max(self.cpu - other.cpu, 0.0))

    def __rmul__(self, k: float) -> "Timing":
        return Timing(k * self.wall, k * self.cpu)


@dataclass
class Result:
    loop: str  # one of LOOPS
    batch: int
    seconds: float  # wall clock per call of the loop (the whole batch)
    cpu_seconds: float  # CPU time of the process per call (all threads)
    status: str  # "measured" or "extrapolated"
    flops_per_image: int
    peak_flops: float  # matrix-multiply FLOPs per wall-clock second, measured right before this loop
    peak_cpu_flops: float  # the same product's FLOPs per CPU second
    peak_memory_mb: float  # CPU: process resident set (weights included); CUDA: torch-allocated bytes
    runs: list = field(default_factory=list)  # (wall, cpu) of the timed runs, or the extrapolation inputs
    note: str = ""

    @property
    def mfu(self) -> float:
        """Model FLOPs per wall-clock second / the matmul's."""
        return self.flops_per_image * self.batch / self.seconds / self.peak_flops

    @property
    def mfu_cpu(self) -> float:
        """Model FLOPs per CPU second / the matmul's: the same ratio with the time this process
        was scheduled, which other jobs on a shared machine do not dilute."""
        return self.flops_per_image * self.batch / self.cpu_seconds / self.peak_cpu_flops

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(title=LOOP_TITLES[self.loop], seconds_per_image=self.seconds / self.batch, mfu=self.mfu, mfu_cpu=self.mfu_cpu)
        return d


class Bench:
    """Times the loops of one model at one batch size."""

    def __init__(self, model: Emage, batch: int, device: torch.device, dtype: torch.dtype, args):
        self.model, self.batch, self.device, self.dtype, self.args = model, batch, device, dtype, args
        self.c = model.config
        self.text = text_tokens(self.c, batch, device, torch.Generator().manual_seed(0))
        self.text_length = self.text.shape[1]

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(0)

    def measure(self, fn, runs: int) -> tuple[list, float]:
        """((wall, cpu) of `runs` calls, peak memory MB over them); the caller has warmed fn up."""
        reset_peak_memory(self.device)
        times = [time_call(fn, self.device) for _ in range(runs)]
        return times, peak_memory(self.device) / 2**20

    def generate(self, loop: str):
        algorithm = {"full": "full", "ar-kv": "ar", "ar": "ar"}.get(loop, 3)
        steps = 1 if loop in ("full", "ar-kv", "ar") else loop_steps(loop)
        use_cache = loop != "ar"
        return lambda: self.model.generate(self.text, steps=steps, algorithm=algorithm, generator=self.generator(), use_cache=use_cache)

    def result(self, loop, timing: Timing, status, peak_mb, runs, note="") -> Result:
        flops = loop_flops(self.c, loop, self.text_length)
        cpu = timing.cpu if self.device.type == "cpu" else float("nan")  # host time says nothing of a GPU's work
        return Result(loop, self.batch, timing.wall, cpu, status, flops, *self.peaks, peak_mb, runs, note)

    def measured(self, loop: str) -> Result:
        times, mb = self.measure(self.generate(loop), self.args.runs)
        return self.result(loop, Timing.median(times), "measured", mb, times)

    def run(self, loops: list[str]) -> list[Result]:
        args, out = self.args, []
        self.peaks = full_peaks = matmul_rates(self.device, self.dtype, size=args.peak_size)
        # Warm-up: one round (every NAR round has these shapes) and the text encoder.
        self.generate("full")()
        text_times, _ = self.measure(lambda: self.model.encode_text(self.text), args.runs)
        self.text_t = Timing.median(text_times)
        self.full_times, self.full_mb = self.measure(self.generate("full"), args.runs)
        self.round_t = Timing.median(self.full_times) - self.text_t
        for loop in loops:
            if loop != "full":
                self.peaks = matmul_rates(self.device, self.dtype, size=args.peak_size)
            if loop == "full":  # timed above, right after full_peaks
                self.peaks = full_peaks
                res = self.result(loop, Timing.median(self.full_times), "measured", self.full_mb, self.full_times)
            elif loop == "ar-kv":
                self.generate(loop)()  # warm-up
                res = self.measured(loop)
            elif loop == "ar":
                res = self.run_uncached_ar()
            else:
                res = self.run_nar(loop)
            out.append(res)
            print(format_row(res), flush=True)
        return out

    def run_nar(self, loop: str) -> Result:
        T = loop_steps(loop)
        predicted = self.text_t + T * self.round_t
        if predicted.wall <= self.args.max_loop_seconds:
            return self.measured(loop)
        note = (f"text {self.text_t.wall:.3f} s + {T} x round {self.round_t.wall:.3f} s "
                f"(round = T=1 loop - text, medians of {self.args.runs})")
        return self.result(loop, predicted, "extrapolated", self.full_mb, [self.text_t.__dict__, self.round_t.__dict__], note)

    def uncached_step(self, S: int):
        """One step of the uncached AR loop at prefix length S, as generate runs it: the causal
        decoder over the whole prefix, then sampling the last position."""
        m, B = self.model, self.text.shape[0]
        kv, mask = m.encode_text(self.text)
        x = torch.full((B, S), self.c.mask_id, dtype=torch.long, device=self.device)
        u = torch.rand(B, 1, device=self.device)

        def step():
            logits = m.round_logits(x, kv, mask, causal=True)
            sample_tokens(logits[:, -1:], u, 1.0)

        return step

    def run_uncached_ar(self) -> Result:
        n = self.c.n
        points = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
        steps, mb = [], 0.0
        for S in points:
            step = self.uncached_step(S)
            if S == points[0]:
                step()  # warm-up (the medians absorb a slow first call at a later length)
            times, peak = self.measure(step, self.args.runs)
            steps.append(Timing.median(times))
            mb = max(mb, peak)
        fits = [fit_quadratic(points, [getattr(t, k) for t in steps]) for k in ("wall", "cpu")]
        wall, cpu = (sum(a + b * S + c * S * S for S in range(1, n + 1)) for a, b, c in fits)
        predicted = self.text_t + Timing(wall, cpu)
        if predicted.wall <= self.args.max_loop_seconds:
            res = self.measured("ar")
            res.note = f"(the step fit predicted {predicted.wall:.3g} s)"
            return res
        note = (
            f"text {self.text_t.wall:.3f} s + sum over S=1..{n} of step(S) = a + bS + cS^2, least squares on "
            f"timed steps at S = {points} ({', '.join(f'{t.wall:.3g}' for t in steps)} s, medians of {self.args.runs})"
        )
        return self.result("ar", predicted, "extrapolated", mb, [t.__dict__ for t in steps], note)


def fit_quadratic(xs, ys) -> tuple[float, float, float]:
    """Least-squares a, b, c of y = a + b x + c x^2 (exact through three points)."""
    X = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
    Y = torch.tensor(ys, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(X, Y, driver="gelsd").solution[:, 0]
    return tuple(float(v) for v in coef)


# ----------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------

HEADER = (f"{'loop':<16} {'batch':>5} {'s/batch':>9} {'s/image':>9} {'CPU s':>9} {'GFLOP/img':>10} {'GFLOP/s':>8} "
          f"{'MFU':>6} {'MFU-CPU':>7} {'peak MB':>8}  how")


def format_row(r: Result) -> str:
    gflops = r.flops_per_image * r.batch / r.seconds / 1e9
    how = "measured" if r.status == "measured" else "extrapolated*"
    return (
        f"{LOOP_TITLES[r.loop]:<16} {r.batch:>5} {r.seconds:>9.3f} {r.seconds / r.batch:>9.4f} {r.cpu_seconds:>9.3f} "
        f"{r.flops_per_image / 1e9:>10.2f} {gflops:>8.1f} {r.mfu:>6.1%} {r.mfu_cpu:>7.1%} {r.peak_memory_mb:>8.0f}  {how}"
    )


def speedups(results: list[Result], attr: str = "seconds") -> dict:
    """Latency of each AR loop (and of one pass) divided by that of #3 with T=16, per batch size."""
    out = {}
    for batch in sorted({r.batch for r in results}):
        by = {r.loop: r for r in results if r.batch == batch}
        if "t16" in by:
            out[str(batch)] = {k: getattr(by[k], attr) / getattr(by["t16"], attr) for k in ("ar-kv", "ar", "full") if k in by}
    return out


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="shapes", choices=PRESETS, help="model size (mid: 256 tokens, 8+8 layers, width 512)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (captions per call)")
    p.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS, help="loops to time: t<T> = #3 with T rounds")
    p.add_argument("--runs", type=int, default=3, help="timed runs per loop after the warm-up; the median is reported")
    p.add_argument("--max-loop-seconds", type=float, default=120.0, help="loops predicted to take longer per run are extrapolated")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights and activations")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch.set_num_threads)")
    p.add_argument("--peak-size", type=int, default=None, help="side of the square matmul that measures the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block (NAR loops only pay off)")
    p.add_argument("--json", type=Path, default=None, help="output file (default benchmarks/results/latency_<preset>_<device>_<dtype>.json)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, print torch.profiler's operator table for one #3 T=16 call at the first batch size")
    return p.parse_args(argv)


def profile(bench: Bench, rows: int = 12) -> None:
    """Where one #3 T=16 call spends its time, by operator (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    run = bench.generate("t16")
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run()
    key = "cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.runs < 1:
            raise BenchmarkError(f"--runs must be at least 1, got {args.runs}")
        if any(b < 1 for b in args.batch):
            raise BenchmarkError(f"batch sizes must be positive, got {args.batch}")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("--device cuda but torch sees no GPU; run on a GPU machine or use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise BenchmarkError(f"unsupported device {args.device!r}; use cpu or cuda")
        config = preset_config(args.preset)
    except (BenchmarkError, EmageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = Emage(config).eval().to(device=device, dtype=dtype)
    if args.compile:
        for block in model.blocks:
            block.compile(dynamic=False)
    machine = machine_description(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"Emage preset {args.preset}: {params / 1e6:.1f}M parameters, n = {config.n} image tokens, "
          f"{config.layers} decoder layers of width {config.width}, codebook {config.codebook_size}")
    print(f"{machine}; torch {torch.__version__}; {args.threads} threads; {args.dtype}; runs = {args.runs} (median)")
    if args.profile:
        profile(Bench(model, args.batch[0], device, dtype, args))
        return 0
    print(HEADER, flush=True)
    results = []
    for batch in args.batch:
        bench = Bench(model, batch, device, dtype, args)
        results += bench.run(args.loops)
    peaks, cpu_peaks = [r.peak_flops for r in results], [r.peak_cpu_flops for r in results]
    print(f"matrix-multiply peak ({args.dtype}, measured before each loop): median {statistics.median(peaks) / 1e9:.1f} "
          f"GFLOP/s, range {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f}; per CPU second: median "
          f"{statistics.median(cpu_peaks) / 1e9:.1f}, range {min(cpu_peaks) / 1e9:.1f}-{max(cpu_peaks) / 1e9:.1f}")
    if any(r.status == "extrapolated" for r in results):
        print("* extrapolated (see the JSON notes): NAR = text + T x round; uncached AR = quadratic fit of timed steps")
    ups, cpu_ups = speedups(results), speedups(results, "cpu_seconds")
    for batch, u in ups.items():
        print(f"batch {batch}: speed-up of #3 (T=16), wall clock (CPU time): " + ", ".join(
            f"{v:.2f}x ({cpu_ups[batch][k]:.2f}x) over {LOOP_TITLES[k]}" for k, v in u.items() if k != "full"))
    path = args.json or ROOT / "benchmarks" / "results" / f"latency_{args.preset}_{device.type}_{args.dtype}.json"
    write_json(path, {
        "preset": args.preset,
        "config": config.to_dict(),
        "parameters": params,
        "machine": machine,
        "torch": torch.__version__,
        "device": str(device),
        "dtype": args.dtype,
        "threads": args.threads,
        "compile": args.compile,
        "runs": args.runs,
        "text_length": config.text.context_length,
        "matmul_peak_flops": {"median": statistics.median(peaks), "min": min(peaks), "max": max(peaks)},
        "matmul_peak_flops_per_cpu_second": {"median": statistics.median(cpu_peaks), "min": min(cpu_peaks), "max": max(cpu_peaks)},
        "results": [r.to_dict() for r in results],
        "speedup_of_t16": ups,
        "speedup_of_t16_cpu_time": cpu_ups,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
