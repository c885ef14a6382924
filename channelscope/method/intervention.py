"""The real model, run with one neuron's vector changed through forward hooks.

Weights are never written. A hook adds the change of the neuron's contribution to one module's
output, so once the hooks are removed (always, in a `finally`) the model is exactly what it was,
even after a run that failed or ran out of time. The rows of one batch carry different changes
(row 0 none: the clean model), so the clean run, an ablation and its random-direction baselines
cost one forward pass.

Gated MLPs (Llama, Mistral, Qwen2, Gemma, SmolLM2) only:
    pre-activations  g = x . w_gate,  u = x . w_in      x = the MLP's (normalised) input [T, d]
    activation       a = act(g) * u                     the input of down_proj at the neuron
    write            down_proj(a) = sum_i a_i w_out_i
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from channelscope.core.coordinates import out_of_range
from channelscope.method.weights import ModelError

# transformers reads this when it is first imported; nothing here may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDE_MODULE = {"gate": "gate_proj", "in": "up_proj", "out": "down_proj"}


class ModelTimeout(Exception):
    """A forward pass passed its deadline and was stopped between two layers."""


@dataclass
class LanguageModel:
    model: torch.nn.Module  # a transformers causal LM in eval mode
    tokenizer: object
    source: Path
    device: torch.device

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.base_model.layers

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers)

    @property
    def output_matrix(self) -> torch.Tensor:
        """W [V, d]: logits = final hidden state @ W.T (the unembedding, lm_head)."""
        return self.model.get_output_embeddings().weight

    @property
    def final_norm_gain(self) -> torch.Tensor:
        """g [d]: the final RMSNorm's elementwise gain as the logits see it, logits =
        (h / rms(h) * g) @ W.T, so a residual direction r reaches the vocabulary as (r * g) @ W.T.
        Read by normalising a vector of ones (rms 1, up to the norm's epsilon), so a norm that
        scales by 1 + weight (Gemma) gives its own gain too."""
        norm = self.model.base_model.norm
        with torch.inference_mode():
            return norm(torch.ones(1, norm.weight.shape[0], device=self.device))[0].detach().cpu()

    def mlp(self, layer: int) -> torch.nn.Module:
        wrong = out_of_range("the model", self.n_layers, 1, SIDE_MODULE, layer=layer)
        if wrong:
            raise ModelError(wrong)
        return self.decoder_layers[layer].mlp

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_language_model(path: Path, device: str | torch.device = "cpu") -> LanguageModel:
    """A GGUF file or a Hugging Face folder, from local files only, in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    if not path.exists():
        raise ModelError(f"the model file {path} is missing on this server")
    where, extra = (path, {}) if path.is_dir() else (path.parent, {"gguf_file": path.name})
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch.float32, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"transformers cannot load {path}: {str(error).splitlines()[0]}") from None
    model = model.eval().to(device)
    mlp = model.base_model.layers[0].mlp
    if not all(hasattr(mlp, name) for name in SIDE_MODULE.values()):
        raise ModelError(f"{path}: real-model ablation needs a gated MLP (gate_proj, up_proj, down_proj)")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LanguageModel(model, tokenizer, path, torch.device(device))


@dataclass
class Probe:
    """What one batched forward pass recorded, per row (row 0: the clean model)."""

    pre_activation: torch.Tensor | None  # [R, T] x . w of the read side (None for `out`)
    activation: torch.Tensor  # [R, T] the neuron's activation, act(g) * u
    mlp_input: torch.Tensor  # [T, d] row 0's input of the layer's MLP (the read vectors' x)
    hidden: torch.Tensor  # [R, P, d] final (normalised) hidden state at the requested positions


@contextmanager
def _deadline_hooks(lm: LanguageModel, deadline: float | None):
    """Stop a forward pass between layers once the deadline has passed."""
    with ExitStack() as stack:
        if deadline is not None:

            def check(_module, _args):
                if time.monotonic() > deadline:
                    raise ModelTimeout("the model run took longer than its time limit")

            for layer in lm.decoder_layers:
                stack.callback(layer.register_forward_pre_hook(check).remove)
        yield


