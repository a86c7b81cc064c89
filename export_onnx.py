"""Export the sampling pipeline to ONNX and run it on ONNX Runtime.

    python export_onnx.py                         the shipped demo -> exports/shapes-demo/
    python sample.py "a red circle" --backend onnx   reads exports/shapes-demo/ by default
    python export_onnx.py --checkpoint DIR --out OUT [--overwrite]

Four graphs, each with a dynamic batch axis, exported by the TorchScript-based
`torch.onnx.export` (dynamo=False) at opset 17:

    text.onnx          tokens[B, L] -> text states, the cross-attention keys/values of
                       every decoder layer and the padding mask (once per caption)
    round.onnx         one round of Algorithms 1 and 3: decoder pass, inverse-CDF token
                       sampling, Gumbel confidence, commit of the top-ranked positions
    round_guided.onnx  the same with classifier-free guidance (text rows doubled)
    vqgan_decoder.onnx tokens[B, h, w] -> images[B, 3, H, W] in [-1, 1]

Random numbers never live inside a graph: the uniform noise of each round is an input
drawn on the host from one torch.Generator in the order `emage.generate` draws it, so
for the same caption and seed the ONNX pipeline commits the same tokens as PyTorch's,
except where a sample lies within float rounding (~1e-6) of a boundary of the CDF: the
two runtimes multiply matrices with different kernels. On the shapes demo 9 of 10
evaluation captions (2 images each) give identical tokens, the 10th differs in 1 of 128
tokens, in the last round; with random weights over 8192 codes ~0.2 % of the samples of a
round sit that close to a boundary (tests/test_export_onnx.py checks that every
difference starts with such a sample).

After writing the graphs the command checks each against PyTorch on random inputs and
fails loudly otherwise: max abs difference <= 1e-4 in fp32, and every discrete decision
(sampled token, committed position) equal unless it is within 1e-4 of a tie
(`check_round`). config.json, written last, records the opset, the exporter and the
measured differences. The graphs are written into a fresh folder beside --out and moved
into place only once they pass: an existing folder is never touched unless it holds an
earlier export and --overwrite is given, and a checkpoint folder never.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import emage
import extensions
from files import FileError, check_int, is_whole, read_json, shown, write_json

ROOT = Path(__file__).resolve().parent
DEMO_CHECKPOINT = ROOT / "checkpoints" / "shapes" / "emage"
DEFAULT_OUT = ROOT / "exports" / "shapes-demo"  # where sample.py --backend onnx looks by default

OPSET = 17  # ONNX opset of every graph (TopK tie-breaking by index is defined since opset 11)
EXPORTER = "torch.onnx.export (TorchScript-based, dynamo=False)"
TOLERANCE = 1e-4  # max abs difference allowed between PyTorch and ONNX Runtime, fp32
FORMAT = "emage-onnx"  # config.json "format": marks a folder written by this script
GRAPHS = {"text": "text.onnx", "round": "round.onnx", "round_guided": "round_guided.onnx",
          "vqgan_decoder": "vqgan_decoder.onnx"}


class ExportError(ValueError):
    """A user error around ONNX export or an exported folder; also a failed parity check."""


# ----------------------------------------------------------------------------------------
# The graphs: thin modules around emage's own model calls and pure functions
# ----------------------------------------------------------------------------------------


class TextGraph(nn.Module):
    """tokens[B, L], candidates[r] -> (states[B, L, Dt], text_kv[B r, layers, 2, heads, L, hd],
    text_mask[B r, 1, 1, L]).

    `Emage.encode_text` once per caption, with the text states exposed as well; the keys,
    values and mask of each caption are then repeated for its r candidates (rows
    b * r + j, as `Emage.generate` lays them out). `candidates` only gives r by its length
    (its values are unused). The parity check compares every output with the model's own
    `text_encoder` and `encode_text`.
    """

    def __init__(self, model: emage.Emage):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, candidates: torch.Tensor):
        states, _ = self.model.text_encoder(tokens)  # (B, L, Dt)
        L = tokens.shape[1]
        valid = torch.arange(L, device=tokens.device) <= tokens.argmax(-1, keepdim=True)  # (B, L): up to the end token
        text_kv = torch.stack([b.cross.keys_values(states) for b in self.model.blocks], 1)  # (B, layers, 2, h, L, hd)
        r = candidates.shape[0]
        repeat = lambda t: t[:, None].expand(-1, r, *t.shape[1:]).flatten(0, 1)  # noqa: E731  (B r, ...)
        return states, repeat(text_kv), repeat(valid[:, None, None, :])


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor):
    """`emage.sample_tokens` with the temperature as a 0-d tensor (a graph input).

    Same operations in the same order: softmax(logits / T) and the inverse CDF at
    u * total; at T = 0 the argmax of softmax(logits) and its probability. A graph cannot
    branch on an input's value, so both are computed (the greedy one divides by 1, which
    changes no bit) and one is selected.
    """
    greedy = temperature == 0
    probs = F.softmax(logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature), dim=-1)  # (B, n, K)
    cdf = probs.cumsum(-1)  # (B, n, K)
    target = u[..., None] * cdf[..., -1:]  # (B, n, 1)
    sampled = (cdf < target).sum(-1).clamp(max=logits.shape[-1] - 1)  # (B, n)
    tokens = torch.where(greedy, probs.argmax(-1), sampled)  # (B, n)
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def top_count(confidence: torch.Tensor, committed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`emage._top_count` with one TopK instead of a stable sort and an argsort.

    ONNX TopK breaks ties by the lower index, which is the order of a stable descending
    sort, so the first `count` positions of the order are the same positions. Committed
    positions score +inf and come first (line 5 of Algorithms 1 and 3).
    """
    n = confidence.shape[-1]
    score = torch.where(committed, torch.full_like(confidence, float("inf")), confidence)  # (B, n)
    order = score.topk(n, dim=-1).indices  # (B, n): best first
    first = torch.arange(n, device=count.device) < count[:, None]  # (B, n): the first `count` of the order
    return torch.zeros_like(committed).scatter(-1, order, first)


