"""Does a generator know which object a relation puts where? The mirror test.

    python benchmarks/mirror_probe.py checkpoints/shapes/emage [more checkpoints]

For each of 200 two-object training-style captions "A rel B" (two different shapes of one
size, no held-out pair) the caption is rendered as the model's training images were placed
(`sample.Pipeline.render_options`), and so is its mirror: the same picture with A and B
exchanged in their boxes, a picture of "A opp B". Both are clean pictures of A and B with
one layout; only the first fits the caption. Each is tokenised, a random fraction of its
tokens becomes [mask] (the same positions for both), and one decoder pass scores the
masked tokens (summed cross-entropy, nats, averaged over 4 mask draws). A model that
reads the order of the caption gives the true picture the lower loss; one blind to order
prefers it half of the time. Printed as Markdown: that fraction and the mean loss gap
(mirror minus true, positive when the model prefers the true picture), for all captions and
for horizontal and vertical relations apart (a model can learn one axis and not the other).

The text probe asks where the order gets lost. A ridge regression reads the colour of the
left (or upper) object from the text tower's states of "A rel B" (all positions, one
vector), fitted on 5,000 captions and scored on 1,000 others. Neither the two colours nor
the words at their positions give it linearly: the answer is the first colour for "to the
left of" and "above" and the second for the others. One-hot tokens score about 0.5, the
pick of one of the two colours (printed last). A tower that writes the layout into its states
scores near 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
import shapes  # noqa: E402
import vqgan  # noqa: E402


def two_object_captions(count: int, seed: int = 0) -> list[shapes.Caption]:
    """Captions "A rel B" whose objects differ in shape and share a size word (so they can swap boxes)."""
    rng, chosen = random.Random(seed), []
    while len(chosen) < count:
        caption = shapes.parse(shapes.sample_caption(rng, "train"))
        two = len(caption.objects) == 2
        if not two or caption.objects[0].shape == caption.objects[1].shape or shapes.is_novel(caption):
            continue
        size = rng.choice(("small", "large"))
        objects = tuple(dataclasses.replace(o, size=size) for o in caption.objects)
        chosen.append(shapes.Caption(objects, caption.relation))
    return chosen


@torch.no_grad()
def mirror_test(pipe: sample.Pipeline, fractions=(0.5, 0.9, 1.0), count: int = 200, draws: int = 4) -> list[dict]:
    model, render = pipe.model.eval(), pipe.render_options
    captions = two_object_captions(count)
    boxes = [shapes.layout(c, i, **render) for i, c in enumerate(captions)]
    true = pipe.vqgan.encode(vqgan.to_tensor([shapes.draw(c.objects, b) for c, b in zip(captions, boxes)]))
    mirror = pipe.vqgan.encode(vqgan.to_tensor([shapes.draw(c.objects[::-1], b) for c, b in zip(captions, boxes)]))
    true, mirror = true.flatten(1), mirror.flatten(1)  # (B, n)
    text_kv, text_mask = model.encode_text(pipe.text_tokens([str(c) for c in captions]))
    horizontal = torch.tensor([c.relation in ("to the left of", "to the right of") for c in captions])
    axes = {"all": torch.ones_like(horizontal), "left / right": horizontal, "above / below": ~horizontal}
    generator, rows = torch.Generator().manual_seed(0), []
    for fraction in fractions:
        loss = {"true": 0.0, "mirror": 0.0}
        for _ in range(draws):
            masked = torch.rand(true.shape, generator=generator) < fraction  # (B, n)
            for name, y in (("true", true), ("mirror", mirror)):
                inputs = torch.where(masked, torch.full_like(y, model.config.mask_id), y)
                nll = -model.round_logits(inputs, text_kv, text_mask).log_softmax(-1).gather(-1, y[..., None])[..., 0]
                loss[name] = loss[name] + (nll * masked).sum(1) / draws  # (B,)
        gap = loss["mirror"] - loss["true"]
        for axis, rows_of_axis in axes.items():
            rows.append({"fraction": fraction, "axis": axis, "prefers_true": (gap[rows_of_axis] > 0).float().mean().item(),
                         "gap": gap[rows_of_axis].mean().item()})
    return rows


def ridge_probe(features: torch.Tensor, labels: torch.Tensor, train: int, ridge: float = 1.0) -> float:
    """Held-out accuracy of a ridge regression from features[N, D] onto one-hot labels[N].

    Fitted on the first `train` rows (standardised with their statistics), scored on the rest.
    """
    x = features.double()
    mean, std = x[:train].mean(0), x[:train].std(0) + 1e-6
    x = (x - mean) / std
    y = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).double()
    a, b = x[:train], y[:train]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)  # (D, classes)
    return ((x[train:] @ w).argmax(-1) == labels[train:]).double().mean().item()


def order_captions(count: int, seed: int = 1) -> tuple[list[str], torch.Tensor]:
    """Two-object training captions with two different colours, and the index (in shapes.COLORS)
    of the colour of the left object (horizontal relations) or the upper one (vertical)."""
    rng, colours, captions, labels = random.Random(seed), list(shapes.COLORS), [], []
    while len(captions) < count:
        caption = shapes.parse(shapes.sample_caption(rng, "train"))
        if caption.relation is None or caption.objects[0].color == caption.objects[1].color:
            continue
        first = caption.relation in ("to the left of", "above")
        labels.append(colours.index(caption.objects[0 if first else 1].color))
        captions.append(str(caption))
    return captions, torch.tensor(labels)


@torch.no_grad()
def text_probe(pipe: sample.Pipeline, count: int = 6000, train: int = 5000, tower: bool = True) -> float:
    """ridge_probe accuracy on the text tower's states [N, L * width] of order_captions, or
    with tower=False on the one-hot caption tokens [N, L * vocabulary] (the baseline)."""
    captions, labels = order_captions(count)
    tokens = pipe.text_tokens(captions)  # (N, L)
    if tower:
        features = pipe.model.text_encoder(tokens)[0]  # (N, L, width)
    else:
        features = torch.nn.functional.one_hot(tokens, pipe.model.config.text.vocab_size)  # (N, L, vocabulary)
    return ridge_probe(features.flatten(1), labels, train)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="Emage checkpoint directories")
    p.add_argument("--captions", type=int, default=200, help="two-object captions tested")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("| checkpoint | masked | relations | prefers the true picture | loss gap (nats) | text probe |")
    print("|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        pipe = sample.Pipeline.load(checkpoint)
        probe = text_probe(pipe)
        for row in mirror_test(pipe, count=args.captions):
            print(f"| {checkpoint} | {row['fraction']:.0%} | {row['axis']} | {row['prefers_true']:.3f} | {row['gap']:+.2f} "
                  f"| {probe:.3f} |")
    print(f"\ntext probe on one-hot tokens instead of the tower's states: {text_probe(pipe, tower=False):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
