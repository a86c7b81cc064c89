"""Beyond the paper: what this project adds to Section 3, each feature in one section.

Every feature here plugs into emage.py through one seam, the `beyond` argument of
`emage.Emage`: a `Beyond` object that may supply the token embedding and the output head,
widen the training masks and add a loss term. emage.py never imports this file; the
scripts load checkpoints through `load_checkpoint` below, which hands a `Beyond` in when
the checkpoint's config.json has a "beyond" entry. Each section says what the feature is,
its flag, what it measured (docs/results.md) and whether the shipped demo uses it.

    feature                     flag (train.py / sample.py)      demo   measured (docs/results.md)
    colour-factored codes       --set colours=7 (from the VQGAN)  yes    held-out colour-shape pairs get trained factors
    object masking              --set object_mask=0.3             yes    stage 1 of the demo (see "Stage 1")
    mirror loss                 --set mirror_loss=1.0 (variant 3) yes    left/right mirror test 0.570 -> 0.991
    self-score re-ranking       sample.py --rerank self           yes    8 candidates: 0.738 -> 0.984 seen
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import emage
from emage import Emage, EmageConfig, EmageError
from files import is_whole, shown

CONTRAST_WEIGHT = 0.25  # self_score's weight on the caption-against-contrast log-ratio (docs/results.md: re-ranking)
RETIRED = {"relative_positions": False, "block_mask": 0.0}  # measured and removed; git history keeps them


@dataclass
class Beyond:
    """The settings of every extension; the defaults switch each one off."""

    colours: int = 0  # > 0: code = colour * (codebook_size / colours) + pattern (vqgan.PatternQuantizer)
    object_mask: float = 0.0  # probability that a training mask also hides every token of one colour
    mirror_loss: float = 0.0  # weight of the caption-against-mirrored-caption term (variant 3)

    def check(self, config: EmageConfig | None = None) -> "Beyond":
        """Each field's type and range; with `config`, also what it asks of the model (colours
        divides codebook_size). Without it (a command line before the data is known), the
        fields alone."""
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not is_whole(self.colours) or not 0 <= self.colours <= emage.MAX_CODEBOOK:
            raise EmageError(f"colours={shown(self.colours)} must be 0 or a whole number that divides codebook_size")
        if not number(self.object_mask) or not 0.0 <= self.object_mask <= 1.0:  # nan fails too
            raise EmageError(f"object_mask must be a probability in [0, 1], got {shown(self.object_mask)}")
        if not number(self.mirror_loss) or not 0.0 <= self.mirror_loss <= 1e6:
            raise EmageError(f"mirror_loss must be a finite weight >= 0 (at most 1e6), got {shown(self.mirror_loss)}")
        if config is None:
            return self
        if self.colours and config.codebook_size % self.colours:
            raise EmageError(f"colours={self.colours} must be 0 or divide codebook_size={config.codebook_size}")
        if self.object_mask and not self.colours:
            raise EmageError("object_mask needs colour-factored codes: set colours (vqgan.PatternQuantizer) "
                             "or leave object_mask at 0")
        return self

    @property
    def active(self) -> bool:
        return bool(self.colours or self.object_mask or self.mirror_loss)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Beyond":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise EmageError(f"unknown extension settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    # -- the four hooks emage.Emage calls ---------------------------------------------------

    def embedding(self, config: EmageConfig):
        return FactoredEmbedding(self.colours, config.codebook_size // self.colours, config.width) if self.colours else None

    def head(self, config: EmageConfig):
        return FactoredHead(config.width, self.colours, config.codebook_size // self.colours) if self.colours else None

    def training_mask(self, config: EmageConfig, mask: torch.Tensor, image_tokens: torch.Tensor, rand) -> torch.Tensor:
        if not self.object_mask:
            return mask
        u_object = rand(image_tokens.shape[0], self.colours)  # (flag, one per non-empty colour)
        hidden = object_mask(image_tokens, u_object[:, 1:], config.codebook_size // self.colours)
        return mask | (hidden & (u_object[:, :1] < self.object_mask))

    def extra_loss(self, model: Emage, text_tokens, x, image_tokens, logits, contrast_tokens=None) -> torch.Tensor:
        """mirror_loss weight x mirror_loss over the rows whose contrast caption differs from their
        own: pass 2's input x read a second time with the contrast caption."""
        if not self.mirror_loss or contrast_tokens is None:
            return logits.new_zeros(())
        if contrast_tokens.shape != text_tokens.shape:
            raise EmageError(f"contrast captions must be shaped like the captions {tuple(text_tokens.shape)}, "
                             f"got {tuple(contrast_tokens.shape)}")
        empty = model.empty_caption(1, text_tokens.shape[1], text_tokens.device)
        dropped = (text_tokens == empty).all(1)  # caption dropout: an empty caption has no mirror
        rows = (contrast_tokens != text_tokens).any(1) & ~dropped  # (B,)
        if not bool(rows.any()):
            return logits.new_zeros(())
        contrast_logits = model._decode(x[rows], *model.encode_text(contrast_tokens[rows]))
        return self.mirror_loss * mirror_loss(logits[rows], contrast_logits, image_tokens[rows])

    def batch_inputs(self, captions: list[str], tokenizer, context_length: int) -> dict:
        """What extra_loss needs per training batch: the captions' mirrors, tokenised (shapes
        world; a caption with no mirror is its own contrast, which the loss skips)."""
        if not self.mirror_loss:
            return {}
        import shapes

        mirrors = [shapes.contrast_for(caption) or caption for caption in captions]
        return {"contrast_tokens": tokenizer(mirrors, context_length=context_length)}