class RoundGraph(nn.Module):
    """One round of Algorithms 1 and 3 (lines 3-5), from Y_obs to the next Y_obs.

    Inputs: tokens[B, n] (Y_obs), committed[B, n] (P_obs = 1), frozen[B, n] (positions that
    keep their value: `committed` for Algorithm 1, the caller's fixed tokens for Algorithm
    3), text_kv, text_mask (rows 2B when guided: conditional, then unconditional), u_token,
    u_confidence [B, n] uniform noise, count[B] = floor(tau(t/T) n), and 0-d gumbel_scale,
    temperature (and guidance_scale). Outputs: tokens_out, committed_out, and this round's
    samples and their P_obs (sampled, probs; for the parity check). Algorithm 1 is
    Algorithm 3 with frozen = committed, which is how `emage.commit_algorithm1` and
    `emage.commit_algorithm3` differ.
    """

    def __init__(self, model: emage.Emage, guided: bool):
        super().__init__()
        self.model = model
        self.guided = guided

    def forward(self, tokens, committed, frozen, text_kv, text_mask, u_token, u_confidence, count,
                gumbel_scale, temperature, guidance_scale=None):
        if self.guided:  # one doubled batch, as Emage.generate's predict()
            B = tokens.shape[0]
            logits = self.model.round_logits(torch.cat([tokens, tokens]), text_kv, text_mask)  # (2B, n, K)
            logits = emage.guided_logits(logits[:B], logits[B:], guidance_scale)  # (B, n, K)
        else:
            logits = self.model.round_logits(tokens, text_kv, text_mask)  # (B, n, K)
        sampled, p_obs = sample_tokens(logits, u_token, temperature)  # line 3
        confidence = emage.gumbel_confidence(p_obs, u_confidence, gumbel_scale)
        keep = top_count(confidence, committed, count)  # line 4 (committed first: line 5)
        new = torch.where(keep, sampled, torch.full_like(tokens, self.model.config.mask_id))
        return torch.where(frozen, tokens, new), keep, sampled, p_obs


class VQGANDecoderGraph(nn.Module):
    """tokens[B, h, w] -> images[B, 3, H, W]: `VQGAN.decode`."""

    def __init__(self, vqgan_model):
        super().__init__()
        self.vqgan = vqgan_model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(tokens)


ROUND_INPUTS = ["tokens", "committed", "frozen", "text_kv", "text_mask", "u_token", "u_confidence", "count",
                "gumbel_scale", "temperature"]
ROUND_OUTPUTS = ["tokens_out", "committed_out", "sampled", "probs"]


def round_axes(guided: bool) -> dict:
    rows = {0: "text_batch"} if guided else {0: "batch"}  # guided: 2B text rows for B images
    axes = {name: {0: "batch"} for name in ("tokens", "committed", "frozen", "u_token", "u_confidence", "count")}
    axes.update(text_kv={**rows, 4: "text_length"}, text_mask={**rows, 3: "text_length"})
    axes.update({name: {0: "batch"} for name in ROUND_OUTPUTS})
    return axes


# ----------------------------------------------------------------------------------------
# Example inputs (for tracing and for the parity check)
# ----------------------------------------------------------------------------------------


def random_captions(config: emage.EmageConfig, batch: int, g: torch.Generator) -> torch.Tensor:
    """[sot, random ids, eot, 0 ...] rows of random lengths, like the tokenizer's output."""
    V, L = config.text.vocab_size, config.text.context_length
    tokens = torch.zeros(batch, L, dtype=torch.long)
    for row in range(batch):
        k = int(torch.randint(0, L - 1, (1,), generator=g))  # caption ids between start and end
        tokens[row, 0], tokens[row, k + 1] = V - 2, V - 1
        tokens[row, 1 : k + 1] = torch.randint(0, V - 2, (k,), generator=g)
    return tokens


