"""The benchmarks' analytic FLOPs against a FLOP counter, the extrapolation fit, and the CLIs."""
import json

import numpy as np
import pytest
import torch

import shapes
from benchmarks import latency, mirror_probe, train_speed, train_step
from benchmarks.flops import counted_flops
from emage import Emage, EmageConfig


def tiny_config() -> EmageConfig:
    c = EmageConfig.shapes(codebook_size=32, grid=(3, 4))
    c.text.layers, c.text.width, c.text.heads, c.text.embed_dim = 2, 32, 2, 16
    c.width, c.layers, c.heads = 48, 2, 3
    return c


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    c = tiny_config()
    tokens = latency.text_tokens(c, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    return Emage(c).eval(), tokens


def masked_pairs_flops(c: EmageConfig, S: int, width: int, layers: int) -> int:
    """What the counter adds for a causal pass of S tokens: the S(S-1)/2 masked pairs."""
    return layers * 4 * width * (S * S - S * (S + 1) // 2)


def test_text_flops_match_counter(tiny):
    model, tokens = tiny
    c, L = model.config, tokens.shape[1]
    expected = latency.text_flops(c, L) + masked_pairs_flops(c, L, c.text.width, c.text.layers)
    assert counted_flops(lambda: model.encode_text(tokens)) == 2 * expected  # batch of 2


@pytest.mark.parametrize("loop", ["full", "t4"])
def test_nar_loop_flops_match_counter(tiny, loop):
    model, tokens = tiny
    c, L = model.config, tokens.shape[1]
    text_extra = masked_pairs_flops(c, L, c.text.width, c.text.layers)
    algorithm = "full" if loop == "full" else 3
    counted = counted_flops(lambda: model.generate(tokens, steps=latency.loop_steps(loop), algorithm=algorithm))
    assert counted == 2 * (latency.loop_flops(c, loop, L) + text_extra)


def test_ar_loop_flops_match_counter(tiny):
    model, tokens = tiny
    c, L = model.config, tokens.shape[1]
    text_extra = masked_pairs_flops(c, L, c.text.width, c.text.layers)
    cached = counted_flops(lambda: model.generate(tokens, algorithm="ar"))
    assert cached == 2 * (latency.loop_flops(c, "ar-kv", L) + text_extra)  # one query over i + 1 keys: exact
    uncached = counted_flops(lambda: model.generate(tokens, algorithm="ar", use_cache=False))
    masked = sum(masked_pairs_flops(c, S, c.width, c.layers) for S in range(1, c.n + 1))
    assert uncached == 2 * (latency.loop_flops(c, "ar", L) + text_extra + masked)


@pytest.mark.parametrize("variant", ["full", 1, 3, "ar"])
def test_train_flops_match_counter_with_backward(tiny, variant):
    model, tokens = tiny
    c, L = model.config, tokens.shape[1]
    images = torch.randint(0, c.codebook_size, (2, c.n), generator=torch.Generator().manual_seed(0))
    model.train()
    try:
        fn = lambda: model.loss(tokens, images, variant, generator=torch.Generator().manual_seed(0)).backward()  # noqa: E731
        counted = counted_flops(fn)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    masked = masked_pairs_flops(c, L, c.text.width, c.text.layers)  # the counter sees causal pairs too
    if variant == "ar":
        masked += masked_pairs_flops(c, c.n, c.width, c.layers)
    pooled_backward = 2 * 2 * c.text.width * c.text.embed_dim  # the pooled projection is not in the loss
    assert counted == 2 * (train_speed.train_flops(c, variant, L) + 3 * masked - pooled_backward)  # backward = 2x forward


def test_quadratic_fit_is_exact_on_a_quadratic():
    a, b, c = latency.fit_quadratic([1, 4, 7, 10], [2 + 3 * x + 0.5 * x * x for x in [1, 4, 7, 10]])
    assert (a, b, c) == pytest.approx((2, 3, 0.5))


def test_latency_cli_measures_and_extrapolates(tmp_path, capsys):
    out = tmp_path / "latency.json"
    args = ["--preset", "shapes", "--batch", "1", "--loops", "t4", "full", "ar", "--runs", "1", "--threads", "1", "--peak-size", "256"]
    assert latency.main(args + ["--max-loop-seconds", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    status = {r["loop"]: r["status"] for r in data["results"]}
    assert status == {"t4": "extrapolated", "full": "measured", "ar": "extrapolated"}
    for r in data["results"]:
        assert r["seconds"] > 0 and 0 < r["mfu"] < 2 and r["flops_per_image"] > 0
    assert "extrapolated" in capsys.readouterr().out


def test_train_step_cli(tmp_path):
    out = tmp_path / "train.json"
    args = ["--preset", "shapes", "--variants", "1", "3", "--batch", "2", "--steps", "1", "--warmup", "1"]
    assert train_step.main(args + ["--threads", "1", "--peak-size", "256", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == [1, 3]
    assert rows[1]["train_flops_per_step"] > rows[0]["train_flops_per_step"]  # #3 adds the no-grad pass 1
    assert all(r["image_tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows)


def test_latency_cli_rejects_a_missing_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert latency.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_mirror_probe_pictures_differ_only_in_which_object_stands_where():
    for i, caption in enumerate(mirror_probe.two_object_captions(30)):
        assert not shapes.is_novel(caption) and caption.objects[0].size == caption.objects[1].size
        boxes = shapes.layout(caption, i, align=8, jitter=False)
        true, mirror = shapes.draw(caption.objects, boxes), shapes.draw(caption.objects[::-1], boxes)
        assert np.array_equal(np.asarray(true), np.asarray(shapes.render(caption, i, align=8, jitter=False)))
        assert shapes.score(true, caption) and not shapes.score(mirror, caption)
        assert shapes.score(mirror, shapes.Caption(caption.objects, shapes.OPPOSITE[caption.relation]))


def test_text_probe_labels_name_the_left_or_upper_colour():
    captions, labels = mirror_probe.order_captions(200)
    for caption, label in zip(captions, labels.tolist()):
        parsed = shapes.parse(caption)
        boxes = shapes.layout(parsed, 0)
        axis = 0 if parsed.relation in ("to the left of", "to the right of") else 1
        centres = [b.centre[axis] for b in boxes]
        first = min(range(2), key=lambda i: centres[i])  # the left or upper object, as rendered
        assert list(shapes.COLORS)[label] == parsed.objects[first].color


def test_ridge_probe_reads_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (1200,), generator=g)
    code = torch.nn.functional.one_hot(labels, 6).float() + 0.2 * torch.randn(1200, 6, generator=g)
    noise = torch.randn(1200, 40, generator=g)
    assert mirror_probe.ridge_probe(torch.cat([code, noise], 1), labels, 1000) > 0.95
    assert mirror_probe.ridge_probe(noise, labels, 1000) < 0.3  # chance is 1/6


def test_the_shipped_demo_places_both_axes_by_the_caption():
    """The mirror test split by axis: the demo before the mirror loss preferred the true
    picture to its left-right mirror for only 0.570 of captions (README, "The mirror loss")."""
    import sample

    torch.set_num_threads(1)
    pipe = sample.Pipeline.load(sample.DEMO_CHECKPOINT, "cpu")
    rows = {row["axis"]: row for row in mirror_probe.mirror_test(pipe, fractions=(1.0,), count=60, draws=1)}
    assert rows.keys() == {"all", "left / right", "above / below"}
    assert rows["left / right"]["prefers_true"] > 0.9 and rows["above / below"]["prefers_true"] > 0.9
    assert rows["left / right"]["gap"] > 10  # nats


def test_paper_suite_smoke_trains_evaluates_reports_and_resumes_without_retraining(tmp_path, capsys):
    """`paper_experiments.py all --smoke`: six models a few steps each on 96 examples, to their
    (trivial) plateau, then accuracy, latency, tables and curves; a second run redoes nothing."""
    from benchmarks import paper_experiments

    runs, out = tmp_path / "runs", tmp_path / "docs"
    argv = ["all", "--smoke", "--jobs", "2", "--runs", str(runs), "--out", str(out)]
    assert paper_experiments.main(argv) == 0
    table3 = json.loads((out / "table3.json").read_text())
    assert [row["model"] for row in table3] == ["fully NAR", "#1", "#3", "autoregressive"]
    for row in table3:
        assert row["all"]["count"] == 8 and 0 <= row["all"]["accuracy"] <= 1
        assert row["latency_b1_s"] > 0 and row["latency_b16_s"] > 0 and row["cpu_s"] > 0
        assert row["plateau_step"] in (2, 4, 6) and row["train_flops_per_step"] > 0
        assert row["second_half"]["evaluations"] >= 1 and 0 <= row["second_half"]["mean"] <= 1
    assert [(r["model"], r["T"]) for r in json.loads((out / "table6.json").read_text())] == \
        [(m, t) for m in ("#3", "#1") for t in (1, 2, 4, 8, 16, 32)]
    batch16 = json.loads((out / "batch16.json").read_text())
    assert [r["T"] for r in batch16["rows"]] == [1, 2, 4, 8, 16, 32] and batch16["ar"]["seconds"] > 0
    for r in batch16["rows"]:
        assert r["speedup"] == pytest.approx(batch16["ar"]["seconds"] / r["seconds"])
        assert r["at_least_ar"] == (r["accuracy"] - batch16["ar"]["accuracy"] >= -r["se"])
    assert "cached autoregressive loop at batch 16" in (out / "tables.md").read_text()
    assert [(r["train"], r["inference"]) for r in json.loads((out / "schedules.json").read_text())] == \
        [("linear", "linear"), ("linear", "cosine")]  # the cosine-trained model is not in the smoke set
    table5 = json.loads((out / "table5.json").read_text())
    assert [(r["tower"], r["model"]) for r in table5["rows"]] == [("random", "#1"), ("random", "autoregressive"),
                                                                 ("CLIP-style, contrastive", "#1"),
                                                                 ("BERT, masked-language modelling", "#1")]
    assert "masked_word_accuracy_novel" in table5["towers"]["bert"]["report"] and table5["towers"]["clip"]["report"]
    for name in ("curves_step.png", "curves_flops.png", "curves_towers.png", "samples.png"):
        assert (out / name).stat().st_size > 1000
    grid = json.loads((runs / "v3-s0" / "grid.json").read_text())  # one picture row per plateau model
    assert grid["step"] == table3[2]["plateau_step"] and len(grid["passed"]) == len(grid["captions"]) >= 2
    assert all((runs / "v3-s0" / "grid" / name).is_file() for name in grid["images"])
    assert "samples.png" in (out / "tables.md").read_text()
    matched = json.loads((out / "matched.json").read_text())
    assert list(matched) == ["fully NAR, seed 0", "#1, seed 0", "#3, seed 0", "autoregressive, seed 0"]
    assert all(cell is None for cells in matched.values() for cell in cells)  # six steps reach no window
    segments = {m: json.loads((runs / m / "segments.json").read_text()) for m in paper_experiments.SMOKE_MODELS}
    assert all(x["exit"] == 0 and x["cpu_s"] > 0 for run in segments.values() for x in run)  # closed when they returned
    capsys.readouterr()
    assert paper_experiments.main(argv) == 0  # everything is there: nothing is trained again
    assert {m: json.loads((runs / m / "segments.json").read_text()) for m in segments} == segments
    assert paper_experiments.main(["status", "--smoke", "--runs", str(runs)]) == 0
    assert capsys.readouterr().out.count("evaluated") == 6
    (out / "latency.json").unlink()
    assert paper_experiments.main(["latency", "--smoke", "--only", "v3-s0", "--runs", str(runs), "--out", str(out)]) == 0
    timed = json.loads((out / "latency.json").read_text())["seconds_per_image"]
    assert sorted(timed) == ["v3-s0"] and len(timed["v3-s0"]) == 12  # batch 1 and 16 x Table 6's rounds
    only = (out / "tables.md").read_text()  # --only v3-s0: the tables of the other runs are left out
    assert "## Table 6" in only and "## Table 5" not in only and "curves_step.png" in only and "curves_towers" not in only


def test_frontier_times_evaluated_settings_and_chooses_the_fastest_within_one_se(tmp_path, capsys):
    """benchmarks/frontier.py --no-evaluate on two stored evaluations: timed, tabled, plotted; the
    cheaper setting is chosen only while it is within one standard error of the better one."""
    from benchmarks import frontier

    runs, out = tmp_path / "runs", tmp_path / "docs"
    runs.mkdir()

    def report(seen, novel):
        return {"seen": {"accuracy": seen, "count": 320}, "novel": {"accuracy": novel, "count": 160},
                "all": {"accuracy": (2 * seen + novel) / 3, "count": 480}}

    (runs / "c1-t16.json").write_text(json.dumps(report(0.70, 0.55)))
    (runs / "c2-t8.json").write_text(json.dumps(report(0.68, 0.55)))
    assert frontier.main(["--runs", str(runs), "--out", str(out), "--no-evaluate", "--repeats", "1", "--threads", "1"]) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert [(r["candidates"], r["rounds"]) for r in result["rows"]] == [(1, 16), (2, 8)]
    assert all(r["seconds"] > 0 for r in result["rows"])
    fastest = min(result["rows"], key=lambda r: r["seconds"])
    assert result["chosen"] == {"candidates": fastest["candidates"], "rounds": fastest["rounds"]}  # 0.02 apart: within
    assert (out / "frontier.png").stat().st_size > 1000 and "(chosen)" in (out / "frontier.md").read_text()

    rows = [{**report(0.98, 0.84), "seconds": 0.4}, {**report(0.95, 0.75), "seconds": 0.2}]
    assert frontier.choose(rows) is rows[0]  # 0.09 novel apart: outside one standard error
    rows[1].update(report(0.975, 0.83))
    assert frontier.choose(rows) is rows[1]


def test_paper_suite_times_a_finished_run_at_its_plateau_and_a_running_one_at_its_latest_step(tmp_path):
    from benchmarks import paper_experiments

    run = tmp_path / "v3-s0"
    run.mkdir()
    (run / "latest.json").write_text(json.dumps({"step": 9000, "dir": "step-0009000"}))
    (run / "min_steps.json").write_text("8000")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 8500, "accuracy_all": 0.2}) + "\n")
    assert paper_experiments.trained(run) is None and paper_experiments.timed_step(run) == 9000
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 8500, "plateau": True}) + "\n")
    assert paper_experiments.trained(run) == 8500 and paper_experiments.timed_step(run) == 8500


def test_paper_suite_closes_a_segment_its_killed_suite_left_open_at_the_last_record(tmp_path):
    from benchmarks import paper_experiments

    run = tmp_path / "v1-s0"
    run.mkdir()
    t0 = 1_800_000_000.0
    records = [{"step": 10, "time": t0 - 50, "cpu_s": 9.0},  # an earlier segment's
               {"step": 20, "time": t0 + 30, "cpu_s": 25.0}, {"step": 30, "time": t0 + 70, "cpu_s": 61.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    finished = {"started": "a", "finished": "b", "wall_s": 5.0, "cpu_s": 4.0, "exit": 0}
    (run / "segments.json").write_text(json.dumps([finished, {"started": "c", "started_at": t0}]))
    cost = paper_experiments.run_cost(run)
    assert cost["wall_s"] == pytest.approx(75.0) and cost["cpu_s"] == pytest.approx(65.5)
    assert len(cost["ran"]) == 2 and cost["ran"][0] == "a - b"
    closed = paper_experiments.close_segment({"started": "c", "started_at": t0}, run)
    assert closed["exit"] == "interrupted" and closed["finished"].endswith("UTC")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 20, "time": t0 + 40}) + "\n")  # no cpu_s: one thread's wall
    assert paper_experiments.close_segment({"started": "c", "started_at": t0}, run)["cpu_s"] == pytest.approx(40.0)
    assert paper_experiments.close_segment({"started": "c", "started_at": t0 + 100}, run)["wall_s"] == 0.0