def build(config: EmageConfig, beyond: Beyond | None = None, variant=None) -> Emage:
    """The model with its extensions handed in (none when `beyond` switches all of them off)."""
    if beyond is not None and beyond.active:
        return Emage(config, variant=variant, beyond=beyond.check(config))
    return Emage(config, variant=variant)


def beyond_of(meta: dict) -> Beyond:
    """The Beyond of a checkpoint's config.json, also from checkpoints written before the split,
    which kept these fields inside "config" (moved out here; retired fields must be off).
    Every field is checked for its type and range (Beyond.check) before it is used."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    given = meta.get("beyond") or {}
    if not isinstance(given, dict):
        raise EmageError(f"config.json's beyond must be an object of extension settings, got {shown(given)}")
    legacy = {f.name: config.pop(f.name) for f in fields(Beyond) if f.name in config}
    for name, off in RETIRED.items():
        if config.pop(name, off) != off:
            raise EmageError(f"this checkpoint uses {name}, an experiment retired from the code; "
                             "load it with an older release of this project")
    return Beyond.from_dict({**legacy, **given}).check()


def load_checkpoint(ckpt_dir, map_location="cpu") -> tuple[Emage, dict]:
    """emage.load_checkpoint with the checkpoint's extensions handed in."""
    def make_beyond(meta):
        beyond = beyond_of(meta)
        return beyond.check(EmageConfig.from_dict(meta["config"])) if beyond.active else None

    return emage.load_checkpoint(ckpt_dir, map_location, make_beyond=make_beyond)


# ----------------------------------------------------------------------------------------
# Colour-factored codes (--set colours=N; the demo's tokenizer, checkpoints/shapes/patterns)
# ----------------------------------------------------------------------------------------


