"""train.py: the learning-rate schedule, a falling loss, exact resume, DDP = one process,
clean stops on signals and on a diverged loss, and token shards from `prepare` training."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import emage
import extensions
import train
import vqgan

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "width=32", "--set", "layers=1", "--set", "heads=2", "--set", "text.width=32",
        "--set", "text.heads=2", "--set", "text.layers=1", "--set", "text.embed_dim=32"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and the CI CPU may be shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """160 shapes examples tokenised by a random 32x32 -> 4x4 VQGAN with 32 codes."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    config = vqgan.VQGANConfig(resolution=32, ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                               z_channels=8, embed_dim=8, n_embed=32, quantizer="vector", norm_groups=4)
    model = vqgan.VQGAN(config)
    with torch.no_grad():  # spread the codebook so that the images use many codes
        model.quantize.embedding.weight.normal_()
    vqgan.save_vqgan(model, root / "vqgan")
    data.prepare(data.ShapesSource(160, seed=0), root / "vqgan", root / "tokens", shard_size=64, progress=False)
    return root


def run(shards, out, *extra, steps=4, variant="3", batch=8):
    args = ["--data", str(shards / "tokens"), "--vqgan", str(shards / "vqgan"), "--out", str(out), "--variant", variant,
            "--steps", str(steps), "--batch-size", str(batch), "--log-every", "1", "--eval-every", "1000", *TINY, *extra]
    return train.main(args)


def weights(checkpoint_dir):
    return load_file(str(Path(checkpoint_dir) / "model.safetensors"))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    total, base = 1000, 4.5e-4  # warm-up = 2 % = 20 steps
    assert train.lr_at(0, total, base) == pytest.approx(base / 20)
    assert train.lr_at(19, total, base) == pytest.approx(base)
    assert train.lr_at(20, total, base) == pytest.approx(base)
    assert train.lr_at(20 + 490, total, base) == pytest.approx(base / 2)  # halfway through the cosine
    assert train.lr_at(999, total, base) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 979 / 980)))
    assert train.lr_at(1000, total, base) == 0.0


def test_a_constant_schedule_keeps_the_peak_after_the_same_warm_up():
    total, base = 1000, 1e-3
    assert train.lr_at(0, total, base, schedule="constant") == train.lr_at(0, total, base)
    assert [train.lr_at(s, total, base, schedule="constant") for s in (20, 500, 999, 5000)] == [base] * 4


@pytest.mark.parametrize("history, min_steps, expected", [
    ([(500, 0.1), (1000, 0.3), (1500, 0.31), (2000, 0.32)], 0, True),  # the second half is steps 1500 and 2000
    ([(500, 0.1), (1000, 0.3), (1500, 0.31), (2000, 0.34)], 0, False),  # 0.34 beats 0.3 by more than its 0.030 SE
    # #1 of the plateau suite at step 4,000: rising 0.033 -> 0.054 in steps below one SE (0.0145 at 0.05)
    ([(500, .004), (1000, 0), (1500, .033), (2000, .033), (2500, .042), (3000, .050), (3500, .054), (4000, .054)], 0, False),
    ([(s, 0.30) for s in range(500, 4001, 500)], 0, True),  # flat
    ([(s, 0.30) for s in range(500, 4001, 500)], 4500, False),  # flat, but before the fewest steps
    ([(s, 0.30) for s in range(500, 3501, 500)] + [(4000, 0.32)], 0, True),  # within one SE (0.0296 on 240)
    ([(s, 0.30) for s in range(500, 3501, 500)] + [(4000, 0.34)], 0, False),
    ([(s, 0.0) for s in range(500, 3501, 500)] + [(4000, 1 / 240)], 0, True),  # p = 0: the SE floor is 1/count
    ([(s, 0.0) for s in range(500, 3501, 500)] + [(4000, 2 / 240)], 0, False),
    ([], 0, False),
])
def test_the_plateau_rule(history, min_steps, expected):
    assert train.plateaued(history, 240, min_steps) is expected