def random_round_state(config: emage.EmageConfig, batch: int, g: torch.Generator, algorithm: int):
    """A reachable decoding state: `prev` committed tokens per row, `count` > prev to commit."""
    n, K = config.n, config.codebook_size
    prev = torch.randint(0, n, (batch,), generator=g)  # (B,)
    rank = torch.rand(batch, n, generator=g).argsort(-1).argsort(-1)
    committed = rank < prev[:, None]  # (B, n)
    codes = torch.randint(0, K, (batch, n), generator=g)
    tokens = torch.where(committed, codes, torch.full_like(codes, config.mask_id))
    count = prev + 1 + (torch.rand(batch, generator=g) * (n - prev)).long().clamp(max=n - prev - 1)
    frozen = committed if algorithm == 1 else torch.zeros_like(committed)
    return tokens, committed, frozen, count


def round_example(model, batch: int, g: torch.Generator, *, guided: bool, algorithm: int = 3,
                  temperature: float = 1.0, gumbel_scale: float = 2.0, guidance_scale: float = 3.0) -> dict:
    c = model.config
    tokens, committed, frozen, count = random_round_state(c, batch, g, algorithm)
    with torch.no_grad():
        text_kv, text_mask = model.encode_text(random_captions(c, 2 * batch if guided else batch, g))
    inputs = dict(tokens=tokens, committed=committed, frozen=frozen, text_kv=text_kv, text_mask=text_mask,
                  u_token=torch.rand(batch, c.n, generator=g), u_confidence=torch.rand(batch, c.n, generator=g),
                  count=count, gumbel_scale=torch.tensor(gumbel_scale), temperature=torch.tensor(temperature))
    if guided:
        inputs["guidance_scale"] = torch.tensor(guidance_scale)
    return inputs


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    """torch.onnx.export into a temporary file beside `path`, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about shape checks and tuple unpacking it freezes; the frozen values are
            # sizes fixed by the config (heads, 3 in q/k/v), and check_graphs runs at another batch.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript-based exporter is chosen on purpose (see EXPORTER); its deprecation
            # notice would repeat once per graph.
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
            torch.onnx.export(module, args, tmp, dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_graphs(model: emage.Emage, vqgan_model, out_dir, opset: int = OPSET, batch: int = 2) -> dict[str, Path]:
    """Write the four graphs into out_dir (traced at `batch`, exported with a dynamic batch axis)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, vqgan_model = model.eval(), vqgan_model.eval()
    g = torch.Generator().manual_seed(0)
    paths = {name: out / file for name, file in GRAPHS.items()}
    text_tokens = random_captions(model.config, batch, g)
    _export(TextGraph(model), (text_tokens, torch.arange(2)), paths["text"], ["tokens", "candidates"],
            ["states", "text_kv", "text_mask"],
            {"tokens": {0: "captions", 1: "text_length"}, "candidates": {0: "candidates"},
             "states": {0: "captions", 1: "text_length"}, "text_kv": {0: "batch", 4: "text_length"},
             "text_mask": {0: "batch", 3: "text_length"}}, opset)
    for name, guided in (("round", False), ("round_guided", True)):
        example = round_example(model, batch, g, guided=guided)
        _export(RoundGraph(model, guided), tuple(example.values()), paths[name], list(example), ROUND_OUTPUTS,
                round_axes(guided), opset)
    h, w = model.config.grid
    image_tokens = torch.randint(0, vqgan_model.config.n_embed, (batch, h, w), generator=g)
    _export(VQGANDecoderGraph(vqgan_model), (image_tokens,), paths["vqgan_decoder"], ["tokens"], ["images"],
            {"tokens": {0: "batch"}, "images": {0: "batch"}}, opset)
    return paths


# ----------------------------------------------------------------------------------------
# ONNX Runtime sessions
# ----------------------------------------------------------------------------------------


def ort_device(device: str) -> tuple[str, int]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (ONNX Runtime device type, device id)."""
    import onnxruntime as ort

    if device == "auto":
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
        return ("cuda", 0) if cuda else ("cpu", 0)
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ExportError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def make_session(path: Path, device: tuple[str, int], threads: int = 0):
    """An InferenceSession on the CPU provider, or on CUDA (fp32: TF32 off) with CPU fallback refused."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
    if device[0] == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device[1], "use_tf32": 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.InvalidProtobuf, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.Fail) as error:
        raise ExportError(f"{path} is not a readable ONNX graph ({str(error).splitlines()[0][:120]}); "
                          "export again with export_onnx.py") from None
    if device[0] == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ExportError("ONNX Runtime could not start its CUDA provider (see its log above); use --device cpu")
    return session