class FactoredEmbedding(nn.Module):
    """Input embedding of colour-factored codes: e(colour * P + pattern) = colour vector + pattern vector.

    Beyond the paper, for the shapes tokenizer (vqgan.PatternQuantizer). A table with one
    free row per code would leave the codes of held-out colour-shape pairs (a purple
    triangle's) untrained; with shared factors they are built from trained parts. [mask]
    (id colours * P) is its own colour and pattern. `weight` materialises the full table
    [colours * P + 1, width], as nn.Embedding's, for code that reads it.
    """

    def __init__(self, colours: int, patterns: int, width: int):
        super().__init__()
        self.patterns, self.mask_id = patterns, colours * patterns
        self.colour = nn.Embedding(colours + 1, width)  # + [mask]
        self.pattern = nn.Embedding(patterns + 1, width)  # + [mask]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        masked = tokens == self.mask_id
        colour = torch.where(masked, self.colour.num_embeddings - 1, tokens // self.patterns)
        pattern = torch.where(masked, self.patterns, tokens % self.patterns)
        return self.colour(colour) + self.pattern(pattern)  # (..., width)

    @property
    def weight(self) -> torch.Tensor:
        return self(torch.arange(self.mask_id + 1, device=self.colour.weight.device))


class FactoredHead(nn.Module):
    """Logits of colour-factored codes: logit(colour * P + pattern) = colour logit + pattern logit.

    The code's distribution is then p(colour) p(pattern) at each position, and its
    cross-entropy is the sum of the two factors' (log-softmax of a sum of independent
    logits). Held-out pairs get their probability from factors trained on other pairs.
    """

    def __init__(self, width: int, colours: int, patterns: int):
        super().__init__()
        self.colours = colours
        self.proj = nn.Linear(width, colours + patterns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour, pattern = self.proj(x).split([self.colours, self.proj.out_features - self.colours], -1)
        return (colour[..., :, None] + pattern[..., None, :]).flatten(-2)  # (..., colours * patterns)


# ----------------------------------------------------------------------------------------
# Object masking (--set object_mask=P; the demo trains with 0.3)
# ----------------------------------------------------------------------------------------


def object_mask(image_tokens: torch.Tensor, u_colour: torch.Tensor, patterns: int) -> torch.Tensor:
    """Training masks that hide every token of one colour present in the image.

    Beyond the paper, a sharper block_mask for colour-factored codes (code = colour *
    patterns + pattern, colour 0 = empty). In the shapes world one colour is one object (or
    two of the same colour), so the model must place a hidden object from the caption and
    the object it still sees: exactly the step where "A to the left of B" decides which side
    A goes. The colour hidden is the present one with the largest u_colour. image_tokens:
    [B, n] codes; u_colour: [B, colours - 1] uniform in [0, 1), one per non-empty colour;
    returns BoolTensor[B, n], all False in a row with no object.
    """
    colour = image_tokens // patterns  # (B, n): 0 = empty patch
    present = F.one_hot(colour, u_colour.shape[1] + 1)[..., 1:].any(1)  # (B, colours - 1)
    chosen = 1 + torch.where(present, u_colour, torch.full_like(u_colour, -1.0)).argmax(-1)  # (B,)
    return (colour == chosen[:, None]) & present.any(-1, keepdim=True)


# ----------------------------------------------------------------------------------------
# The mirror loss (--set mirror_loss=W with variant 3; the demo's stage 2 trains with 1.0)
# ----------------------------------------------------------------------------------------


def hidden_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """sum over hidden positions i of log p(targets_i): logits[R, n, K], targets/hidden[R, n] -> [R]."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]  # (R, n)
    return (log_p * hidden).sum(-1)


def mirror_loss(logits: torch.Tensor, contrast_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of softplus(log p(Y | contrast) - log p(Y | caption)) / n: a scalar.

    Beyond the paper. logits / contrast_logits[B, n, K] are one pass over the same input
    read with the caption and with a caption the image must not match; targets[B, n] = Y.
    Cross-entropy alone lets a model that ignores a relation word pay little: drawing "A
    left of B" either way round costs about log 2 per image. This term asks the caption to
    explain the image better than its mirror does, and goes quiet once it does by a few nats
    (the README measures what it changes: the demo had learnt "above" but not "left of").
    Divided by n, a weight of 1 weighs one image about as much as the cross-entropy does.
    """
    everything = torch.ones_like(targets, dtype=torch.bool)
    margin = hidden_log_likelihood(logits, targets, everything) - hidden_log_likelihood(contrast_logits, targets, everything)
    return F.softplus(-margin).mean() / targets.shape[1]


# ----------------------------------------------------------------------------------------
# Self-score re-ranking (sample.py --rerank self, the default; --contrast mirror)
# ----------------------------------------------------------------------------------------


def colour_hide_sets(image_tokens: torch.Tensor, patterns: int, colours: int) -> torch.Tensor:
    """The hide-sets of self-scoring with colour-factored codes: every token of one colour.

    image_tokens: [B, n] codes (code = colour * patterns + pattern, colour 0 = empty);
    returns BoolTensor[colours - 1, B, n], set k hiding colour k + 1 (all False where the
    colour is absent). These are object_mask's masks, one colour at a time.
    """
    colour = image_tokens // patterns  # (B, n)
    return torch.stack([colour == k for k in range(1, colours)])  # (colours - 1, B, n)


@torch.no_grad()
def self_score(model: Emage, text_tokens: torch.Tensor, image_tokens: torch.Tensor,
               generator: torch.Generator | None = None, random_sets: int = 4,
               contrast_tokens: torch.Tensor | None = None,
               contrast_weight: float = CONTRAST_WEIGHT) -> torch.Tensor:
    """How well the generator predicts each part of an image from the rest: FloatTensor[B].

    Beyond the paper, a re-ranker for generate()'s candidates that needs no CLIP. For
    each hide-set H the decoder reads the caption and the image with H replaced by
    [mask], and the score adds log p(y_i) over i in H: a pseudo-likelihood. With
    colour-factored codes H is every token of one colour (colour_hide_sets), the
    question object_mask trains: on the shapes demo an extra or misshapen object then
    scores low, a swapped relation less reliably (docs/results.md). Otherwise H is a random half
    of the positions, `random_sets` times. text_tokens[B, L] and image_tokens[B, n],
    one caption per row.

    contrast_tokens[B, L'] names, per row, a caption the image should not match (on
    the shapes world: the caption with its relation mirrored, shapes.mirrored). The
    score then adds contrast_weight * [log p(Y | all [mask], caption) - log p(Y | all
    [mask], contrast)]: how much better the caption than its contrast explains the
    layout, read from the first round's predictions, where the layout is decided. A
    row whose contrast is its own caption adds 0.
    """
    c, colours = model.config, model.beyond.colours if model.beyond is not None else 0
    if text_tokens.shape[0] != image_tokens.shape[0]:
        raise EmageError(f"self_score needs one caption per image, got {text_tokens.shape[0]} captions "
                         f"for {image_tokens.shape[0]} images")
    if colours:
        hide = colour_hide_sets(image_tokens, c.codebook_size // colours, colours)  # (M, B, n)
        hide = hide[hide.flatten(1).any(1)]  # colours absent from every image cost nothing
    else:
        u = torch.rand(random_sets, *image_tokens.shape, generator=generator, device=image_tokens.device)
        hide = u < 0.5  # (M, B, n)
    M = hide.shape[0]
    text_kv, text_mask = model.encode_text(text_tokens)
    targets = image_tokens.repeat(M, 1)  # (M * B, n): hide-set m of row b at m * B + b
    inputs = torch.where(hide.flatten(0, 1), torch.full_like(targets, c.mask_id), targets)
    logits = model.round_logits(inputs, text_kv.repeat(M, *[1] * (text_kv.dim() - 1)),
                               text_mask.repeat(M, 1, 1, 1))  # (M * B, n, K)
    score = hidden_log_likelihood(logits, targets, hide.flatten(0, 1)).view(M, -1).sum(0)  # (B,)
    if contrast_tokens is None:
        return score
    if contrast_tokens.shape[0] != image_tokens.shape[0]:
        raise EmageError(f"self_score needs one contrast caption per image, got {contrast_tokens.shape[0]} "
                         f"for {image_tokens.shape[0]} images")
    everything = torch.ones_like(image_tokens, dtype=torch.bool)

    def first_round(text):  # log p(Y | all [mask], text): (B,), one decoder pass per distinct caption
        distinct, row = torch.unique(text, dim=0, return_inverse=True)  # candidates share their caption
        masked = torch.full((len(distinct), c.n), c.mask_id, dtype=torch.long, device=text.device)  # round 1's input
        logits = model.round_logits(masked, *model.encode_text(distinct))  # (U, n, K)
        return hidden_log_likelihood(logits[row], image_tokens, everything)

    return score + contrast_weight * (first_round(text_tokens) - first_round(contrast_tokens))
