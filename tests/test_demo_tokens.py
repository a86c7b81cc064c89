"""The shipped demo draws the same tokens as before the paper's core and its extensions were
split apart: tests/data/demo_tokens.json was written by sample.Pipeline at commit bc3777e."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sample

CASES = json.loads((Path(__file__).parent / "data" / "demo_tokens.json").read_text())["cases"]


@pytest.fixture(scope="module")
def pipe():
    return sample.Pipeline.load()


@pytest.mark.parametrize("case", CASES[::2] + CASES[1:2], ids=lambda c: f"{c['prompt'][:24]}-{c['seed']}")
def test_demo_candidates_scores_and_choice_are_unchanged(pipe, case):
    tokens = pipe.generate(case["prompt"], seed=case["seed"], num_images=8, steps=16, temperature=0.7,
                           guidance_scale=1.5)
    assert tokens.tolist() == case["candidates"]
    scores = pipe.self_scores(case["prompt"], tokens, seed=case["seed"])
    np.testing.assert_allclose(scores, case["self_scores"], atol=2e-3)
    best = pipe.best_of(case["prompt"], 8, seed=case["seed"], temperature=0.7, guidance_scale=1.5)
    assert best[0].tolist() == case["best"]


def test_the_demo_is_loaded_with_its_extensions(pipe):
    assert pipe.model.beyond is not None and pipe.model.beyond.colours == 7
    assert torch.is_tensor(pipe.model.tok_emb.weight)  # the factored table materialises