class OnnxEmage:
    """`emage.Emage.generate` on ONNX Runtime: the text graph once, then the round graph T times.

    The host loop draws the noise of every round from the torch.Generator in emage's order
    (u_token[B', n], then u_confidence[B', n]) and computes the commit counts with
    `emage.commit_counts`; decoding state (Y_obs, committed positions) and the text
    keys/values stay on the ONNX Runtime device between rounds (I/O binding).
    """

    def __init__(self, sessions: dict, config: emage.EmageConfig, variant, device: tuple[str, int]):
        self.sessions, self.config, self.variant, self.device = sessions, config, variant, device

    def _value(self, array: np.ndarray):
        import onnxruntime as ort

        # A copy: on the CPU the OrtValue would otherwise share (and its outputs overwrite) the array.
        return ort.OrtValue.ortvalue_from_numpy(np.array(array, copy=True, order="C"), *self.device)

    def _empty(self, shape, dtype):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, *self.device)

    def encode_text(self, text_tokens: torch.Tensor, num_candidates: int = 1):
        """tokens[R, L] -> (text_kv[R * num_candidates, ...], text_mask) as OrtValues on the device."""
        session = self.sessions["text"]
        binding = session.io_binding()
        binding.bind_cpu_input("tokens", text_tokens.cpu().numpy())
        binding.bind_cpu_input("candidates", np.arange(num_candidates, dtype=np.int64))
        for name in ("states", "text_kv", "text_mask"):
            binding.bind_output(name, *self.device)
        session.run_with_iobinding(binding)
        _, text_kv, text_mask = binding.get_outputs()
        return text_kv, text_mask

    def _text_rows(self, text_tokens, scale, negative_tokens) -> torch.Tensor:
        """The captions of Emage._generation_text: with guidance (scale != 1) the negative or
        empty captions follow, both padded to one length."""
        if scale == 1.0:
            return text_tokens
        B, L = text_tokens.shape
        if negative_tokens is None:
            negative_tokens = self.empty_caption(B, L)
        if negative_tokens.dim() != 2 or negative_tokens.shape[0] not in (1, B):
            raise emage.EmageError(f"negative tokens must be [1 or {B}, length], got {tuple(negative_tokens.shape)}")
        L = max(L, negative_tokens.shape[1])  # pad the shorter with 0: padding, masked out
        pad = lambda t: F.pad(t.expand(B, -1), (0, L - t.shape[1]))  # noqa: E731
        return torch.cat([pad(text_tokens), pad(negative_tokens)])  # (2B, L): conditional, then unconditional

    def empty_caption(self, batch: int, length: int) -> torch.Tensor:
        tokens = torch.zeros(batch, length, dtype=torch.long)
        tokens[:, 0], tokens[:, 1] = self.config.text.vocab_size - 2, self.config.text.vocab_size - 1
        return tokens

    def initial_tokens(self, B, init_tokens, keep_mask, num_candidates):
        """Line 1 as Emage._initial_tokens: all [mask]; for editing, kept tokens fixed from the start."""
        n, mask_id = self.config.n, self.config.mask_id
        tokens = torch.full((B, n), mask_id, dtype=torch.long)
        if init_tokens is None and keep_mask is None:
            return tokens, torch.zeros(B, n, dtype=torch.bool)
        if init_tokens is None or keep_mask is None:
            raise emage.EmageError("editing needs both init_tokens and keep_mask")
        if init_tokens.shape != keep_mask.shape or tuple(init_tokens.shape) != (B // num_candidates, n):
            raise emage.EmageError(f"init_tokens and keep_mask must both be [{B // num_candidates}, {n}]")
        init = init_tokens.cpu().repeat_interleave(num_candidates, 0)
        keep = keep_mask.cpu().bool().repeat_interleave(num_candidates, 0)
        return torch.where(keep, init, tokens), keep

    def generate(self, text_tokens: torch.Tensor, steps: int = 16, algorithm=None, schedule: str = "cosine",
                 temperature: float = 1.0, num_candidates: int = 1, guidance_scale: float = 1.0,
                 negative_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 return_history: bool = False, init_tokens: torch.Tensor | None = None,
                 keep_mask: torch.Tensor | None = None, choice_temperature: float = 4.5):
        """Image tokens LongTensor[B * num_candidates, n], as `Emage.generate` (same arguments, same
        noise order); the autoregressive baseline ("ar") is not exported."""
        if algorithm is None:
            algorithm = emage.DEFAULT_ALGORITHM[self.variant] if self.variant is not None else 3
        algorithm = emage.parse_algorithm(algorithm)
        if algorithm == "ar":
            raise emage.EmageError("the ONNX backend runs algorithms 1, 3 and full; use --backend torch for ar")
        if num_candidates < 1:
            raise emage.EmageError(f"num_candidates must be at least 1, got {num_candidates}")
        c, host = self.config, text_tokens.device
        B = text_tokens.shape[0] * num_candidates
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=host)  # noqa: E731
        guided = guidance_scale != 1.0
        # Once per caption; rows repeated per candidate (conditional rows, then unconditional).
        text_kv, text_mask = self.encode_text(self._text_rows(text_tokens, guidance_scale, negative_tokens), num_candidates)
        if algorithm == "full":  # Section 3.1: one pass, i.e. Algorithm 1 with T = 1
            steps = 1

        tokens, fixed = self.initial_tokens(B, init_tokens, keep_mask, num_candidates)  # line 1
        n_fixed = fixed.sum(-1)  # (B',)
        counts = emage.commit_counts(schedule, steps, c.n - n_fixed) + n_fixed  # (T, B')
        session = self.sessions["round_guided" if guided else "round"]
        binding = session.io_binding()
        state = (self._value(tokens.numpy()), self._value(fixed.numpy()))  # (Y_obs, committed)
        spare = (self._empty((B, c.n), np.int64), self._empty((B, c.n), np.bool_))
        frozen = self._value(fixed.numpy())
        binding.bind_ortvalue_input("text_kv", text_kv)
        binding.bind_ortvalue_input("text_mask", text_mask)
        binding.bind_ortvalue_output("sampled", self._empty((B, c.n), np.int64))  # unused here
        binding.bind_ortvalue_output("probs", self._empty((B, c.n), np.float32))
        scalars = {"temperature": np.array(temperature, np.float32)}
        if guided:
            scalars["guidance_scale"] = np.array(guidance_scale, np.float32)
        history = []
        for t in range(1, steps + 1):  # line 2
            noise = {"u_token": rand(B, c.n).numpy(), "u_confidence": rand(B, c.n).numpy()}  # emage's order
            per_round = {**noise, **scalars, "count": counts[t - 1].numpy(),
                         "gumbel_scale": np.array(choice_temperature * (1 - t / steps), np.float32)}
            for name, array in per_round.items():
                binding.bind_cpu_input(name, array)
            binding.bind_ortvalue_input("tokens", state[0])
            binding.bind_ortvalue_input("committed", state[1])
            binding.bind_ortvalue_input("frozen", state[1] if algorithm != 3 else frozen)  # Algorithm 1: past tokens stay
            binding.bind_ortvalue_output("tokens_out", spare[0])
            binding.bind_ortvalue_output("committed_out", spare[1])
            session.run_with_iobinding(binding)  # lines 3-5
            state, spare = spare, state
            if return_history:
                history.append(torch.from_numpy(state[0].numpy().copy()))  # numpy() may share the buffer
        tokens = torch.from_numpy(state[0].numpy().copy()).to(host)
        return (tokens, torch.stack(history)) if return_history else tokens