@torch.inference_mode()
def forward(
    lm: LanguageModel,
    ids: list[int],
    layer: int,
    side: str,
    neuron: int,
    deltas: torch.Tensor,
    positions: torch.Tensor | None = None,
    deadline: float | None = None,
) -> Probe:
    """One forward pass of the token ids, once per row of deltas [R, d]: row r runs with the
    neuron's `side` vector w replaced by w + deltas[r] (row 0 should be zeros: the clean run).
    positions [P]: where to keep the final hidden state (default: every position).

    The rows only differ from layer `layer` on, so the layers before it run once, on one row,
    and their output is repeated for every row (on SmolLM2's layer 25 and 5 rows: 55 layer-rows
    instead of 150). The layers from `layer` on are called with exactly the arguments the model
    gave the first of them."""
    mlp = lm.mlp(layer)
    d_mlp = mlp.down_proj.in_features
    wrong = out_of_range("the model", lm.n_layers, d_mlp, SIDE_MODULE, neuron=neuron, side=side)
    if wrong:
        raise ModelError(wrong)
    rows = deltas.shape[0]
    deltas = deltas.to(lm.device, torch.float32)
    seen: dict[str, torch.Tensor] = {}

    def change_read(_module, args, output):  # gate_proj / up_proj: [R, T, d_mlp]
        x = args[0]
        output = output.clone()
        output[..., neuron] += torch.einsum("rtd,rd->rt", x, deltas)
        seen["pre"] = output[..., neuron].clone()
        return output

    def record_input(_module, args):  # the MLP's input, [R, T, d]
        seen["x"] = args[0][0].clone()

    def record_activation(_module, args):  # down_proj's input, [R, T, d_mlp]
        seen["act"] = args[0][..., neuron].clone()

    def change_write(_module, args, output):  # down_proj: [R, T, d]
        return output + args[0][..., neuron, None] * deltas[:, None, :]

    def stop_before(_module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _PrefixDone

    layers = lm.decoder_layers
    with ExitStack() as stack, _deadline_hooks(lm, deadline):
        handle = layers[layer].register_forward_pre_hook(stop_before, with_kwargs=True)
        try:
            lm.model.base_model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False)
        except _PrefixDone:
            pass
        finally:
            handle.remove()
        stack.callback(mlp.register_forward_pre_hook(record_input).remove)
        stack.callback(mlp.down_proj.register_forward_pre_hook(record_activation).remove)
        if side == "out":
            stack.callback(mlp.down_proj.register_forward_hook(change_write).remove)
        else:
            module = getattr(mlp, SIDE_MODULE[side])
            stack.callback(module.register_forward_hook(change_read).remove)
        hidden = seen["args"][0].expand(rows, -1, -1)  # [R, T, d], the input of `layer`
        for block in layers[layer:]:
            hidden = block(hidden, *seen["args"][1:], **seen["kwargs"])
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = lm.model.base_model.norm(hidden)  # the final norm: last_hidden_state
    if positions is not None:
        hidden = hidden[:, positions.to(lm.device)]
    return Probe(
        pre_activation=seen["pre"].cpu() if side != "out" else None,
        activation=seen["act"].cpu(),
        mlp_input=seen["x"].cpu(),
        hidden=hidden.cpu(),
    )


class _PrefixDone(Exception):
    """Raised by a hook to end the one-row pass at the layer where the rows start to differ."""


