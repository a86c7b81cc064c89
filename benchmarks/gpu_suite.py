"""One command for a machine with an NVIDIA GPU: every GPU number the project reports, in one JSON.

Rows (each one fails soft: a missing provider, too little time or an exception is a row
{"name", "status": "skipped" | "error", "why"}, and the suite goes on):

    sample_<backend>_b<B>   the paper preset (EmageConfig.paper(), Algorithm 3, T = 16) from
                            caption tokens to image tokens, batch 1 and 16, seconds per image:
                              eager_fp32     PyTorch eager, fp32 (TF32 off)
                              bf16_autocast  the same under torch.autocast(bfloat16)
                              compile        the decoder pass of each round under
                                             torch.compile(mode="reduce-overhead") (CUDA graphs)
                              onnx_cuda      the graphs of export_onnx.export_graphs on ONNX Runtime's
                                             CUDA execution provider, I/O binding (noise, state and text
                                             keys/values never leave the GPU);
                                             token parity against eager with the same noise
    ar_kv_b<B>              the autoregressive baseline at the same size, key/value cache
    ar_uncached_b<B>        without the cache: estimated (a + bS + cS^2 fitted to timed uncached
                            steps at four prefix lengths S, summed over S = 1..n; the row says so)
    train_step_bf16         one training step of #3 (forward, backward, AdamW) under bf16
                            autocast: FLOPs by torch.utils.flop_counter.FlopCounterMode, MFU against
                            the GPU's dense bf16 peak from a table of known GPUs (else a measured
                            bf16 matrix-multiply peak)
    ddp_two_process_step    the same step in two processes under DistributedDataParallel (NCCL),
                            when two GPUs are present

Parity: with random weights over 8192 codes, a sampled token falls within float rounding of a
boundary of the inverse CDF in ~0.2 % of positions per round (export_onnx.py), and Algorithm 3
carries such a difference into every later round; so the check runs the loop greedily
(temperature 0, same Gumbel noise on the confidences), where the two runtimes must agree,
and "parity" is true when at least 99.9 % of those tokens agree. The sampled (temperature 1)
agreement is reported beside it.

    python benchmarks/gpu_suite.py                           # on the GPU machine, <= 8 minutes
    python benchmarks/gpu_suite.py --dry-run --out /tmp/s.json   # CPU, tiny config, same rows

--dry-run runs every row on the CPU with a tiny config (2 layers, 4 x 4 tokens) in well under a
minute, so CI can smoke-test the suite: torch.compile uses the "eager" backend there (no code
generation), ONNX Runtime its CPU provider, the DDP step two processes over gloo.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_suite.py` puts benchmarks/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

import clip_text  # noqa: E402
import emage  # noqa: E402
import files  # noqa: E402
from benchmarks.flops import counted_flops  # noqa: E402
import vqgan  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_suite.json"
STEPS = 16
PARITY_MIN = 0.999  # fraction of greedy tokens that must agree between eager and ONNX Runtime
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
PEAKS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("V100", 125e12),  # V100 has no bf16: its fp16 tensor-core peak
    ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


class Budget:
    """Wall-clock deadline for the whole suite: rows that would start past it are skipped."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# ----------------------------------------------------------------------------------------
# Configs and inputs
# ----------------------------------------------------------------------------------------


def configs(dry_run: bool):
    """(EmageConfig, VQGANConfig, sampling batches, training batch)."""
    if dry_run:
        text = clip_text.TextConfig(vocab_size=512, context_length=16, width=32, heads=2, layers=1, embed_dim=32)
        config = dataclasses.replace(emage.EmageConfig.shapes(codebook_size=64, grid=(4, 4), width=32, layers=2, heads=2),
                                     text=text)
        vq = vqgan.VQGANConfig(resolution=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(),
                               z_channels=32, embed_dim=32, n_embed=64, quantizer="vector")
        return config, vq, (1, 2), 2
    return emage.EmageConfig.paper(), vqgan.VQGANConfig.gumbel_f8_8192(), (1, 16), 32


