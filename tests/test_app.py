"""app.py, the browser demo, through HTTP: the page, a generation and an edit with their
rounds, every kind of bad request (a clear JSON message, never a traceback, and the server
keeps serving), the one-at-a-time lock under twenty concurrent requests, and main().

The server runs in this process on a free loopback port around the shipped shapes demo."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

import app
import sample
import shapes

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SEED = "a red circle", 0  # passes shapes.score with the default options


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core shared CPU: extra threads only spin
    yield sample.Pipeline.load(checkpoint=sample.DEMO_CHECKPOINT, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(pipe):
    srv = app.make_server(pipe, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def call(server, path, body=None, *, raw: bytes | None = None, method: str | None = None,
         content_type: str = "application/json", timeout: float = 60):
    """(status, headers, decoded JSON or text) of one request; HTTP errors are answers too."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, payload = error.code, error.headers, error.read()
    text = payload.decode("utf-8")
    assert "Traceback" not in text
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, headers, json.loads(text)
    return status, headers, text


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def alive(server) -> None:
    status, _, config = call(server, "/api/config")
    assert status == 200 and config["grid"] == [8, 8]


def test_page_and_config(server):
    status, headers, page = call(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'id="generate"' in page and 'id="round"' in page and "__CONFIG__" not in page
    status, _, config = call(server, "/api/config")
    assert status == 200
    assert config["defaults"] == {"seed": 0, "steps": 16, "guidance": sample.DEFAULT_GUIDANCE,
                                  "temperature": sample.DEFAULT_TEMPERATURE,
                                  "candidates": sample.DEFAULT_CANDIDATES, "schedule": "cosine"}
    assert config["limits"]["steps"] == [1, 1024] and config["limits"]["candidates"] == [1, 256]


def test_generate_shows_the_prompt_and_its_rounds(server, pipe):
    status, _, answer = call(server, "/api/generate", {"prompt": PROMPT, "seed": str(SEED)})
    assert status == 200, answer
    image = png(answer["image"])
    assert image.size == pipe.image_size[::-1]
    assert shapes.score(image.convert("RGB"), PROMPT)
    T, n, M = 16, 64, pipe.model.config.mask_id
    assert len(answer["history"]) == T and all(len(row) == n for row in answer["history"])
    assert answer["history"][-1] == answer["tokens"] and M not in answer["tokens"]
    assert answer["initial"] == [M] * n and answer["kept"] is None
    assert len(answer["frames"]) == T + 1  # round 0 (all masked) and after every round
    assert set(png(answer["frames"][0]).convert("RGB").getdata()) == {app.MASKED_GREY}
    masked = [sum(v == M for v in row) for row in answer["history"]]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert answer["seconds"] > 0 and answer["seed"] == str(SEED)
    # the very image sample.py would draw: Pipeline.best_of with the same options
    best = pipe.best_of(PROMPT, sample.DEFAULT_CANDIDATES, seed=SEED, steps=T, temperature=sample.DEFAULT_TEMPERATURE,
                        guidance_scale=sample.DEFAULT_GUIDANCE, schedule="cosine")
    assert best[0].tolist() == answer["tokens"]
    download = png(answer["download"])
    assert download.size == (image.width * app.DOWNLOAD_UPSCALE, image.height * app.DOWNLOAD_UPSCALE)
    parameters = json.loads(download.text["parameters"])
    assert parameters["prompt"] == PROMPT and parameters["seed"] == SEED and parameters["candidates"] == 8
    assert answer["filename"] == "a-red-circle-0.png"


def test_random_seed_and_edit_keep_the_unmarked_cells(server, pipe):
    status, _, first = call(server, "/api/generate", {"prompt": PROMPT, "seed": "random", "steps": 8,
                                                      "candidates": 2})
    assert status == 200 and first["random_seed"] and int(first["seed"]) >= 0
    cells = [[r, c] for r in range(2, 6) for c in range(5, 8)]
    body = {"prompt": "a blue square", "seed": 3, "steps": 8, "candidates": 2, "tokens": first["tokens"],
            "cells": cells}
    status, _, edit = call(server, "/api/edit", body)
    assert status == 200, edit
    redrawn = {r * 8 + c for r, c in cells}
    M = pipe.model.config.mask_id
    assert edit["kept"] == [i not in redrawn for i in range(64)]
    assert edit["initial"] == [M if i in redrawn else t for i, t in enumerate(first["tokens"])]
    for row in edit["history"]:  # kept cells never change, in any round
        assert all(row[i] == first["tokens"][i] for i in range(64) if i not in redrawn)
    assert edit["history"][-1] == edit["tokens"] and M not in edit["tokens"]
    parameters = json.loads(png(edit["download"]).text["parameters"])
    assert parameters["redraw_cells"] == cells and parameters["init_tokens"] == first["tokens"]
    # a pixel region selects the cells it touches (sample.region_pixels + cells_to_redraw)
    status, _, region = call(server, "/api/edit", dict(body, cells=None, region=[40, 16, 64, 48]))
    assert status == 200 and region["kept"] == edit["kept"]


GOOD = {"prompt": PROMPT, "seed": 0, "steps": 4, "candidates": 1}
TOKENS = [0] * 64
BAD = [  # (endpoint, body, status, words in the message)
    ("/api/generate", dict(GOOD, prompt=""), 400, "prompt is empty"),
    ("/api/generate", dict(GOOD, prompt="  \n "), 400, "prompt is empty"),
    ("/api/generate", dict(GOOD, prompt="a" * 100_000), 413, "too large"),
    ("/api/generate", dict(GOOD, prompt="a red circle " * 400), 400, "at most 1,000 are allowed"),
    ("/api/generate", dict(GOOD, prompt=7), 400, "prompt must be text"),
    ("/api/generate", dict(GOOD, steps="abc"), 400, "steps must be a whole number between 1 and 1024"),
    ("/api/generate", dict(GOOD, steps="2.5"), 400, "steps must be a whole number"),
    ("/api/generate", dict(GOOD, steps=0), 400, "steps must be between 1 and 1024"),
    ("/api/generate", dict(GOOD, steps=1025), 400, "steps must be between 1 and 1024"),
    ("/api/generate", dict(GOOD, guidance="nan"), 400, "guidance must be a finite number >= 0"),
    ("/api/generate", dict(GOOD, guidance="inf"), 400, "guidance must be a finite number >= 0"),
    ("/api/generate", dict(GOOD, guidance="lots"), 400, "guidance must be a number"),
    ("/api/generate", dict(GOOD, temperature=-0.5), 400, "temperature must be a finite number >= 0"),
    ("/api/generate", dict(GOOD, temperature=10**400), 400, "temperature must be a finite number >= 0"),
    ("/api/generate", dict(GOOD, candidates=0), 400, "candidates must be between 1 and 256"),
    ("/api/generate", dict(GOOD, candidates=257), 400, "candidates must be between 1 and 256"),
    ("/api/generate", dict(GOOD, candidates=True), 400, "candidates must be a whole number"),
    ("/api/generate", dict(GOOD, seed=-1), 400, "seed must be between 0 and"),
    ("/api/generate", dict(GOOD, seed=2**63), 400, "seed must be between 0 and"),
    ("/api/generate", dict(GOOD, seed="abc"), 400, 'or "random"'),
    ("/api/generate", dict(GOOD, schedule="square"), 400, "schedule must be one of cosine, linear"),
    ("/api/edit", dict(GOOD, tokens=TOKENS, cells=[[8, 0]]), 400, "outside the 8 x 8 token grid"),
    ("/api/edit", dict(GOOD, tokens=TOKENS, cells=[[0, -1]]), 400, "outside the 8 x 8 token grid"),
    ("/api/edit", dict(GOOD, tokens=TOKENS, region=[0, 0, 100, 8]), 400, "outside the 64 x 64 canvas"),
    ("/api/edit", dict(GOOD, tokens=TOKENS, cells=[]), 400, "no cell is marked"),
    ("/api/edit", dict(GOOD, tokens=TOKENS, cells=[[1, "x"]]), 400, "[row, column] pairs"),
    ("/api/edit", dict(GOOD, tokens=TOKENS[:10], cells=[[0, 0]]), 400, "tokens must be the result's token map"),
    ("/api/edit", dict(GOOD, tokens=[5000] * 64, cells=[[0, 0]]), 400, "tokens must be the result's token map"),
    ("/api/edit", dict(GOOD, cells=[[0, 0]]), 400, "generate an image first"),
    ("/api/edit", dict(GOOD, prompt="", tokens=TOKENS, cells=[[0, 0]]), 400, "prompt is empty"),
    ("/api/nope", GOOD, 404, "no such endpoint"),
]


@pytest.mark.parametrize("path, body, status, words", BAD, ids=[f"{i}-{b[3][:24]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_a_clear_message(server, path, body, status, words):
    got, _, answer = call(server, path, body)
    assert got == status and words in answer["error"], answer
    alive(server)


@pytest.mark.parametrize("raw, content_type, status, words", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"\xff\xfe", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b'{"prompt": "a red circle"}', "text/plain", 415, "Content-Type: application/json"),
    (b"x" * (app.MAX_BODY + 1), "application/json", 413, "too large"),
])
def test_malformed_bodies(server, raw, content_type, status, words):
    got, _, answer = call(server, "/api/generate", raw=raw, content_type=content_type)
    assert got == status and words in answer["error"], answer
    alive(server)


def test_wrong_methods_and_paths(server):
    assert call(server, "/api/generate")[0] == 405
    assert call(server, "/missing")[0] == 404
    status, _, answer = call(server, "/", method="PUT", raw=b"")
    assert status == 405 and "not supported" in answer["error"]
    alive(server)


def test_busy_while_another_request_runs(server):
    assert server.demo.lock.acquire(timeout=60)
    try:
        status, headers, answer = call(server, "/api/generate", GOOD)
        # the input is still checked first: a bad request gets its own message
        bad_status, _, bad = call(server, "/api/generate", dict(GOOD, steps=0))
    finally:
        server.demo.lock.release()
    assert status == 503 and answer["busy"] and "try again" in answer["error"] and headers["Retry-After"] == "1"
    assert bad_status == 400 and "steps" in bad["error"]
    assert call(server, "/api/generate", GOOD)[0] == 200


def test_twenty_concurrent_requests_are_all_answered(server):
    answers, barrier = [None] * 20, threading.Barrier(20)

    def one(i):
        barrier.wait()
        answers[i] = call(server, "/api/generate", {"prompt": PROMPT, "seed": i, "steps": 8, "candidates": 2})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 1
    for status, _, answer in answers:
        if status == 200:
            assert png(answer["image"]).size == (64, 64)
        else:
            assert answer["busy"] and "try again" in answer["error"]
    assert not server.demo.lock.locked()
    status, _, answer = call(server, "/api/generate", GOOD)
    assert status == 200 and len(answer["history"]) == 4


def test_an_internal_error_is_one_line_and_the_server_survives(server, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nwith a second line")

    monkeypatch.setattr(server.demo.pipe, "generate", broken)
    status, _, answer = call(server, "/api/generate", GOOD)
    assert status == 500 and "internal error (RuntimeError)" in answer["error"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert lines == ["app: POST /api/generate failed: RuntimeError: out of memory with a second line"]
    monkeypatch.undo()
    assert not server.demo.lock.locked()
    assert call(server, "/api/generate", GOOD)[0] == 200


def test_help_and_a_bad_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        app.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 127.0.0.1)" in out and "(default: 7860)" in out
    assert app.main(["--checkpoint", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load") and err.count("\n") == 1


def test_main_serves_on_the_address_it_prints():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", "0", "--device", "cpu"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("Emage demo on http://127.0.0.1:"), line
        url = line.split()[3]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b'id="generate"' in response.read()
    finally:
        process.terminate()
        process.wait(30)