def test_until_plateau_stops_at_the_plateau_and_says_so_in_the_metrics(shards, tmp_path, capsys):
    out = tmp_path / "run"  # an untrained tiny model scores 0 on every evaluation: flat from the start
    assert run(shards, out, "--eval-every", "2", "--eval-captions", "4", "--until-plateau", "4",
               "--lr-schedule", "constant", "--eval-temperature", "0.7", steps=40, variant="1") == 0
    records = metrics(out)
    assert [r["step"] for r in records if "accuracy_all" in r] == [2, 4]
    assert records[-1] == {"step": 4, "plateau": True}
    assert json.loads((out / "latest.json").read_text())["step"] == 4
    captured = capsys.readouterr()
    assert "plateaued" in captured.err + captured.out
    assert run(shards, tmp_path / "other", "--until-plateau", "-1") == 1
    assert "--until-plateau" in capsys.readouterr().err


def test_weight_decay_skips_biases_and_norms():
    model = emage.Emage(emage.EmageConfig.shapes())
    decay, no_decay = train.param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_tiny_run_learns_and_writes_its_outputs(shards, tmp_path):
    out = tmp_path / "run"
    assert run(shards, out, "--lr", "3e-3", "--eval-every", "30", "--eval-captions", "4", steps=30, variant="1", batch=16) == 0
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses  # log(32) = 3.47 at the start
    cpu = [m["cpu_s"] for m in metrics(out) if "loss" in m]  # what a killed run had cost (paper_experiments)
    assert cpu[0] > 0 and cpu == sorted(cpu)
    assert (out / "samples" / "step-0000030.png").is_file()
    assert any("accuracy_all" in m for m in metrics(out))  # shapes accuracy of the evaluation captions
    model, info = emage.load_checkpoint(out / "latest")
    assert info["step"] == 30 and info["variant"] == 1 and model.config.grid == (4, 4)
    assert Path(info["vqgan_dir"]) == (shards / "vqgan").resolve()
    state = torch.load(out / "step-0000030" / "train_state.pt", weights_only=True)
    assert state["step"] == 30 and state["optimizer"]["state"]


def test_resume_repeats_an_uninterrupted_run_exactly(shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(shards, a, "--save-every", "2", "--keep", "3") == 0  # 4 steps, checkpoints at 2 and 4
    assert run(shards, b, "--resume", str(a / "step-0000002")) == 0  # 2 more steps from step 2
    wa, wb = weights(a / "step-0000004"), weights(b / "step-0000004")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], weights(a / "step-0000002")[k]) for k in wa)  # it did train
    assert [m["step"] for m in metrics(b) if "loss" in m] == [3, 4]