def captions(config, batch: int, device, seed: int = 0) -> torch.Tensor:
    """[start, 14 random ids, end, 0 ...]: a typical caption's length, padded to the context."""
    g = torch.Generator().manual_seed(seed)
    V, L = config.text.vocab_size, config.text.context_length
    k = min(16, L)
    tokens = torch.zeros(batch, L, dtype=torch.long)
    tokens[:, 1 : k - 1] = torch.randint(1, V - 2, (batch, k - 2), generator=g)
    tokens[:, 0], tokens[:, k - 1] = V - 2, V - 1
    return tokens.to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of fn after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def latency_row(name: str, batch: int, runs: list[float], **extra) -> dict:
    med = statistics.median(runs)
    return {"name": name, "status": "measured", "batch": batch, "steps": STEPS, "seconds_per_call": med,
            "seconds_per_image": med / batch, "runs": runs, **extra}


# ----------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------


def eager_rows(model, device, batches, repeats, autocast: bool) -> list[dict]:
    rows = []
    tag = "bf16_autocast" if autocast else "eager_fp32"
    for batch in batches:
        tokens = captions(model.config, batch, device)

        def call():
            g = torch.Generator(device=device).manual_seed(0)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                model.generate(tokens, steps=STEPS, algorithm=3, generator=g)

        rows.append(latency_row(f"sample_{tag}_b{batch}", batch, timed(call, device, repeats),
                                dtype="bf16 autocast" if autocast else "fp32 (TF32 off)"))
    return rows


def compile_rows(model, device, batches, repeats, dry_run: bool) -> list[dict]:
    """One decoder pass per round compiled with torch.compile(mode="reduce-overhead"): CUDA
    graphs, one graph replayed per round (its logits are consumed before the next round). The
    sampling loop around it stays in Python, as in eager. The model's `_decode` (embedded
    tokens -> logits) is compiled where it exists, else each decoder block."""
    model = copy.deepcopy(model)
    options = {"backend": "eager"} if dry_run else {"mode": "reduce-overhead", "dynamic": False}
    if callable(getattr(model, "_decode", None)):
        model._decode = torch.compile(model._decode, **options)  # generate() calls self._decode each round
        what = "Emage._decode (all decoder blocks, one graph per round)"
    elif getattr(model, "blocks", None) is not None:
        for block in model.blocks:
            block.compile(**options)
        what = "each decoder block"
    else:
        raise RuntimeError("the model has neither `_decode` nor `blocks` to compile")
    rows = []
    for batch in batches:
        tokens = captions(model.config, batch, device)

        def call():
            g = torch.Generator(device=device).manual_seed(0)
            model.generate(tokens, steps=STEPS, algorithm=3, generator=g)

        started = time.perf_counter()
        call()  # compilation (and CUDA graph capture) at this batch's shapes
        first = time.perf_counter() - started
        how = "dynamo, eager backend (dry run: no code generation)" if dry_run else 'torch.compile(mode="reduce-overhead")'
        rows.append(latency_row(f"sample_compile_b{batch}", batch, timed(call, device, repeats),
                                compile_and_first_call_s=first, how=f"{how} of {what}", dtype="fp32 (TF32 off)"))
    return rows