class OnnxVQGAN:
    """`vqgan.VQGAN.decode` on ONNX Runtime: tokens[B, h, w] -> images[B, 3, H, W] (torch, on the CPU).
    No encoder: editing needs the PyTorch backend."""

    def __init__(self, session, config):
        self.session, self.config = session, config  # config: the VQGANConfig the graph was exported from

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        (images,) = self.session.run(["images"], {"tokens": tokens.long().cpu().numpy()})
        return torch.from_numpy(images)


def load_onnx(onnx_dir, device: str = "cpu", threads: int = 0):
    """(model, vqgan, tokenizer, info) of an exported folder, the parts `sample.Pipeline` holds:
    OnnxEmage (same generate as emage.Emage), OnnxVQGAN (decode only), the caption tokenizer
    and the checkpoint's info. Tokens, noise and images stay torch tensors on the CPU;
    `device` says where ONNX Runtime computes."""
    import clip_text
    import vqgan

    folder = Path(onnx_dir)
    meta = read_config(folder)
    where = ort_device(str(device))
    sessions = {name: make_session(folder / file, where, threads) for name, file in meta["graphs"].items()}
    config = emage.EmageConfig.from_dict(meta["config"])
    variant = None if meta.get("variant") is None else emage.parse_variant(meta["variant"])
    model = OnnxEmage({k: sessions[k] for k in ("text", "round", "round_guided")}, config, variant, where)
    tokenizer = clip_text.Tokenizer(folder / meta["tokenizer"])
    info = {"variant": variant, "step": meta.get("step", 0), "tokenizer_path": str((folder / meta["tokenizer"]).resolve()),
            "vqgan_dir": None, "extra": meta.get("extra", {})}
    decoder = OnnxVQGAN(sessions["vqgan_decoder"], vqgan.VQGANConfig.from_dict(meta["vqgan_config"]))
    return model, decoder, tokenizer, info