def test_paper_suite_second_half_averages_the_evaluations_the_stopping_rule_judged_flat(tmp_path):
    from benchmarks import paper_experiments

    run = tmp_path / "v1-s0"
    run.mkdir()
    # the first half ends at 1,000 (train.plateaued's split); 2,500 comes after the plateau step
    evaluations = {500: 0.9, 1000: 0.1, 1500: 0.2, 1750: 0.3, 2000: 0.4, 2500: 0.7}
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "accuracy_all": v}) + "\n"
                                               for k, v in evaluations.items()) + json.dumps({"step": 2000, "loss": 1.0}))
    flat = paper_experiments.second_half(run, 2000)
    assert flat["evaluations"] == 3 and flat["mean"] == pytest.approx(0.3)
    assert flat["se"] == pytest.approx(0.1 / np.sqrt(3))
    assert paper_experiments.second_half(run, 500)["mean"] == pytest.approx(0.9)
    assert paper_experiments.second_half(run, 500)["se"] is None


def test_paper_suite_compares_the_variants_seed_by_seed(tmp_path):
    """Table 3 under two seeds: the gaps #3 - #1 and AR - #3 are taken within a seed, and a
    seed not finished leaves its cell and its gaps out rather than counting as zero."""
    from benchmarks import paper_experiments

    s = paper_experiments.Settings(runs=tmp_path, out=tmp_path / "docs")
    state = {}
    for name, level in {"v1-s0": 0.1, "v3-s0": 0.3, "ar-s0": 0.35, "v1-s1": 0.2, "v3-s1": 0.25}.items():
        (tmp_path / name).mkdir()
        records = [{"step": step, "accuracy_all": level + delta} for step, delta in ((1000, 0.5), (1500, 0.0), (2000, 0.02))]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        state[name] = {"step": 2000, "rows": {"T=16": {"all": {"accuracy": level, "count": 480}}}}
    result, text = paper_experiments.seeds_section(state, s)
    assert result["#3"][1]["all"] == 0.25 and result["#3"][1]["second_half"] == pytest.approx(0.26)
    assert "#3 - #1, seed 0: +0.200" in text and "#3 - #1, seed 1: +0.050" in text
    assert "autoregressive - #3, seed 0: +0.050" in text and "autoregressive - #3, seed 1" not in text
    assert "| #3 | 0.300 / 0.310 | 0.250 / 0.260 | 0.285 |" in text
    line = "wrote /some/where/towers/clip: retrieval_top1 0.23333333432674408, steps 1000, lr 0.003"
    assert paper_experiments.tidy(line) == "retrieval_top1 0.233, steps 1000, lr 0.003"


