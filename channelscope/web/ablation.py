"""The ablation page's objects and how they are filled: channel toggles, example prompts, the
weight-level preview and the real model's response (issue 6).

The HTML page, its `.json` twin and the htmx fragment are all rendered from one pages.AblationPage.
The numbers come from method/ablation.py (pure) and method/intervention.py (the model); this
module only turns stored rows into tensors and results into page objects.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from channelscope.core import stats
from channelscope.core import tables as T
from channelscope.core.schemas import ChannelOut, TokenScore
from channelscope.core.tokens import label, visible
from channelscope.method import ablation, measures, rotate
from channelscope.method.intervention import Effect
from channelscope.web import pages, urls
from channelscope.worker import corpus

MAX_PROMPT_TOKENS = 512
MAX_PROMPT_CHARS = 8 * MAX_PROMPT_TOKENS  # checked before tokenising; tokens are checked after
WEIGHT_DRAWS = 16  # random draws for the weight-level baseline (cheap: one [R K, d] x [d, V] product)
# Random draws on the write side cost a batch row each, from the neuron's layer on (the prompt runs
# once up to it): 16, as at weight level, so that the baseline has an interval.
MODEL_DRAWS_OUT = 16
LIST_TOKENS = 15
EXAMPLES = 3
EXAMPLE_CHARS = 320

SELECTIVITY_DEFINITION = (
    "S = the mean over T (the tokens the ablated channels claimed) of the oriented drop "
    "−sign(skew_k)·Δ, divided by the mean over all other tokens of |Δ|. Δ is the change the "
    "ablation causes: of the vocabulary projection w @ U (weight level); of the next-token logits "
    "at the positions where the neuron is active (side out, real model); of the neuron's "
    "pre-activation at positions whose token or next token is in T, against all other positions "
    "(sides gate and in, real model). S ≈ 0 means the channel's tokens move no more than any others."
)
BASELINE_DEFINITION = (
    "Random baseline: the same ablation with random directions at each channel's cosine to w and "
    "the same α*, each claiming the |T_k| tokens furthest out on its own dominant tail; the median "
    "over the draws. At weight level S is partly circular (removing a direction lowers its own "
    "tail), so a random direction already scores well above 0 there: read S against this baseline."
)


# --- URLs and controls --------------------------------------------------------------------------------


def parse_channels(values: list[str]) -> list[int]:
    """`channels=0,3` or `channels=0&channels=3` (what a form of checkboxes sends) -> [0, 3].
    Raises ValueError with a message for anything else."""
    found: set[int] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not re.fullmatch(r"\d{1,4}", part):
                raise ValueError(f"channels: {part!r} is not a channel number (use channels=0,3)")
            found.add(int(part))
    return sorted(found)  # discovery order: the same set gives the same ablation and permalink


def controls(
    model: str,
    layer: int,
    neuron: int,
    side: str,
    run: str,
    channels: list[ChannelOut],
    checked: list[int],
    prompt: str | None,
    min_kurtosis: float = T.JUNK_KURTOSIS,
) -> pages.Controls:
    examples = example_prompts(model, layer, neuron, side, run, channels, min_kurtosis)
    return pages.Controls(
        action=urls.ablate_path(model, layer, neuron),
        run=run,
        side=side,
        channels=[
            pages.ChannelToggle(
                index=ch.index,
                label=label([t.token for t in ch.top_tokens]),
                tail=ch.tail,
                effect=ch.effect,
                kurtosis=ch.kurtosis,
                cos=ch.cos,
                alpha=ch.alpha,
                masked=ch.masked,
                generic=ch.generic,
                faithfulness_percentile=ch.faithfulness_percentile,
                below_cutoff=ch.kurtosis < min_kurtosis,
                checked=ch.index in checked,
            )
            for ch in channels
        ],
        prompt=prompt if prompt is not None else (examples[0].text if examples else ""),
        examples=examples,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )


def example_prompts(
    model: str, layer: int, neuron: int, side: str, run: str, channels: list[ChannelOut], min_kurtosis: float
) -> list[pages.ExamplePrompt]:
    """A few prompts that contain a channel's own top tokens, one per channel (non-generic
    channels above the cut-off first, in discovery order): a corpus passage holding the most of
    its tokens; on the write side it stops just before one of them, so the model's next token
    is the channel's to promote. Without a match, the channel's tokens strung together."""
    texts = corpus.load().texts if corpus.CORPUS.exists() else ()
    ranked = sorted(channels, key=lambda ch: (ch.generic, ch.kurtosis < min_kurtosis, ch.index))
    out: list[pages.ExamplePrompt] = []
    for ch in ranked:
        words = [
            t.token for t in ch.top_tokens if len(t.token.strip()) >= 3 and t.token.strip().isprintable()
        ]
        if not words:
            continue
        text, source = _passage(tuple(words), side) if texts else (None, "")
        if text is None:
            text, source = " ".join(w.strip() for w in words[:8]), "the channel's top tokens"
        out.append(
            pages.ExamplePrompt(
                channel=ch.index,
                text=text,
                source=source,
                url=urls.ablate(model, layer, neuron, side, run, [ch.index], text),
            )
        )
        if len(out) == EXAMPLES:
            break
    return out


@lru_cache(maxsize=65536)
def _passage(words: tuple[str, ...], side: str) -> tuple[str | None, str]:
    """Scanning the corpus for a channel's tokens took half of a neuron page's server time;
    the answer depends on nothing but the tokens and the side, so it is kept."""
    hits = Counter(i for w in words for i in corpus.texts_containing(w))
    if not hits:
        return None, ""
    best_hits = max(hits.values())
    best = corpus.load().texts[min(i for i, n in hits.items() if n == best_hits)]
    first = min((best.find(w), w) for w in words if w in best)
    at, word = first
    if side == "out":
        start = max(0, at - EXAMPLE_CHARS)
        snippet = best[start:at].rstrip()
        if len(snippet) < 20:  # too little context before it: read the passage instead
            snippet = best[:EXAMPLE_CHARS].rstrip()
            return snippet, f"a corpus passage with {best_hits} of its top tokens"
        return snippet.lstrip(), f"a corpus passage, cut just before {visible(word)!s}"
    start = max(0, at - EXAMPLE_CHARS // 2)
    return best[start : start + EXAMPLE_CHARS].strip(), f"a corpus passage with {best_hits} of its top tokens"


# --- filling the page ----------------------------------------------------------------------------------


def _scores(ids: torch.Tensor, zs: torch.Tensor, tokens: list[str]) -> list[TokenScore]:
    return [TokenScore(id=int(i), token=tokens[int(i)], z=round(float(zs[i]), 3)) for i in ids]


def _finite(x: float | None) -> float | None:
    x = stats.finite_or(x, None)
    return None if x is None else round(x, 4)


def _quantile(values: list[float], q: float) -> float | None:
    found = stats.finite(values)
    return float(np.quantile(found, q)) if len(found) >= 5 else None


def selectivity(value: float, baseline: list[float], note: str | None = None) -> pages.Selectivity:
    return pages.Selectivity(
        value=_finite(value),
        baseline_median=_finite(stats.median(baseline)),
        baseline_low=_finite(_quantile(baseline, 0.1)),
        baseline_high=_finite(_quantile(baseline, 0.9)),
        baseline=[_finite(b) for b in baseline],
        note=note
        if note or np.isfinite(value)
        else "undefined: nothing to compare (no target, or no change)",
    )


@dataclass
class Prepared:
    """One ablation request: its tensors, from stored rows, and the weight-level results."""

    rows: list  # the chosen channels' rows, in discovery order
    w: torch.Tensor  # [d]
    channels: torch.Tensor  # [K, d]
    U: torch.Tensor  # [d, V], shared with the process-wide cache: never written
    scored: torch.Tensor  # [V] bool
    masked: list[torch.Tensor]  # T_k per chosen channel
    signs: list[float]  # each chosen channel's tail
    ablation: ablation.Ablation
    targets: tuple[torch.Tensor, torch.Tensor]
    draws: ablation.RandomDraws
    effect: ablation.WeightEffect
    preview_seconds: float

    def applied(self) -> list[pages.Applied]:
        return [
            pages.Applied(
                channel=ch.channel,
                alpha=round(alpha, 4),
                refitted=k > 0,
                cos=round(ch.cos, 4),
                masked=len(m),
            )
            for k, (ch, alpha, m) in enumerate(zip(self.rows, self.ablation.alphas, self.masked, strict=True))
        ]

    def preview(self, tokens: list[str]) -> pages.WeightPreview:
        e, scored = self.effect, self.scored
        sign = measures.tail_sign(float(rotate.tail_skew(e.before, scored)))
        zs = rotate.z_scores(torch.stack([e.before, e.after]), scored)
        top_before = measures.top_tokens(zs[0], scored, sign, LIST_TOKENS)[0]
        top_after = measures.top_tokens(zs[1], scored, sign, LIST_TOKENS)[0]
        drops, rises = ablation.moved_tokens(e.before, e.after, scored, self.signs[0], LIST_TOKENS)
        in_t = set(self.targets[0].tolist())

        def moves(items) -> list[pages.TokenMove]:
            return [
                pages.TokenMove(
                    id=i, token=tokens[i], z_before=round(b, 3), z_after=round(a, 3), target=i in in_t
                )
                for i, b, a in items
            ]

        return pages.WeightPreview(
            selectivity=selectivity(e.selectivity, e.baseline),
            targets=len(self.targets[0]),
            tail=int(self.signs[0]),
            top_before=_scores(top_before, zs[0], tokens),
            top_after=_scores(top_after, zs[1], tokens),
            drops=moves(drops),
            rises=moves(rises),
            seconds=round(self.preview_seconds, 3),
        )

    def model_deltas(self, side: str) -> tuple[torch.Tensor, torch.Tensor, list]:
        """delta = w' - w, the random draws' deltas and their targets for the model run."""
        count = MODEL_DRAWS_OUT if side == "out" else WEIGHT_DRAWS
        random_w = ablation.apply(self.w, self.draws.directions[:count], self.ablation.alphas)
        return self.ablation.vector - self.w, random_w - self.w, self.draws.targets[:count]


def prepare(
    neuron_row, channel_rows, chosen: list[int], U: np.ndarray, scored: np.ndarray, seed: int
) -> Prepared:
    """The weight-level ablation of the chosen channels and its random draws (no model needed)."""
    started = time.perf_counter()
    by_index = {ch.channel: ch for ch in channel_rows}
    rows = [by_index[i] for i in chosen]
    w = torch.from_numpy(T.neuron_vector(neuron_row.vector).copy())
    channels = torch.stack([torch.from_numpy(T.channel_vector(ch.vector)) for ch in rows])
    U_, scored_ = torch.from_numpy(U), torch.from_numpy(scored)
    masked = [torch.from_numpy(T.masked_tokens(ch.masked)) for ch in rows]
    signs = [1.0 if ch.skew >= 0 else -1.0 for ch in rows]
    done = ablation.ablate(w, channels, U_, scored_, first_alpha=rows[0].alpha)
    targets = ablation.targets(masked, signs)
    generator = torch.Generator().manual_seed(seed)
    draws = ablation.random_draws(w, channels, [len(m) for m in masked], U_, scored_, WEIGHT_DRAWS, generator)
    effect = ablation.weight_effect(w, done, targets, draws, U_, scored_)
    return Prepared(
        rows,
        w,
        channels,
        U_,
        scored_,
        masked,
        signs,
        done,
        targets,
        draws,
        effect,
        time.perf_counter() - started,
    )


def model_effect(
    effect: Effect, tokens: list[str], targets: torch.Tensor, threshold, seconds: float
) -> pages.ModelEffect:
    in_t = set(targets.tolist())
    counted = set(effect.positions.tolist())
    pre = effect.pre_activation
    values = [effect.activation.abs().max()]
    if pre is not None:
        values.append(pre.abs().max())
    scale = float(max(values)) or 1.0
    strip = [
        pages.PromptToken(
            position=p,
            id=i,
            token=tokens[i],
            pre_before=None if pre is None else round(float(pre[0, p]), 4),
            pre_after=None if pre is None else round(float(pre[1, p]), 4),
            act_before=round(float(effect.activation[0, p]), 4),
            act_after=round(float(effect.activation[1, p]), 4),
            counted=p in counted,
            target=i in in_t,
            logit_drop=None if effect.logit_drop is None else round(float(effect.logit_drop[p]), 4),
        )
        for p, i in enumerate(effect.ids)
    ]

    def nexts(items) -> list[pages.NextToken]:
        return [
            pages.NextToken(
                id=i, token=tokens[i], probability=round(p, 4), other=round(other, 4), target=i in in_t
            )
            for i, p, other in items
        ]

    if effect.active is None:
        note = "Read side: no activation threshold is needed."
        where = "positions whose token or next token is in T"
    elif threshold is None:
        note = (
            "No activation pass is stored for this model (channelscope activations): S is "
            "measured over every position of the prompt instead of the active ones."
        )
        where = "every position"
    else:
        note = (
            f"Active: |activation| above {threshold.value:.4g}, the neuron's 90th percentile of "
            "|activation| over "
            f"{threshold.tokens:,} positions of corpus {threshold.corpus}."
        )
        where = "positions where the neuron is active"
    sel_note = None
    if not counted:
        sel_note = f"undefined on this prompt: no {where}"
    return pages.ModelEffect(
        tokens=strip,
        scale=round(scale, 4),
        selectivity=selectivity(effect.selectivity, effect.baseline, sel_note),
        positions=len(counted),
        threshold=None if threshold is None or effect.active is None else threshold.value,
        threshold_note=note,
        next_before=nexts(effect.next_before),
        next_after=nexts(effect.next_after),
        target_next=[
            pages.TargetNext(id=i, token=tokens[i], before=round(b, 6), after=round(a, 6))
            for i, b, a in effect.target_next
        ],
        seconds=round(seconds, 3),
    )