def read_config(folder: Path) -> dict:
    """config.json of an exported folder, read bounded, every field checked before use: the
    graphs it names (plain file names that exist), the generator's and the VQGAN's configs
    (emage.EmageConfig.from_dict, vqgan.VQGANConfig.from_dict), the vocabulary, variant and step."""
    import vqgan

    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder} holds no exported graphs (no config.json); run "
                          f"python export_onnx.py --checkpoint DIR --out {folder}")
    try:
        meta = read_json(path)
    except FileError as error:
        raise ExportError(f"{error}; export again with export_onnx.py") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path} was not written by export_onnx.py; export again with export_onnx.py")
    missing = sorted({"graphs", "config", "vqgan_config", "tokenizer"} - set(meta))
    if missing or not isinstance(meta["graphs"], dict) or set(meta["graphs"]) != set(GRAPHS):
        raise ExportError(f"{path} lacks {missing or 'graphs'}: it was written by another version of "
                          "export_onnx.py; export again")
    for file in (*meta["graphs"].values(), meta["tokenizer"]):
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file in (".", ".."):
            raise ExportError(f"{path} names {shown(file)} where a file of the folder belongs; export again")
    for file in meta["graphs"].values():
        if not (folder / file).is_file():
            raise ExportError(f"{folder / file} is missing; export again with export_onnx.py")
    variant, step = meta.get("variant"), meta.get("step", 0)
    if variant is not None and not (is_whole(variant) or (isinstance(variant, str) and len(variant) <= 8)):
        raise ExportError(f"{path}: unknown variant {shown(variant)}; export again")
    if not is_whole(step) or not 0 <= step < 2**63 or not isinstance(meta.get("extra", {}), dict):
        raise ExportError(f"{path}: step must be a whole number >= 0 and extra an object; export again")
    try:
        emage.EmageConfig.from_dict(meta["config"])
        if variant is not None:
            emage.parse_variant(variant)
        vqgan.VQGANConfig.from_dict(meta["vqgan_config"])
    except (emage.EmageError, vqgan.VQGANError) as error:
        raise ExportError(f"{path}: {error}; export again with export_onnx.py") from None
    return meta


# ----------------------------------------------------------------------------------------
# Parity: every graph against PyTorch on random inputs
# ----------------------------------------------------------------------------------------


def _max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a.double() - torch.from_numpy(b).double()).abs().max()) if a.numel() else 0.0


def unexplained_samples(logits, u, temperature: float, got: torch.Tensor, margin: float = TOLERANCE) -> torch.Tensor:
    """True where ONNX Runtime sampled a token that `emage.sample_tokens` would not pick even
    with every probability (greedy) or cumulative probability (inverse CDF) moved by `margin`.

    Two runtimes compute the logits with different kernels; where u falls within that
    rounding of a boundary of the CDF (or two probabilities tie), either token is right.
    With K codes of near-uniform probability this happens to about K * |rounding| of the
    positions (0.2 % at the paper's 8192 codes with random weights), so exact equality is
    not a usable check there, while a wrong graph picks wrong tokens almost everywhere.
    """
    got = got[..., None]
    if temperature == 0:
        probs = F.softmax(logits.float(), dim=-1)  # (B, n, K)
        return (probs.gather(-1, got)[..., 0] < probs.max(-1).values - margin)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(-1)  # (B, n, K)
    target = u * cdf[..., -1]  # (B, n)
    upper = cdf.gather(-1, got)[..., 0]  # the interval [upper - p, upper) of the token ORT chose
    lower = upper - probs.gather(-1, got)[..., 0]
    return (target < lower - margin) | (target >= upper + margin)


def ambiguous_rows(confidence, committed, count, margin: float = TOLERANCE) -> torch.Tensor:
    """True for rows whose count-th and (count + 1)-th scores lie within `margin`: the commit
    of such a row may differ between runtimes without either being wrong."""
    score = torch.where(committed, torch.full_like(confidence, float("inf")), confidence)
    ranked = score.sort(-1, descending=True).values  # (B, n)
    n = score.shape[-1]
    inside = ranked.gather(-1, (count.clamp(1, n) - 1)[:, None])[:, 0]
    outside = ranked.gather(-1, count.clamp(max=n - 1)[:, None])[:, 0]
    return (count < n) & (inside - outside <= margin)


