"""Early pruning of candidates, probed on the shipped demo (python benchmarks/prune_probe.py 64).

If the 8 candidates were ranked after k of 16 rounds and only the best continued,
how often would the final image pass? Simulated from one 8 x 16 run with history (the
winner's continuation is its own trajectory in the batch run)."""
import json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from PIL import Image
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval_fid, extensions, shapes, files

ROUNDS = (1, 2, 3, 4, 6, 8, 16)
C, T = 8, 16

def loglik(logits, targets, hidden):
    log_p = F.log_softmax(logits.float(), -1).gather(-1, torch.where(hidden, targets, 0)[..., None])[..., 0]
    return (log_p * hidden).sum(-1)

@torch.no_grad()
def partial_self(model, text_rows, tokens):  # colour hide-sets over committed tokens only
    c, colours = model.config, model.beyond.colours
    patterns = c.codebook_size // colours
    known = tokens != c.mask_id
    colour = torch.where(known, tokens // patterns, -1)
    hide = torch.stack([colour == k for k in range(1, colours)])
    hide = hide[hide.flatten(1).any(1)]
    M = hide.shape[0]
    kv, m = model.encode_text(text_rows)
    targets = tokens.repeat(M, 1)
    inputs = torch.where(hide.flatten(0, 1), torch.full_like(targets, c.mask_id), targets)
    logits = model.round_logits(inputs, kv.repeat(M, 1, 1) if kv.dim() == 3 else kv.repeat(M, *[1] * (kv.dim() - 1)), m.repeat(M, 1, 1, 1))
    return loglik(logits, targets, hide.flatten(0, 1)).view(M, -1).sum(0)

@torch.no_grad()
def first_round(model, text, tokens, C):  # log p(committed | all [mask], caption): one pass per caption
    c = model.config
    masked = torch.full((text.shape[0], c.n), c.mask_id, dtype=torch.long)
    logits = model.round_logits(masked, *model.encode_text(text)).repeat_interleave(C, 0)
    return loglik(logits, tokens, tokens != c.mask_id)

def main(limit):
    torch.set_num_threads(1)
    model, tokenizer, vq, info = eval_fid._load_generator("checkpoints/shapes/emage", "cpu")
    captions = shapes.eval_captions()[:limit]
    out = {f"{s}@{k}": [] for k in ROUNDS for s in ("self", "first")}
    t0 = time.time()
    for seed in (0, 1):
        for b in range(0, len(captions), 64):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b // 64)
            batch = captions[b:b + 64]
            text = tokenizer(batch, context_length=model.config.text.context_length)
            tokens, hist = model.generate(text, steps=T, num_candidates=C, generator=g, temperature=0.7,
                                          guidance_scale=1.5, return_history=True)
            h, w = model.config.grid
            images = files.to_uint8(vq.decode(tokens.view(-1, h, w)))
            images = images.reshape(len(batch), C, *images.shape[1:])
            passed = [[shapes.score(Image.fromarray(im), cap) for im in grp] for cap, grp in zip(batch, images)]
            rows = text.repeat_interleave(C, 0)
            for k in ROUNDS:
                part = hist[k - 1]
                for name, fn in (("self", lambda: partial_self(model, rows, part)), ("first", lambda: first_round(model, text, part, C))):
                    best = fn().view(len(batch), C).argmax(1).tolist()
                    out[f"{name}@{k}"] += [(cap, passed[j][best[j]]) for j, cap in enumerate(batch)]
            print(f"seed {seed} batch {b}: {time.time() - t0:.0f} s", flush=True)
    summary = {key: {sp: shapes.accuracy_report(v)[sp]["accuracy"] for sp in ("seen", "novel")} for key, v in out.items()}
    for key, v in summary.items():
        print(key, v)
    Path("prune_probe.json").write_text(json.dumps(summary, indent=1))

main(int(sys.argv[1]) if len(sys.argv) > 1 else 240)