def test_resume_latest_continues_in_place_and_drops_stale_metrics(shards, tmp_path):
    out = tmp_path / "run"
    assert run(shards, out, "--save-every", "2", steps=3) == 0  # checkpoints at 2 and 3
    (out / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-0000002"}))  # as if killed after step 2
    assert run(shards, out, "--resume", steps=3) == 0
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3]
    assert json.loads((out / "latest.json").read_text())["step"] == 3


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Masks are drawn per micro-batch, so one process accumulates the two halves that two ranks compute.
    assert run(shards, one, "--grad-accum", "2", steps=3) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "train.py"), "--data", str(shards / "tokens"), "--vqgan", str(shards / "vqgan"), "--out", str(two),
           "--variant", "3", "--steps", "3", "--batch-size", "8", "--log-every", "1", "--eval-every", "1000",
           "--threads", "1", *TINY]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    w1, w2 = weights(one / "step-0000003"), weights(two / "step-0000003")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0, msg=k)
    losses1, losses2 = ([m["loss"] for m in metrics(d) if "loss" in m] for d in (one, two))
    assert losses1 == pytest.approx(losses2, abs=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(shards, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(shards / "tokens"), "--vqgan", str(shards / "vqgan"),
           "--out", str(out), "--steps", "100000", "--batch-size", "8", "--log-every", "1", "--eval-every", "100000",
           "--threads", "1", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in err and "Traceback" not in err
    latest = json.loads((out / "latest.json").read_text())
    model, info = emage.load_checkpoint(out / latest["dir"])
    assert info["step"] == latest["step"] >= 1


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(shards, out, "--lr", "1e30", "--save-every", "1", "--warmup", "0", steps=6, variant="1") == 1
    err = capsys.readouterr().err.strip().split("\n")[-1]  # after the progress bar
    assert err.startswith("error: ") and "non-finite at step 2" in err
    latest = json.loads((out / "latest.json").read_text())
    assert latest["dir"] in err  # the message names the checkpoint to resume from
    state = weights(out / latest["dir"])
    assert all(torch.isfinite(t).all() for t in state.values())


def test_user_errors_are_one_line(shards, tmp_path, capsys):
    assert run(shards, tmp_path / "r", "--grad-accum", "2", batch=7) == 1
    assert capsys.readouterr().err.startswith("error: --batch-size 7 must be a multiple")
    assert train.main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 1
    assert "no meta.json" in capsys.readouterr().err
    assert run(shards, tmp_path / "r3", "--set", "nonsense=1") == 1
    assert "no such field" in capsys.readouterr().err


def test_text_init_loads_clip_weights_into_the_text_encoder(shards, tmp_path):
    import clip_text

    config = clip_text.TextConfig(vocab_size=clip_text.Tokenizer(train.SHAPES_BPE).vocab_size,
                                  context_length=24, width=32, heads=2, layers=2, embed_dim=16)
    torch.manual_seed(1)
    clip = clip_text.TextEncoder(config)
    clip_text.save_clip_text(clip, tmp_path / "clip")
    args = train.build_parser().parse_args(["--data", str(shards / "tokens"), "--text-init", str(tmp_path / "clip"),
                                            "--set", "width=32", "--set", "layers=1", "--set", "heads=2"])
    train.resolve_args(args)
    model = train.build_model(args, clip_text.Tokenizer(train.SHAPES_BPE), data.TokenShards(shards / "tokens"))
    assert model.config.text == config
    loaded, saved = model.text_encoder.state_dict(), clip.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_bf16_autocast_trains(shards, tmp_path):
    out = tmp_path / "run"
    assert run(shards, out, "--dtype", "bf16", steps=3) == 0
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_shapes_default_tokenises_once_then_reuses_the_cache(shards, tmp_path, capsys):
    cache = tmp_path / "shapes-tokens"
    common = ["--recipe", "none", "--vqgan", str(shards / "vqgan"), "--shapes-cache", str(cache), "--shapes-examples", "40",
              "--steps", "1", "--batch-size", "4", "--eval-every", "1000", *TINY]
    assert train.main(["--out", str(tmp_path / "a"), *common]) == 0
    assert data.TokenShards(cache).meta["source"] == "shapes(num=40, seed=0, align=8, jitter=False)"  # the demo's renders
    stamp = (cache / "meta.json").stat().st_mtime_ns
    assert train.main(["--out", str(tmp_path / "b"), *common]) == 0
    assert (cache / "meta.json").stat().st_mtime_ns == stamp  # not tokenised again
    capsys.readouterr()
    assert train.main(["--out", str(tmp_path / "c"), *common, "--shapes-examples", "41"]) == 1
    assert "match --shapes-examples" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path / "d"), *common, "--shapes-align", "1", "--shapes-jitter"]) == 1
    assert "shapes(num=40, seed=0)" in capsys.readouterr().err  # SHAPES.md's free placement is another set