def check_round(session, model: emage.Emage, x: dict, guided: bool, algorithm: int, temperature: float) -> float:
    """One round graph against emage's functions on inputs x; returns the max abs difference of
    P_obs, or raises ExportError.

    Three checks: (1) the samples equal those of `emage.sample_tokens` wherever the decision
    is clear by more than TOLERANCE (`unexplained_samples`); (2) their probabilities agree
    within TOLERANCE; (3) the commit equals `emage.commit_algorithm1/3` applied to the
    graph's own samples (so one boundary sample cannot cascade), except in rows whose
    count-th score ties with the next within TOLERANCE.
    """
    c, where = model.config, f"algorithm {algorithm}, temperature {temperature}"
    got_tokens, got_committed, got_sampled, got_probs = (
        torch.from_numpy(a) for a in session.run(None, {k: v.numpy() for k, v in x.items()}))
    if guided:
        cond, uncond = model.round_logits(torch.cat([x["tokens"]] * 2), x["text_kv"], x["text_mask"]).chunk(2)
        logits = emage.guided_logits(cond, uncond, float(x["guidance_scale"]))
    else:
        logits = model.round_logits(x["tokens"], x["text_kv"], x["text_mask"])
    sampled, p_obs = emage.sample_tokens(logits, x["u_token"], temperature)
    wrong = int(unexplained_samples(logits, x["u_token"], temperature, got_sampled).sum())
    if wrong:
        raise ExportError(f"parity check failed: {wrong} of {sampled.numel()} sampled tokens differ beyond "
                          f"rounding ({where}); the exported round graph does not match PyTorch")
    same = got_sampled == sampled  # (B, n); elsewhere the probabilities are of different tokens
    diff = float((got_probs.double() - p_obs.double()).abs()[same].max()) if same.any() else 0.0
    confidence = emage.gumbel_confidence(got_probs, x["u_confidence"], float(x["gumbel_scale"]))
    if algorithm == 1:
        tokens, committed = emage.commit_algorithm1(x["tokens"], x["committed"], got_sampled, confidence,
                                                    x["count"], c.mask_id)
    else:
        tokens, committed = emage.commit_algorithm3(x["tokens"], x["committed"], x["frozen"], got_sampled,
                                                    confidence, x["count"], c.mask_id)
    differs = (tokens != got_tokens).any(-1) | (committed != got_committed).any(-1)
    wrong = int((differs & ~ambiguous_rows(confidence, x["committed"], x["count"])).sum())
    if wrong:
        raise ExportError(f"parity check failed: the commit of {wrong} rows differs ({where}); "
                          "the exported round graph does not match PyTorch")
    return diff


def check_graphs(model: emage.Emage, vqgan_model, out_dir, batch: int = 3, seed: int = 1) -> dict[str, float]:
    """Run every graph on ONNX Runtime's CPU provider and in PyTorch on random inputs (at a
    batch other than the traced one, to exercise the dynamic axis); return the max abs
    differences, or raise ExportError when one exceeds TOLERANCE or a decision differs.

    The round graphs are compared with emage's own `round_logits`, `guided_logits`,
    `sample_tokens`, `gumbel_confidence` and `commit_algorithm1/3` (see `check_round`), at
    Algorithm 1 and 3, temperature 1 and 0.
    """
    out = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    sessions = {name: make_session(out / file, ("cpu", 0)) for name, file in GRAPHS.items()}
    diffs: dict[str, float] = {}
    with torch.no_grad():
        tokens = random_captions(model.config, batch, g)
        states, text_kv, text_mask = sessions["text"].run(None, {"tokens": tokens.numpy(), "candidates": np.arange(2)})
        ref_states, _ = model.text_encoder(tokens)
        ref_kv, ref_mask = (t.repeat_interleave(2, 0) for t in model.encode_text(tokens))
        if not np.array_equal(ref_mask.numpy(), text_mask):
            raise ExportError("parity check failed: the padding masks of the text graph differ from encode_text")
        diffs["text"] = max(_max_diff(ref_states, states), _max_diff(ref_kv, text_kv))

        for name, guided in (("round", False), ("round_guided", True)):
            diffs[name] = max(
                check_round(sessions[name], model, round_example(model, batch, g, guided=guided, algorithm=algorithm,
                                                                 temperature=temperature), guided, algorithm, temperature)
                for algorithm, temperature in ((1, 1.0), (3, 1.0), (3, 0.0)))

        h, w = model.config.grid
        image_tokens = torch.randint(0, vqgan_model.config.n_embed, (batch, h, w), generator=g)
        (images,) = sessions["vqgan_decoder"].run(None, {"tokens": image_tokens.numpy()})
        diffs["vqgan_decoder"] = _max_diff(vqgan_model.decode(image_tokens), images)

    for graph, diff in diffs.items():
        if not diff <= TOLERANCE:
            raise ExportError(f"parity check failed for {graph}: max abs difference {diff:.3g} > {TOLERANCE:g}; "
                              "the exported graph does not match PyTorch")
    return diffs