class OrtSampler:
    """Algorithm 3 over the exported text and round graphs, with every tensor bound from torch
    memory (`data_ptr`): the uniform noise is drawn by torch on the device from a
    torch.Generator in emage's order (u_token, then u_confidence, per round), so a seed gives
    eager PyTorch and this loop the same noise. Written here rather than through
    export_onnx.OnnxEmage, which draws its noise on the host."""

    def __init__(self, paths: dict, config, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls") and device.type == "cuda":
            try:
                ort.preload_dlls()  # CUDA / cuDNN libraries of the installed torch or nvidia wheels
            except Exception:
                pass
        self.ort, self.config, self.device = ort, config, device
        self.kind, self.index = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ProviderMissing(f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider "
                                      f"(providers: {', '.join(ort.get_available_providers())})")
            providers = [("CUDAExecutionProvider", {"device_id": self.index, "use_tf32": 0})]
        else:
            providers = ["CPUExecutionProvider"]
        self.sessions = {name: ort.InferenceSession(str(paths[name]), options, providers=providers)
                         for name in ("text", "round")}
        used = self.sessions["round"].get_providers()[0]
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if used != wanted:
            raise ProviderMissing(f"ONNX Runtime could not start {wanted} (it runs on {used})")
        self.provider = used

    def ready(self) -> None:
        """ONNX Runtime reads the bound buffers on its own CUDA stream: torch's writes (the
        noise, the first state) must be done first."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _bind(self, binding, name, tensor: torch.Tensor, output: bool = False):
        tensor = tensor.contiguous()
        dtype = {torch.int64: np.int64, torch.bool: np.bool_, torch.float32: np.float32}[tensor.dtype]
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.kind, self.index, dtype, list(tensor.shape), tensor.data_ptr())
        return tensor  # keep it alive until the run

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                 choice_temperature: float = 4.5) -> torch.Tensor:
        c, dev = self.config, self.device
        B, n, L = tokens.shape[0], c.n, tokens.shape[1]
        heads, hd = c.heads, c.width // c.heads
        text = self.sessions["text"].io_binding()
        tokens = self._bind(text, "tokens", tokens)
        text.bind_cpu_input("candidates", np.arange(1, dtype=np.int64))
        states = torch.empty(B, L, c.text.width, device=dev)
        text_kv = torch.empty(B, c.layers, 2, heads, L, hd, device=dev)
        text_mask = torch.empty(B, 1, 1, L, dtype=torch.bool, device=dev)
        for name, t in (("states", states), ("text_kv", text_kv), ("text_mask", text_mask)):
            self._bind(text, name, t, output=True)
        self.ready()
        self.sessions["text"].run_with_iobinding(text)

        session = self.sessions["round"]
        binding = session.io_binding()
        state = (torch.full((B, n), c.mask_id, dtype=torch.long, device=dev), torch.zeros(B, n, dtype=torch.bool, device=dev))
        spare = (torch.empty_like(state[0]), torch.empty_like(state[1]))
        frozen = torch.zeros(B, n, dtype=torch.bool, device=dev)  # Algorithm 3: nothing given by the caller
        sampled, probs = torch.empty(B, n, dtype=torch.long, device=dev), torch.empty(B, n, device=dev)
        counts = emage.commit_counts("cosine", STEPS, torch.full((B,), n)).to(dev)  # (T, B)
        for name, t in (("text_kv", text_kv), ("text_mask", text_mask), ("frozen", frozen)):
            self._bind(binding, name, t)
        self._bind(binding, "sampled", sampled, output=True)
        self._bind(binding, "probs", probs, output=True)
        binding.bind_cpu_input("temperature", np.array(temperature, np.float32))
        for t in range(1, STEPS + 1):
            u_token = torch.rand(B, n, generator=generator, device=dev)  # emage's order
            u_confidence = torch.rand(B, n, generator=generator, device=dev)
            bound = [self._bind(binding, "u_token", u_token), self._bind(binding, "u_confidence", u_confidence),
                     self._bind(binding, "count", counts[t - 1]), self._bind(binding, "tokens", state[0]),
                     self._bind(binding, "committed", state[1])]
            binding.bind_cpu_input("gumbel_scale", np.array(choice_temperature * (1 - t / STEPS), np.float32))
            self._bind(binding, "tokens_out", spare[0], output=True)
            self._bind(binding, "committed_out", spare[1], output=True)
            self.ready()
            session.run_with_iobinding(binding)  # returns once ONNX Runtime's stream is done
            del bound  # the run has returned: the bound inputs may go
            state, spare = spare, state
        return state[0].clone()


class ProviderMissing(RuntimeError):
    """ONNX Runtime cannot run on the requested device here: the rows are skipped, not errors."""


def onnx_rows(model, vq_model, device, batches, repeats, work: Path, budget: Budget) -> list[dict]:
    import export_onnx

    cpu_model = copy.deepcopy(model).float().cpu().eval()
    started = time.perf_counter()
    paths = export_onnx.export_graphs(cpu_model, vq_model.cpu().eval(), work)
    export_s = time.perf_counter() - started
    del cpu_model
    sampler = OrtSampler(paths, model.config, torch.device(device))
    rows = []
    for batch in batches:
        if budget.left() < 0:
            rows.append(skipped(f"sample_onnx_cuda_b{batch}", "time budget spent"))
            continue
        tokens = captions(model.config, batch, device)

        def call():
            sampler.generate(tokens, torch.Generator(device=device).manual_seed(0))

        runs = timed(call, device, repeats)
        parity = {}
        for temperature in (0.0, 1.0):  # same seed, same noise, both runtimes
            eager = model.generate(tokens, steps=STEPS, algorithm=3, temperature=temperature,
                                   generator=torch.Generator(device=device).manual_seed(1))
            ort_tokens = sampler.generate(tokens, torch.Generator(device=device).manual_seed(1), temperature=temperature)
            parity["greedy" if temperature == 0 else "sampled"] = float((eager == ort_tokens).float().mean())
        rows.append(latency_row(f"sample_onnx_cuda_b{batch}", batch, runs, provider=sampler.provider,
                                io_binding=True, export_s=export_s, tokens_equal_greedy=parity["greedy"],
                                tokens_equal_sampled=parity["sampled"], parity=parity["greedy"] >= PARITY_MIN))
    return rows


def ar_rows(model, device, batches, repeats) -> list[dict]:
    rows = []
    for batch in batches:
        tokens = captions(model.config, batch, device)

        def call():
            model.generate(tokens, algorithm="ar", use_cache=True, generator=torch.Generator(device=device).manual_seed(0))

        runs = timed(call, device, max(1, repeats // 2))
        rows.append({**latency_row(f"ar_kv_b{batch}", batch, runs), "steps": model.config.n})
    return rows


def fit_quadratic(xs, ys):
    X = torch.tensor([[1.0, x, x * x] for x in xs], dtype=torch.float64)
    Y = torch.tensor(ys, dtype=torch.float64)[:, None]
    return [float(v) for v in torch.linalg.lstsq(X, Y, driver="gels" if X.is_cuda else "gelsd").solution[:, 0]]


@torch.no_grad()
def ar_uncached_rows(model, device, batches, repeats) -> list[dict]:
    """Estimated: one uncached step at prefix S is the causal decoder over S tokens plus the
    sampling of the last; a + bS + cS^2 is fitted to timed steps and summed over S = 1..n."""
    c, rows = model.config, []
    for batch in batches:
        tokens = captions(c, batch, device)
        kv, mask = model.encode_text(tokens)
        points = sorted({max(1, round(c.n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
        medians = []
        for S in points:
            x = torch.full((batch, S), c.mask_id, dtype=torch.long, device=device)
            u = torch.rand(batch, 1, device=device)

            def step():
                logits = model.round_logits(x, kv, mask, causal=True)
                emage.sample_tokens(logits[:, -1:], u, 1.0)

            medians.append(statistics.median(timed(step, device, max(2, repeats))))
        a, b, q = fit_quadratic(points, medians)
        total = sum(a + b * S + q * S * S for S in range(1, c.n + 1))
        text = statistics.median(timed(lambda: model.encode_text(tokens), device, max(2, repeats)))
        seconds = text + total
        rows.append({"name": f"ar_uncached_b{batch}", "status": "estimated", "batch": batch, "steps": c.n,
                     "seconds_per_call": seconds, "seconds_per_image": seconds / batch,
                     "how": (f"estimated, not run: text {text:.4g} s + sum over S=1..{c.n} of a + bS + cS^2, least "
                             f"squares on timed uncached steps at S = {points}"),
                     "step_seconds": dict(zip(map(str, points), medians))})
    return rows


def training_batch(config, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = captions(config, batch, device, seed)
    image = torch.randint(0, config.codebook_size, (batch, config.n), generator=g).to(device)
    return text, image


def train_step_fn(model, optimizer, text, image, device):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model.loss(text, image, 3)
        loss.backward()
        optimizer.step()
        return loss

    return step


def peak_flops(device, dry_run: bool) -> tuple[float, str]:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS:
            if key in name:
                return peak, f"table: {key} dense bf16 ({peak / 1e12:.0f} TFLOP/s)"
    size = 512 if dry_run else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    runs = timed(lambda: a @ a, device, 5)
    peak = 2 * size**3 / statistics.median(runs)
    return peak, f"measured: bf16 {size}x{size} matmul ({peak / 1e12:.3g} TFLOP/s)"


def train_row(model, device, batch: int, repeats: int, dry_run: bool) -> dict:
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(device).type == "cuda")
    text, image = training_batch(model.config, batch, device)
    step = train_step_fn(model, optimizer, text, image, device)
    step()  # warm-up (optimizer state allocated)
    flops = counted_flops(step)
    runs = timed(step, device, repeats)
    seconds = statistics.median(runs)
    peak, source = peak_flops(device, dry_run)
    achieved = flops / seconds
    return {"name": "train_step_bf16", "status": "measured", "batch": batch, "variant": 3,
            "seconds_per_step": seconds, "flops_per_step": flops, "achieved_flops": achieved,
            "peak_flops": peak, "peak_source": source, "mfu": achieved / peak, "runs": runs,
            "note": "FLOPs: FlopCounterMode over forward + backward (optimizer step not counted); bf16 autocast, AdamW"}


class LossModule(torch.nn.Module):
    """DistributedDataParallel hooks forward(): the loss behind one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text, image):
        return self.model.loss(text, image, 3)