def test_init_fine_tunes_from_a_checkpoint_with_a_fresh_schedule_and_new_training_fields(shards, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert run(shards, base, steps=2) == 0
    assert run(shards, tuned, "--init", str(base / "latest"), "--set", "mirror_loss=1.0", "--seed", "1", steps=2) == 0
    model, info = extensions.load_checkpoint(tuned / "latest")
    assert info["step"] == 2 and model.beyond.mirror_loss == 1.0  # a new run of 2 steps, not steps 3 and 4
    start, end = weights(base / "latest"), weights(tuned / "latest")
    assert start.keys() == end.keys() and not all(torch.equal(start[k], end[k]) for k in start)
    state = torch.load(tuned / "step-0000002" / "train_state.pt", weights_only=True)
    assert state["schedule"]["steps"] == 2


def test_init_errors_are_one_line(shards, tmp_path, capsys):
    assert run(shards, tmp_path / "base", steps=1) == 0
    checkpoint = str(tmp_path / "base" / "latest")
    assert run(shards, tmp_path / "a", "--init", checkpoint, "--set", "width=64") == 1
    assert "--set changes the shape" in capsys.readouterr().err
    assert run(shards, tmp_path / "b", "--init", checkpoint, "--resume") == 1
    assert "pass one" in capsys.readouterr().err
    assert run(shards, tmp_path / "c", "--init", checkpoint, variant="1") == 1
    assert "not --variant 1" in capsys.readouterr().err
    assert run(shards, tmp_path / "d", "--set", "mirror_loss=1.0", variant="1") == 1
    assert "works on variant 3" in capsys.readouterr().err


def test_contrast_tokens_are_the_mirrored_captions_only_when_the_mirror_loss_is_on():
    import clip_text

    tokenizer = clip_text.Tokenizer(train.SHAPES_BPE)
    captions = ["a red circle to the left of a blue square", "a small green triangle", "any other text"]
    assert extensions.Beyond().batch_inputs(captions, tokenizer, 24) == {}
    got = extensions.Beyond(mirror_loss=1.0).batch_inputs(captions, tokenizer, 24)["contrast_tokens"]
    expected = tokenizer(["a red circle to the right of a blue square", *captions[1:]], context_length=24)
    assert torch.equal(got, expected)


RECIPE = """
[[stage]]
name = "first"
steps = 2
lr = 1e-3

[[stage]]
name = "second"
variants = [3]
init = "first"
steps = 2
set = ["mirror_loss=1.0"]
"""


def test_a_recipe_runs_its_stages_then_skips_them_and_resumes_an_interrupted_one(shards, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    argv = ["--recipe", str(recipe), "--data", str(shards / "tokens"), "--vqgan", str(shards / "vqgan"),
            "--out", str(tmp_path / "runs"), "--batch-size", "8", "--eval-every", "1000", *TINY]
    assert train.main(argv) == 0
    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    model, info = extensions.load_checkpoint(second / "latest")
    assert info["step"] == 2 and model.beyond.mirror_loss == 1.0
    assert info["extra"]["train_args"]["init"] == str(first / "step-0000002")  # stage 2 starts from stage 1
    assert [m["lr"] for m in metrics(first) if "lr" in m] == [pytest.approx(1e-3)]  # the recipe's lr, not the preset's
    stamp = (second / "latest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert train.main(argv) == 0  # again: both finished, nothing retrained
    assert (second / "latest.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err.count("finished already") == 2
    assert train.main(argv + ["--variant", "1", "--out", str(tmp_path / "v1")]) == 0  # stage 2 is for variant 3 only
    assert (tmp_path / "v1" / "first" / "latest.json").is_file() and not (tmp_path / "v1" / "second").exists()


def test_a_recipe_with_an_unknown_key_is_a_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[[stage]]\nlearning_rate = 1\n")
    assert train.main(["--recipe", str(recipe)]) == 1
    assert "learning_rate" in capsys.readouterr().err
    recipe.write_text("steps = [")
    assert train.main(["--recipe", str(recipe)]) == 1
    assert "not valid TOML" in capsys.readouterr().err


def test_a_fresh_run_never_starts_over_an_earlier_one_and_a_live_lock_refuses_a_second_writer(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(shards, out, steps=2) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run(shards, out, steps=4) == 1  # no --resume: refused, nothing touched
    assert "holds an earlier run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(),
                                                 "since": "now"}))
    assert run(shards, busy, steps=1) == 1  # a live holder (this very process)
    assert f"process {os.getpid()}" in capsys.readouterr().err
    (busy / "train.lock").write_text('{"pid": 99999999, "ho')  # torn by a kill: stale, taken over
    assert run(shards, busy, steps=1) == 0
    assert not (busy / "train.lock").exists()


def test_a_torn_last_metrics_line_does_not_stop_resume(shards, tmp_path):
    out = tmp_path / "run"
    assert run(shards, out, "--save-every", "2", steps=2) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a kill in the middle of a write
    assert run(shards, out, "--resume", steps=3) == 0
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3]


def test_list_fields_names_every_set_field(capsys):
    assert train.main(["--list-fields"]) == 0
    out = capsys.readouterr().out
    for name in ("width", "pass1_keep_seen", "text.layers", "colours", "object_mask", "mirror_loss"):
        assert f"  {name} " in out


def test_changing_the_text_tower_that_text_init_loads_is_a_one_line_error(shards, tmp_path, capsys):
    import clip_text

    config = clip_text.TextConfig(vocab_size=clip_text.Tokenizer(train.SHAPES_BPE).vocab_size,
                                  context_length=24, width=32, heads=2, layers=2, embed_dim=16)
    clip_text.save_clip_text(clip_text.TextEncoder(config), tmp_path / "clip")
    assert run(shards, tmp_path / "r", "--text-init", str(tmp_path / "clip"), "--set", "text.layers=1") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers=2" in err and "layers=1" in err