def logits(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """[..., d] final hidden states -> [..., V] next-token logits."""
    return hidden.to(lm.device) @ lm.output_matrix.T


# --- an ablation on a prompt ----------------------------------------------------------------------

TOP_NEXT = 5


@dataclass
class Effect:
    """What ablating did to the neuron and the model on one prompt (row 0: before, row 1: after)."""

    ids: list[int]  # the prompt's tokens [T]
    pre_activation: torch.Tensor | None  # [2, T] read sides: x . w and x . w'
    activation: torch.Tensor  # [2, T] act(g) * u, before and after
    active: torch.Tensor | None  # [T] bool, `out`: |activation| above the neuron's threshold
    positions: torch.Tensor  # where S is measured: read sides, the target positions (token or next
    # token in T, against all others); `out`, the positions where the neuron is active
    logit_drop: torch.Tensor | None  # [T] `out`: mean oriented drop of T's logits at each position
    selectivity: float
    baseline: list[float]  # S of each random draw, measured the same way
    # The top next tokens at the last position before and after: (id, probability, the same
    # token's probability on the other side), so each list shows its change.
    next_before: list[tuple[int, float, float]]
    next_after: list[tuple[int, float, float]]
    # T's tokens most likely next at the last position, before or after: (id, before, after)
    target_next: list[tuple[int, float, float]]


def ablation_effect(
    lm: LanguageModel,
    ids: list[int],
    layer: int,
    side: str,
    neuron: int,
    delta: torch.Tensor,
    random_deltas: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
    random_targets: list[tuple[torch.Tensor, torch.Tensor]],
    scored: torch.Tensor,
    threshold: float | None,
    deadline: float | None = None,
) -> Effect:
    """Run the prompt once with the vector w + delta (the ablation, delta = w' - w) and, on the
    write side, with each random draw's w + random_deltas[r], all in one batch.

    Read sides: S over prompt positions of the change of the neuron's pre-activation, targets =
    positions whose token or next token is in T; the random draws need no rows of their own
    (the change is x . delta_r on the same x). Write side: S over the next-token logits at the
    positions where the neuron is active (|activation| above `threshold`; every position if there is none)."""
    from channelscope.method import ablation

    rows = [torch.zeros_like(delta), delta]
    if side == "out":
        rows += list(random_deltas)
    probe = forward(lm, ids, layer, side, neuron, torch.stack(rows), deadline=deadline)
    W = lm.output_matrix.detach().cpu()  # [V, d]
    last = torch.softmax(probe.hidden[:2, -1] @ W.T, dim=-1)  # [2, V]

    def top_next(p: torch.Tensor, other: torch.Tensor) -> list[tuple[int, float, float]]:
        values, order = torch.topk(p, TOP_NEXT)
        return [(int(i), float(v), float(other[i])) for i, v in zip(order, values, strict=True)]

    token_ids = torch.tensor(ids)
    if side != "out":
        positions, signs = ablation.token_positions(token_ids, *targets)
        change = probe.pre_activation[1] - probe.pre_activation[0]
        s = ablation.position_selectivity(change, positions, signs)
        random_changes = probe.mlp_input @ random_deltas.T  # [T, R]
        baseline = []
        for r, (ids_r, signs_r) in enumerate(random_targets):
            pos_r, sig_r = ablation.token_positions(token_ids, ids_r, signs_r)
            baseline.append(ablation.position_selectivity(random_changes[:, r], pos_r, sig_r))
        active, logit_drop = None, None
    else:
        acts = probe.activation[0]
        # Active: |activation| above the threshold; writing -w_out strongly counts as much as +w_out.
        active = acts.abs() > threshold if threshold is not None else torch.ones_like(acts, dtype=torch.bool)
        positions = torch.nonzero(active).flatten()
        signs = targets[1]
        delta_h = probe.hidden[1:] - probe.hidden[0]  # [1 + R, T, d]
        # Per position, the mean oriented drop of T's logits (the strip under the prompt).
        logit_drop = -((delta_h[0] @ W[targets[0]].T) * signs).mean(-1)
        s = ablation.logit_selectivity(delta_h[0, positions] @ W.T, targets[0], signs, scored)
        baseline = [
            ablation.logit_selectivity(delta_h[1 + r, positions] @ W.T, *random_targets[r], scored)
            for r in range(len(random_deltas))
        ]
    return Effect(
        ids=list(ids),
        pre_activation=probe.pre_activation[:2] if probe.pre_activation is not None else None,
        activation=probe.activation[:2],
        active=active,
        positions=positions,
        logit_drop=logit_drop,
        selectivity=s,
        baseline=baseline,
        next_before=top_next(last[0], last[1]),
        next_after=top_next(last[1], last[0]),
        target_next=_target_next(last, targets[0]),
    )


def _target_next(last: torch.Tensor, target_ids: torch.Tensor) -> list[tuple[int, float, float]]:
    """last [2, V] next-token probabilities before and after: the TOP_NEXT tokens of T most
    likely either way, with both probabilities (what the ablation did to the channel's own
    tokens, which are rarely in the model's top five)."""
    if len(target_ids) == 0:
        return []
    ids = target_ids.long()
    either = torch.maximum(last[0, ids], last[1, ids])  # [T]
    order = torch.argsort(either, descending=True)[:TOP_NEXT]
    return [(int(ids[i]), float(last[0, ids[i]]), float(last[1, ids[i]])) for i in order]