def test_paper_suite_reads_every_run_over_the_same_steps_and_leaves_out_windows_a_run_stopped_in(tmp_path):
    """Table 3 over matched steps: a window is averaged only for runs whose evaluations reached
    its end, and `matched` merges the curves of two reports into matched.json and matched.md."""
    from benchmarks import paper_experiments

    long_run = [(step, 0.2 if step <= 8000 else 0.4) for step in range(500, 16001, 500)]
    short_run = [(step, 0.1 + (step % 1000) / 10000) for step in range(500, 11001, 500)]
    result = paper_experiments.matched_steps({"a": long_run, "b": short_run})
    assert result["a"][0][0] == pytest.approx(0.2) and result["a"][1][0] == pytest.approx(0.4)
    assert result["a"][0][1] == pytest.approx(0.0) and [c[2] for c in result["a"]] == [8, 8, 8]
    assert result["b"][0][0] == pytest.approx(0.125) and result["b"][0][1] > 0
    assert result["b"][1] is None and result["b"][2] is None  # stopped at 11,000, before 12,000
    for name, curves in (("one", {"#3, seed 1": long_run}), ("two", {"#1, seed 1, to the cap": short_run,
                                                                     "#1, clip tower, seed 0": long_run})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "curves.json").write_text(json.dumps({k: {"step_accuracy": v} for k, v in curves.items()}))
    out = tmp_path / "out"
    assert paper_experiments.main(["matched", "--curves", str(tmp_path / "one" / "curves.json"),
                                   "--curves", str(tmp_path / "two" / "curves.json"), "--out", str(out)]) == 0
    merged = json.loads((out / "matched.json").read_text())
    assert list(merged) == ["#3, seed 1", "#1, seed 1, to the cap"]  # Table 3's runs only, in the suite's order
    assert "| #3, seed 1 | 0.200 ± 0.000 (8) | 0.400 ± 0.000 (8) |" in (out / "matched.md").read_text()
    assert (out / "matched_curves.png").stat().st_size > 1000
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a curves.json"):
        paper_experiments.main(["matched", "--curves", str(tmp_path / "bad.json"), "--out", str(out)])