def ddp_worker(rank: int, world: int, port: int, dry_run: bool, batch: int, repeats: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "gloo" if dry_run else "nccl"
    device = torch.device("cpu") if dry_run else torch.device("cuda", rank)
    if dry_run:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        config, _, _, _ = configs(dry_run)
        torch.manual_seed(0)
        model = emage.Emage(config).to(device).train()
        ddp = torch.nn.parallel.DistributedDataParallel(LossModule(model), device_ids=None if dry_run else [rank],
                                                        find_unused_parameters=True)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        text, image = training_batch(config, batch, device, seed=rank)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = ddp(text, image)
            loss.backward()
            optimizer.step()

        runs = timed(step, device, repeats)
        dist.barrier()
        if rank == 0:
            files.write_json(Path(out_dir) / "ddp.json", {"runs": runs, "backend": backend})
    finally:
        dist.destroy_process_group()


def ddp_row(device, dry_run: bool, batch: int, repeats: int, single_step_s: float | None) -> dict:
    import torch.multiprocessing as mp

    if not dry_run and torch.cuda.device_count() < 2:
        return skipped("ddp_two_process_step", f"{torch.cuda.device_count()} GPU(s) visible; needs 2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(ddp_worker, args=(2, port, dry_run, batch, repeats, folder), nprocs=2, join=True)
        result = read_json(Path(folder) / "ddp.json")
    seconds = statistics.median(result["runs"])
    row = {"name": "ddp_two_process_step", "status": "measured", "backend": result["backend"], "processes": 2,
           "batch_per_process": batch, "seconds_per_step": seconds, "runs": result["runs"],
           "note": "find_unused_parameters=True (safe whether or not some parameters take no gradient)"}
    if single_step_s:
        row["scaling_efficiency"] = single_step_s / seconds  # 1.0: two processes step as fast as one
    return row


def read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def skipped(name: str, why: str) -> dict:
    return {"name": name, "status": "skipped", "why": why}


def error_row(name: str, error: BaseException) -> dict:
    return {"name": name, "status": "error", "why": f"{type(error).__name__}: {error}"[:500],
            "traceback": traceback.format_exc()[-2000:]}


# ----------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------


def row_names(batches) -> dict:
    """Every row the suite writes, by group, in order."""
    return {
        "eager": [f"sample_eager_fp32_b{b}" for b in batches],
        "bf16": [f"sample_bf16_autocast_b{b}" for b in batches],
        "onnx": [f"sample_onnx_cuda_b{b}" for b in batches],
        "ar_kv": [f"ar_kv_b{b}" for b in batches],
        "ar_uncached": [f"ar_uncached_b{b}" for b in batches],
        "train": ["train_step_bf16"],
        "compile": [f"sample_compile_b{b}" for b in batches],
        "ddp": ["ddp_two_process_step"],
    }


def run_suite(args) -> dict:
    budget = Budget(args.budget_s)
    config, vq_config, batches, train_batch = configs(args.dry_run)
    repeats = args.repeats or (2 if args.dry_run else 5)
    names = row_names(batches)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
               "cpu_count": os.cpu_count()}
    gpu = torch.cuda.is_available()
    if gpu:
        machine.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    try:
        import onnxruntime
        machine["onnxruntime"] = onnxruntime.__version__
        machine["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as error:
        machine["onnxruntime"] = f"not importable: {error}"
    report = {"command": " ".join(["python", "benchmarks/gpu_suite.py", *args.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "machine": machine, "config": config.to_dict(), "steps": STEPS,
              "algorithm": 3, "repeats": repeats, "rows": []}
    rows = report["rows"]
    if not args.dry_run and not gpu:
        for group in names.values():
            rows.extend(skipped(name, "no CUDA GPU visible to torch (use --dry-run on a CPU)") for name in group)
        return report
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (ONNX Runtime: use_tf32=0)
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = emage.Emage(config).eval().to(device)
    vq_model = vqgan.VQGAN(vq_config).eval()
    report["parameters"] = sum(p.numel() for p in model.parameters())
    single_step = None

    def group(key, fn):
        nonlocal single_step
        if budget.left() <= 0:
            rows.extend(skipped(name, f"time budget of {args.budget_s:.0f} s spent") for name in names[key])
            return
        started = time.perf_counter()
        try:
            got = fn()
        except ProviderMissing as error:
            got = [skipped(name, str(error)) for name in names[key]]
        except Exception as error:
            got = [error_row(name, error) for name in names[key]]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        got = [got] if isinstance(got, dict) else got
        for row in got:
            row.setdefault("group_seconds", time.perf_counter() - started)
            if row["name"] == "train_step_bf16" and row["status"] == "measured":
                single_step = row["seconds_per_step"]
            print(summary(row), file=sys.stderr, flush=True)
        rows.extend(got)

    with tempfile.TemporaryDirectory(prefix="gpu_suite_onnx_") as work:
        group("eager", lambda: eager_rows(model, device, batches, repeats, autocast=False))
        group("bf16", lambda: eager_rows(model, device, batches, repeats, autocast=True))
        group("onnx", lambda: onnx_rows(model, vq_model, device, batches, repeats, Path(work), budget))
    group("ar_kv", lambda: ar_rows(model, device, batches, repeats))
    group("ar_uncached", lambda: ar_uncached_rows(model, device, batches, repeats))
    group("train", lambda: train_row(model, device, train_batch, repeats, args.dry_run))
    group("compile", lambda: compile_rows(model, device, batches, repeats, args.dry_run))
    group("ddp", lambda: ddp_row(device, args.dry_run, train_batch, repeats, single_step))
    report["seconds"] = time.perf_counter() - budget.start
    return report


def summary(row: dict) -> str:
    if row["status"] in ("skipped", "error"):
        return f"{row['name']:<28} {row['status']}: {row['why'][:160]}"
    if "seconds_per_image" in row:
        extra = f"  parity {row['parity']} (greedy {row['tokens_equal_greedy']:.4f})" if "parity" in row else ""
        return f"{row['name']:<28} {row['status']}: {row['seconds_per_image']:.4f} s/image{extra}"
    if "mfu" in row:
        return f"{row['name']:<28} {row['status']}: {row['seconds_per_step']:.4f} s/step, MFU {row['mfu']:.1%} ({row['peak_source']})"
    return f"{row['name']:<28} {row['status']}: {row.get('seconds_per_step', float('nan')):.4f} s/step"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config, same rows (a smoke test for CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per row (0: 5 on a GPU, 2 in a dry run)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="rows that would start after this many seconds are skipped (keeps the suite under 8 minutes)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.out.exists() and not args.overwrite:
        print(f"error: {args.out} exists; pass --overwrite to replace it or --out another path", file=sys.stderr)
        return 2
    if args.repeats < 0:
        print("error: --repeats must be >= 0", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)  # a smoke test on a shared CI machine: no OpenMP oversubscription
    report = run_suite(args)
    if args.out.exists() and not args.overwrite:  # appeared while the suite ran
        print(f"error: {args.out} appeared while the suite ran; not replaced", file=sys.stderr)
        return 2
    files.write_json(args.out, report)
    print(f"wrote {args.out} ({len(report['rows'])} rows, {report.get('seconds', 0):.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