def export(model: emage.Emage, vqgan_model, out_dir, *, tokenizer_path, variant=None, step: int = 0,
           extra: dict | None = None, opset: int = OPSET, batch: int = 2, check_batch: int = 3, log=print,
           overwrite: bool = False) -> dict:
    """Export the four graphs to out_dir, check them against PyTorch, copy the tokenizer
    vocabulary and write config.json (in a fresh folder, moved to out_dir once it passed)."""
    if isinstance(model.config.text, emage.BertConfig):
        raise ExportError("this generator reads captions with a BERT tower (Table 5's experiment); only CLIP "
                          "text towers are exported, so sample it with PyTorch")
    if vqgan_model.config.n_embed != model.config.codebook_size:
        raise ExportError(f"the VQGAN has {vqgan_model.config.n_embed} codes but the generator "
                          f"{model.config.codebook_size}; the checkpoint points at the wrong VQGAN")
    started = time.perf_counter()
    final = Path(out_dir)
    check_destination(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        meta = _export_into(out, model, vqgan_model, tokenizer_path, variant, step, extra, opset, batch,
                            check_batch, log, started)
        if final.exists():  # an earlier export, and --overwrite was given (check_destination)
            shutil.rmtree(final)
        os.replace(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return meta


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse to write where a user's files would be lost: a checkpoint folder, a file, any
    non-empty folder that is not an earlier export, and an earlier export without --overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder")
    if (out / "model.safetensors").exists():
        raise ExportError(f"--out {out} is a checkpoint folder; export into another folder")
    entries = list(out.iterdir())
    if not entries:
        return
    try:
        earlier = json.loads((out / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        raise ExportError(f"--out {out} holds other files; pass an empty or new folder")
    if not overwrite:
        raise ExportError(f"--out {out} holds an earlier export; pass --overwrite to replace it, or another --out")


def _export_into(out, model, vqgan_model, tokenizer_path, variant, step, extra, opset, batch, check_batch, log, started):
    import onnxruntime

    export_graphs(model, vqgan_model, out, opset, batch)
    log(f"exported {', '.join(GRAPHS.values())} (opset {opset}) in {time.perf_counter() - started:.1f} s")
    diffs = check_graphs(model, vqgan_model, out, batch=check_batch)
    for graph, diff in diffs.items():
        log(f"parity {graph:14s} max abs difference {diff:.2e} (<= {TOLERANCE:g})")
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.resolve() != (out / tokenizer_path.name).resolve():
        shutil.copyfile(tokenizer_path, out / tokenizer_path.name)
    meta = {
        "format": FORMAT,
        "graphs": GRAPHS,
        "opset": opset,
        "exporter": EXPORTER,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "parity_max_abs": diffs,
        "config": model.config.to_dict(),
        "vqgan_config": asdict(vqgan_model.config),
        "variant": None if variant is None else emage.parse_variant(variant),
        "step": int(step),
        "tokenizer": tokenizer_path.name,
        "extra": extra or {},
    }
    write_json(out / "config.json", meta)
    return meta


def export_checkpoint(checkpoint, out_dir, opset: int = OPSET, batch: int = 2, check_batch: int = 3, log=print,
                      overwrite: bool = False, vqgan_dir=None) -> dict:
    """Export an Emage checkpoint folder and the VQGAN it names, or `vqgan_dir` (see `export`)."""
    import vqgan

    check_destination(Path(out_dir), overwrite)  # before minutes of work
    model, info = extensions.load_checkpoint(checkpoint)
    if vqgan_dir is None and not Path(info["vqgan_dir"]).is_dir():
        raise ExportError(f"{checkpoint} names its VQGAN as {info['vqgan_relative']!r} relative to itself, and "
                          f"{info['vqgan_dir']} does not exist (was the checkpoint moved?); pass --vqgan DIR")
    vqgan_model = vqgan.load_vqgan(vqgan_dir or info["vqgan_dir"]).eval()
    return export(model, vqgan_model, out_dir, tokenizer_path=info["tokenizer_path"], variant=info["variant"],
                  step=info["step"], extra=dict(info["extra"], checkpoint=str(Path(checkpoint).resolve())),
                  opset=opset, batch=batch, check_batch=check_batch, log=log, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="Emage checkpoint folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the graphs and their config.json (sample.py --backend onnx reads the default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--vqgan", type=Path, default=None,
                        help="VQGAN folder (default: the one the checkpoint names, relative to itself)")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    parser.add_argument("--batch", type=int, default=2, help="batch of the example inputs traced (the axis stays dynamic)")
    parser.add_argument("--check-batch", type=int, default=3, help="batch of the parity check (best not --batch)")
    return parser


MIN_OPSET = 14  # scaled dot-product attention
MAX_BATCH = 64  # example inputs are traced at this batch at most (the batch axis stays dynamic)


def max_opset() -> int:
    """The newest opset torch's TorchScript-based exporter writes."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import vqgan

    try:
        if not is_whole(args.opset) or not MIN_OPSET <= args.opset <= max_opset():
            raise ExportError(f"--opset {args.opset} is outside what this export supports: scaled dot-product attention "
                              f"needs opset {MIN_OPSET} or later and torch {torch.__version__} writes up to {max_opset()}")
        check_int("--batch", args.batch, 1, MAX_BATCH, ExportError)
        check_int("--check-batch", args.check_batch, 1, MAX_BATCH, ExportError)
        export_checkpoint(args.checkpoint, args.out, args.opset, args.batch, args.check_batch, overwrite=args.overwrite,
                          vqgan_dir=args.vqgan)
        print(args.out / "config.json")
    except (ExportError, emage.EmageError, vqgan.VQGANError, FileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
