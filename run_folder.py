"""The run folder of train.py: its lock, its checkpoints, resuming from them, and its metrics.

    step-0001000/          checkpoint: config.json + model.safetensors (emage.save_checkpoint),
                           the BPE vocabulary, train_state.pt (optimizer, step, RNG states)
    latest.json            {"step", "dir"} of the newest complete checkpoint; `latest` links to it
    metrics.jsonl          one JSON object per logged step and per evaluation
    train.lock             held while a training writes here

Every write is atomic, and nothing here starts afresh over an earlier run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import emage
from files import write_json, write_text


class TrainError(ValueError):
    """A user error or a stopped run: bad flags, a diverged loss, a checkpoint that does not fit."""




def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def holds_a_run(out: Path) -> bool:
    """Whether `out` holds (part of) a training run: a checkpoint, its record or its metrics."""
    if not out.is_dir():
        return False
    return (out / "latest.json").exists() or (out / "metrics.jsonl").exists() or any(out.glob("step-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(out: Path) -> dict | None:
    """The process holding out/train.lock ({pid, host, since}), or None: no lock, or a stale one
    (its process is gone from this host, or a kill tore the file mid-write)."""
    lock = out / "train.lock"
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # torn by a kill mid-write: stale
    if host == socket.gethostname() and not _alive(pid):
        return None
    return {"pid": pid, "host": host, "since": str(holder.get("since"))[:40]}


def holder_error(out: Path, holder: dict) -> TrainError:
    return TrainError(f"{out} is being written by process {holder['pid']} on {holder['host']} since {holder['since']}; "
                      "wait for it, or pass another --out")


@contextmanager
def run_lock(out: Path, enabled: bool = True):
    """Hold out/train.lock while training writes to `out`; a second writer is refused with the
    holder's name. A lock whose process is gone (killed) is taken over."""
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "train.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(out)
            if holder is not None:
                raise holder_error(out, holder) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def save(out: Path, model: emage.Emage, optimizer, step: int, args, tokenizer_path, vqgan_dir, rng_states, keep: int) -> Path:
    """Write checkpoint `step` into a fresh folder, publish it by renaming, then point latest at it.

    The folder appears whole or not at all (rename), and latest.json moves only once it
    does; an interrupted save leaves the previous checkpoint in place.
    """
    final = out / checkpoint_name(step)
    tmp = out / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own half-written save from a killed run
    emage.save_checkpoint(model, tmp, variant=args.variant, step=step, tokenizer_path=tokenizer_path,
                          vqgan_dir=vqgan_dir, extra={"train_args": vars(args)})
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_states,
             "schedule": {"steps": args.steps, "lr": args.lr, "warmup": args.warmup}, "seed": args.seed}
    torch.save(state, tmp / "train_state.pt")
    if final.exists():
        shutil.rmtree(final)  # this run's own checkpoint of the same step (a resumed run saves it again)
    os.replace(tmp, final)
    write_json(out / "latest.json", {"step": step, "dir": final.name})
    link = out / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(final.name)
        os.replace(link, out / "latest")
    except OSError:
        pass  # symlinks are a convenience; latest.json is the record
    old = sorted(p for p in out.glob("step-*") if p.is_dir() and p.name != final.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p)
    return final


def find_resume(out: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    record = out / "latest.json"
    if not record.is_file():
        raise TrainError(f"--resume: {out} has no latest.json; pass the checkpoint directory, e.g. --resume {out}/step-0001000")
    try:
        latest = json.loads(record.read_text())
        name = latest["dir"]
        valid = isinstance(name, str) and re.fullmatch(r"step-\d{7,}", name) and isinstance(latest["step"], int)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        newest = sorted(p.name for p in out.glob("step-*") if (p / "train_state.pt").is_file())
        raise TrainError(f"{record} is damaged; pass a checkpoint directory, e.g. --resume {out / (newest or ['step-0001000'])[-1]}")
    return out / name


def read_train_state(resume_dir: Path, world: int) -> dict:
    """train_state.pt, weights-only, with every field checked before it is used."""
    path = resume_dir / "train_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, or a pickle holding more than tensors: all fail differently
        raise TrainError(f"{path} cannot be read as a weights-only file ({type(e).__name__}); "
                         "resume from another checkpoint") from None
    ok = (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("optimizer"), dict)
          and isinstance(state.get("rng"), list) and isinstance(state.get("schedule"), dict)
          and isinstance(state["schedule"].get("steps"), int))
    if not ok:
        raise TrainError(f"{path} lacks step, optimizer, rng or schedule; resume from another checkpoint")
    return state


class MetricsLog:
    """metrics.jsonl, written by rank 0: truncated to the resumed step (a torn last line from a
    kill mid-write is dropped), then appended to and flushed record by record."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.file, self.path = None, path
        if not enabled:
            return
        if resume_step is not None and path.is_file():
            write_text(path, "".join(line + "\n" for line in self._kept(path, resume_step)))
        self.file = open(path, "a")

    @staticmethod
    def _kept(path: Path, step: int):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
                yield line

    def records(self) -> list[dict]:
        """Every record written so far (those kept from before a resume included)."""
        if self.file is None:
            return []
        return [json.loads(line) for line in self._kept(self.path, 2**63)]

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def finished_step(out: Path) -> int:
    try:
        return int(json.loads((out / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
