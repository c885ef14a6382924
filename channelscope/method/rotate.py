"""ROTATE: decompose MLP neuron vectors into vocabulary channels.

"Disentangling MLP Neuron Weights in Vocabulary Space" (arXiv 2604.06005), as specified in
docs/method.md, whose section names the comments below give in quotes. Pure: tensors in,
tensors and dataclasses out; no files, no database, no CLI. Batched over neurons, on whatever
device the tensors live on.

Notation (docs/method.md, "Notation"):
  w [N, d]  neuron vectors (one side of one layer)      U [d, V]  projection (unembedding)
  c [N, d]  a channel, c = H(u) w, |c| = |w|            z [N, V]  its projection c @ U
  m [N, V]  per-neuron token weights                     K         excess kurtosis over all V

    loss = -lambda_k * slog(K((z - mu) * m)) + lambda_f * (1 - cos(w, c)),   mu = sum(m z) / sum(m)

The centring by mu departs from the literal K(z * m) ("The loss", "Where this departs from the
paper"): uncentred, a channel whose projection sits ~11 standard deviations off zero makes the ~500 tokens
of weight 0 or 1e-4 a tail, K(z * m) ~26 with an unweighted K ~0.6, and the solvers found exactly
that. With mu, low-weight tokens sit at the centre of the scored ones, where they cannot form a tail.

Two solvers minimise the same loss for one channel:
  paper_channel  the published preset: AdamW on the Householder vector u (reference, slow);
  fast_channel   a subspace method on the sphere |c| = |w| (default, ~60x fewer passes over U).
`decompose` peels off channels one after another by masking the tokens each channel claimed.

Determinism: each neuron has its own generator seed and its own plateau stop, so its channels
do not depend on its batch-mates. On the CPU they are bit-identical in any batch (tested). On
CUDA, cuBLAS and PyTorch's reductions choose their summation order by the shape of the batch,
and a token near the masking threshold can turn a last-bit difference into a different later
channel (measured on an H200: bench/README.md). So on CUDA every batch has the same shape:
`decompose` pads it to batch_size rows, and the solvers freeze a converged neuron in place
instead of dropping it (`fixed_shape`). A neuron's channels then depend on batch_size, never on
its batch-mates.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every knob of docs/method.md. Defaults are the paper's (Llama family: t = 6)."""

    channels: int = 50
    lambda_k: float = 0.3
    lambda_f: float = 1.0
    # Deflation ("Many channels: masking").
    mask_z: float = 6.0  # t
    mask_skew: float = 10.0  # |skew| above which only one tail is masked
    mask_weight: float = 0.01
    # Glitch tokens: weight 0 for control/unused, glitch_weight above this U column-norm quantile.
    glitch_quantile: float = 0.99
    glitch_weight: float = 1e-4
    # Optional, off by default ("Generic channels"): down-weight the tokens that the
    # random-vector reference finds on the tails of many channels. Applied by the caller via m0.
    downweight_generic: bool = False
    solver: str = "fast"  # "fast" | "paper"
    # GEMM precision against U inside the solver: "fp32", "bf16" (faster only on hardware with
    # native bf16; the reported numbers are always recomputed in fp32) or "auto": the faster one
    # on this machine, resolved before a run is made (method/precision.py).
    precision: str = "auto"
    # Paper preset.
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 10_000
    plateau_window: int = 100
    plateau_std: float = 1e-4
    plateau_from: int = 2_000
    checkpoint_every: int = 100
    # Fast solver (see fast_channel): explore with AdamW on u, then descend on the sphere until
    # an iteration gains less than fast_tol, or at the cap. Tuned in bench/solver.py.
    fast_explore_steps: int = 50
    fast_explore_lr: float = 0.05
    fast_explore_warmup: int = 5
    fast_max_iters: int = 60
    fast_tol: float = 1e-5
    fast_history: int = 2  # past steps kept in the search subspace besides c and the gradient
    fast_max_angle: float = 0.3  # radians per iteration: a trust region


PAPER = Settings(solver="paper", precision="fp32")

# With fixed-shape batches (CUDA), the descent asks the device whether any row still runs only
# every SYNC_EVERY iterations: a converged row is frozen in place, so checking later changes
# nothing but the few iterations computed after the last row stopped.
SYNC_EVERY = 8

# No solver step sees fewer rows than this ("Determinism"): `decompose` pads a smaller batch with
# copies of its first neuron, and a shrinking batch keeps stopped rows, frozen, up to this many.
ROWS_AT_LEAST = 8


# --- the formulas ------------------------------------------------------------------------------


def excess_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Population excess kurtosis along the last axis; a Gaussian scores 0 ("Excess kurtosis, skew
    and slog"). [..., V] -> [...]"""
    centred = x - x.mean(-1, keepdim=True)
    m2 = centred.pow(2).mean(-1)
    return centred.pow(4).mean(-1) / m2.pow(2) - 3


def skewness(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred.pow(3).mean(-1) / centred.pow(2).mean(-1).pow(1.5)


def slog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def reflect(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Householder reflection H(u) w = w - 2 u (u.w) / |u|^2. [N, d] -> [N, d]"""
    return w - 2 * u * (u * w).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def centred_weighted(z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x = (z - mu) m, mu = sum(m z) / sum(m): the projection centred on the tokens that count,
    then weighted (see the module's docstring for why). sum over tokens of x is 0. [N, V] -> [N, V]"""
    mu = (z * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
    return (z - mu) * m


def loss(z: torch.Tensor, m: torch.Tensor, c: torch.Tensor, w: torch.Tensor, s: Settings):
    """The method's loss per neuron ("The loss"). z [N, V], m [N, V], c and w [N, d] -> [N]"""
    return -s.lambda_k * slog(excess_kurtosis(centred_weighted(z, m))) + s.lambda_f * (1 - cosine(w, c))


def loss_gradient_z(z: torch.Tensor, m: torch.Tensor, s: Settings):
    """The kurtosis term and its gradient with respect to z, in closed form ("The fused step").
    With x = (z - mu) m (mean 0), moments m2..m4 over V tokens,
        dK/dx_j = A x_j^3 + B x_j + const,  A = 4 / (V m2^2),  B = -4 m4 / (V m2^3),
        dK/dz_i = m_i (dK/dx_i - sum_j m_j dK/dx_j / sum_j m_j)   (mu moves with z),
    so the constant cancels and dK/dz = m (A x^3 + B x - (A sum m x^3 + B sum m x) / sum m).
    Two sweeps over [N, V]: reductions, then the gradient, the one [N, V] result; compiled,
    neither keeps a temporary (KERNELS). The same sweep gives the unweighted excess kurtosis of
    z, which the solvers record. Returns (kurtosis term [N], d term / dz [N, V], K(z) [N]).

    Fewer than 8 rows are padded with copies of the first: the compiled kernel specialises a
    single row and reduces it in another order, and a neuron's numbers must not depend on its
    batch-mates (ROWS_AT_LEAST, as the solvers' batches)."""
    n = z.shape[0]
    if 0 < n < ROWS_AT_LEAST:
        fill = ROWS_AT_LEAST - n
        z, m = torch.cat([z, z[:1].expand(fill, -1)]), torch.cat([m, m[:1].expand(fill, -1)])
    kernel = _kernels()
    try:
        term, grad, kurt = kernel(z, m, s.lambda_k)
    except Exception:  # compiling failed on its first call (no working compiler): eager from now on
        if kernel is KERNELS["eager"]:
            raise
        KERNELS["chosen"] = KERNELS["eager"]
        term, grad, kurt = KERNELS["eager"](z, m, s.lambda_k)
    return term[:n], grad[:n], kurt[:n]


def _kurtosis_term_and_gradient(z: torch.Tensor, m: torch.Tensor, lambda_k: float):
    V = z.shape[-1]
    m_sum = m.sum(-1, keepdim=True)  # [N, 1]
    mu = (z * m).sum(-1, keepdim=True) / m_sum  # [N, 1]
    x = (z - mu) * m  # [N, V], the one temporary in eager mode
    x2 = x * x
    m2, m4 = x2.mean(-1, keepdim=True), (x2 * x2).mean(-1, keepdim=True)
    mx3, mx1 = (x2 * x * m).sum(-1, keepdim=True), (x * m).sum(-1, keepdim=True)
    del x2
    kurt = m4 / (m2 * m2) - 3  # [N, 1]
    A = 4 / (V * m2 * m2)
    B = -4 * m4 / (V * m2 * m2 * m2)
    scale = -lambda_k / (1 + kurt.abs())
    shift = (A * mx3 + B * mx1) / m_sum
    grad = scale * m * (A * x * x * x + B * x - shift)  # [N, V]
    y2 = (z - z.mean(-1, keepdim=True)).pow(2)  # unweighted, for the history
    plain = (y2 * y2).mean(-1) / y2.mean(-1).pow(2) - 3
    return -lambda_k * slog(kurt).squeeze(-1), grad, plain


KERNELS: dict[str, Callable] = {"eager": _kurtosis_term_and_gradient}


def _kernels() -> Callable:
    """The [N, V] part of the step: torch.compile'd on the CPU, where it measured faster
    (bench/README.md, "The fused step"), unless CHANNELSCOPE_COMPILE=0; eager elsewhere and as
    the fallback. The two agree to rounding (tests/test_rotate.py)."""
    if "chosen" not in KERNELS:
        KERNELS["chosen"] = KERNELS["eager"]
        if os.environ.get("CHANNELSCOPE_COMPILE", "1") != "0":
            KERNELS["compiled"] = torch.compile(_kurtosis_term_and_gradient, dynamic=True)
            KERNELS["chosen"] = KERNELS["compiled"]
    return KERNELS["chosen"]


def cosine_gradient(c: torch.Tensor, w: torch.Tensor, s: Settings):
    """The cosine term and its gradient with respect to c: d cos / dc = w^/|c| - cos c/|c|^2."""
    c_norm = c.norm(dim=-1, keepdim=True)
    w_hat = w / w.norm(dim=-1, keepdim=True)
    cos = (c * w_hat).sum(-1, keepdim=True) / c_norm
    grad = -s.lambda_f * (w_hat / c_norm - cos * c / c_norm.pow(2))
    return s.lambda_f * (1 - cos.squeeze(-1)), grad


# --- projection onto the vocabulary ----------------------------------------------------------


class Projection:
    """U at the GEMM precision of the run, counting passes over it ("Precision").

    A pass is one [n, d] x [d, V] product or its transpose; `passes` counts them per neuron
    (an n-row product adds n).

    A neuron's numbers must not depend on its batch-mates ("Determinism"). A CPU GEMM library
    picks its kernel and its split of the long reduction by the number of rows: at SmolLM2's
    shapes a row of a 64-row product differs in the last bits from the same row in an 8-row
    one, and later channels then differ (measured: bench/README.md, "Batch invariance on the
    CPU"). So on the CPU every product is made in blocks of exactly BLOCK rows, the last one
    padded with zeros; a row's result is then the same in any batch, at any position in it. On
    CUDA the batch itself has a fixed shape (`fixed_shape`), so one product serves.
    Both passes read contiguous copies (U and U^T): a product with a transposed view picks
    other kernels, which are not the same in every batch either, and in bf16 one of them stops
    the process with SIGFPE at exactly 32 rows (torch 2.13 on a CPU with AMX)."""

    BLOCK = 64  # rows per CPU GEMM: 2/3-3/4 of a 256-row product's rate (8 rows: 1/10-1/5)

    def __init__(self, U: torch.Tensor, precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}")
        self.exact = U.float().contiguous()  # [d, V]; a model's U is often a view of E^T
        self.low = self.exact.to(torch.bfloat16) if precision == "bf16" else self.exact
        self.low_t = self.low.T.contiguous()  # [V, d]
        self.block = None if U.is_cuda else self.BLOCK
        self.passes = 0

    def forward(self, c: torch.Tensor, exact: bool = False) -> torch.Tensor:  # [n, d] -> [n, V]
        return self._product(c, self.exact if exact else self.low)

    def backward(self, gz: torch.Tensor) -> torch.Tensor:  # [n, V] -> [n, d]
        return self._product(gz, self.low_t)

    def _product(self, rows: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        n, dtype = rows.shape[0], rows.dtype
        self.passes += n
        x = rows.to(W.dtype)
        if self.block is None:
            return (x @ W).to(dtype)
        padded = -(-n // self.block) * self.block
        if padded != n:
            x = torch.cat([x, x.new_zeros(padded - n, x.shape[1])])
        out = x.new_empty(padded, W.shape[1])
        for start in range(0, padded, self.block):
            torch.matmul(x[start : start + self.block], W, out=out[start : start + self.block])
        return out[:n].to(dtype)


# --- one channel, paper preset -----------------------------------------------------------------


@dataclass
class Found:
    """One channel per neuron, as a solver returns it."""

    vector: torch.Tensor  # [N, d]
    loss: torch.Tensor  # [N] under the token weights it was found with
    step: torch.Tensor  # [N] the step it was found at (paper: the best checkpoint)
    history: list[list[float]]  # per neuron: unweighted kurtosis at each checkpoint / iteration
    steps: torch.Tensor | None = None  # [N] optimisation steps run until the stop rule


def paper_channel(
    w: torch.Tensor, proj: Projection, m: torch.Tensor, u0: torch.Tensor, s: Settings, fixed_shape=False
):
    """AdamW on u, warm-up, plateau stop per neuron, best checkpoint by |K| of the unweighted
    projection ("The paper preset"). A neuron that stops is frozen; the rest go on.
    With fixed_shape, stopped neurons stay in the batch (their updates are ignored)."""
    n = w.shape[0]
    u = u0.clone()  # [N, d]
    moments = (torch.zeros_like(u), torch.zeros_like(u))  # AdamW's exp_avg, exp_avg_sq, [N, d] each
    recent = w.new_zeros(n, s.plateau_window)  # [N, window] last losses, a ring
    best_abs_k = w.new_full((n,), -1.0)
    best = Found(
        w.clone(), w.new_zeros(n), torch.zeros(n, dtype=torch.long), [], torch.zeros(n, dtype=torch.long)
    )
    history = w.new_full((n, s.max_steps // s.checkpoint_every + 2), float("nan"))  # [N, checkpoints]
    scored_count = torch.zeros(n, dtype=torch.long, device=w.device)  # [N] checkpoints so far
    active = torch.arange(n, device=w.device)  # [n] rows still in the batch (all, with fixed_shape)
    running = torch.ones(n, dtype=torch.bool, device=w.device)  # [N] not stopped yet
    for step in range(s.max_steps + 1):  # `step` updates of u have been made so far
        # c [n, d], z [n, V], loss_now [n], grad_u [n, d]: two passes over U
        c, z, loss_now, grad_u, _ = _loss_and_u_gradient(u[active], w[active], proj, m[active], s)
        live = running[active]
        recent[active, step % s.plateau_window] = loss_now
        plateau = torch.zeros_like(loss_now, dtype=torch.bool)
        if step >= max(s.plateau_from, s.plateau_window):
            plateau = recent[active].std(-1) < s.plateau_std
        stopping = (plateau | (step == s.max_steps)) & live
        scoring = (stopping | (step > 0 and step % s.checkpoint_every == 0)) & live
        if scoring.any():  # a checkpoint: keep c if its unweighted |K| is the best so far
            kurt = excess_kurtosis(z)  # [n]
            rows = active[scoring]
            history[rows, scored_count[rows]] = kurt[scoring]
            scored_count[rows] += 1
            kept = scoring & (kurt.abs() > best_abs_k[active])
            idx = active[kept]
            best_abs_k[idx], best.vector[idx] = kurt[kept].abs(), c[kept]
            best.loss[idx], best.step[idx.cpu()] = loss_now[kept], step
        best.steps[active[stopping].cpu()] = step
        running[active[stopping]] = False
        if not running.any():
            break
        u[active] = _adamw(u[active], grad_u, moments, active, step, s.lr, s.warmup_steps, s.betas, s)
        if not fixed_shape:
            active = active[_staying(running[active])]
    best.history = _rows_without_nan(history)
    return best


def _loss_and_u_gradient(u, w, proj: Projection, m, s: Settings):
    """c = H(u) w, z = c @ U, the loss, and its gradient with respect to u (two passes), all
    in closed form ("The loss"). No autograd: see reflect_gradient for the reflection. Also
    returns K(z) [n], unweighted."""
    c = reflect(u, w)  # [n, d]
    z = proj.forward(c)  # [n, V], pass 1
    k_term, gz, kurt = loss_gradient_z(z, m, s)  # [n], [n, V], [n]
    cos_term, gc = cosine_gradient(c, w, s)  # [n], [n, d]
    grad_u = reflect_gradient(u, w, proj.backward(gz) + gc)  # pass 2, [n, d]
    return c, z, k_term + cos_term, grad_u, kurt


def reflect_gradient(u: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/du from g = dL/dc through c = w - 2 u a / b, a = u.w, b = u.u:
    dL/du = -2 / b (a g + (g.u) w - 2 a (g.u) u / b).   [N, d] each"""
    a, b = (u * w).sum(-1, keepdim=True), (u * u).sum(-1, keepdim=True)
    gu = (g * u).sum(-1, keepdim=True)
    return (-2 / b) * (a * g + gu * w - 2 * a * gu * u / b)


def _adamw(u, grad, moments, active, step: int, lr: float, warmup: int, betas, s: Settings):
    """torch.optim.AdamW's update (decoupled weight decay) after a linear warm-up, on the active
    rows of the moment buffers."""
    exp_avg, exp_avg_sq = moments
    lr = lr * min(1.0, (step + 1) / warmup)
    beta1, beta2 = betas
    exp_avg[active] = exp_avg[active] * beta1 + grad * (1 - beta1)
    exp_avg_sq[active] = exp_avg_sq[active] * beta2 + grad * grad * (1 - beta2)
    bias1, bias2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
    denom = (exp_avg_sq[active].sqrt() / bias2**0.5) + 1e-8
    return u * (1 - lr * s.weight_decay) - (lr / bias1) * exp_avg[active] / denom


# --- one channel, fast solver ------------------------------------------------------------------


def fast_channel(
    w: torch.Tensor, proj: Projection, m: torch.Tensor, u0: torch.Tensor, s: Settings, fixed_shape=False
):
    """The same loss in two phases ("The fast solver").

    Explore: the paper's own optimiser (AdamW on the Householder vector u, from the same u0) at
    a much higher learning rate, for a few dozen steps, with its moment decays rescaled to that
    time step. Which minimum the paper preset ends in is decided by the path AdamW takes in
    u-space; plain descent on the sphere from w runs into a different, often shallower one (the
    generic direction, mostly) about one time in six.

    Descend: minimise directly on the sphere |c| = |w| (a reflection reaches exactly that
    sphere). Each iteration spends two passes over U: the gradient (back through U^T) and the
    projection of the gradient. The search space is then span(c, gradient, last few steps),
    whose projections are all known, so the loss restricted to it is a ratio of a quartic and a
    squared quadratic form in a few coefficients: its 4th-moment tensor is built once per
    iteration from the V-long projections, and the subspace minimum is found by damped Newton on
    k numbers, with no further pass over U. Stops when an iteration gains less than fast_tol."""
    n = w.shape[0]
    history = w.new_full((n, s.fast_explore_steps + s.fast_max_iters + 1), float("nan"))  # [N, steps]
    u = u0.clone()  # [N, d]
    moments = (torch.zeros_like(u), torch.zeros_like(u))  # [N, d] each
    everyone = torch.arange(n, device=w.device)
    # One step here stands for `scale` of the preset's, so the moment averages keep the preset's
    # memory in steps of its own time: beta ** scale (0.9 -> 0.001, 0.999 -> 0.94). With the
    # preset's own betas, parity with the preset was 87% of neurons; see bench/README.md.
    scale = s.fast_explore_lr / s.lr
    betas = (s.betas[0] ** scale, s.betas[1] ** scale)
    for step in range(s.fast_explore_steps):  # explore: every row runs every step, 2 passes each
        _, _, _, grad_u, history[:, step] = _loss_and_u_gradient(u, w, proj, m, s)  # grad_u [N, d]
        u = _adamw(u, grad_u, moments, everyone, step, s.fast_explore_lr, s.fast_explore_warmup, betas, s)
    found = _descend(w, proj, m, reflect(u, w), s, history, s.fast_explore_steps, fixed_shape)
    found.history = _rows_without_nan(history)
    found.steps = found.step.clone()
    return found


def _descend(w, proj: Projection, m, c, s: Settings, history, first_step: int, fixed_shape: bool) -> Found:
    """The descent on the sphere |c| = |w| from c [N, d] ("The fast solver", "Descent"). The rows
    still running are `active` [n]; c [n, d] and z = c @ U [n, V] are carried along by linearity."""
    n = w.shape[0]
    radius = w.norm(dim=-1, keepdim=True)  # [N, 1]
    z = proj.forward(c)  # [N, V], the descent's only pass that is not part of an iteration
    past: list[tuple[torch.Tensor, torch.Tensor]] = []  # previous steps [n, d] and projections [n, V]
    found = Found(c.clone(), w.new_zeros(n), torch.zeros(n, dtype=torch.long, device=w.device), [])
    active = torch.arange(n, device=w.device)
    running = torch.ones(n, dtype=torch.bool, device=w.device)
    previous_loss = w.new_full((n,), float("inf"))
    m_active = m  # [n, V] the token weights of the rows in the batch, gathered only when rows leave
    for iteration in range(s.fast_max_iters + 1):
        k_term, gz, kurt = loss_gradient_z(z, m_active, s)  # [n], [n, V], [n]
        cos_term, gc = cosine_gradient(c, w[active], s)  # [n], [n, d]
        loss_now = k_term + cos_term  # [n]
        live = running[active]
        column = first_step + iteration
        history[active, column] = torch.where(live, kurt, history[active, column])
        done = ((previous_loss - loss_now < s.fast_tol) | (iteration == s.fast_max_iters)) & live
        previous_loss = loss_now
        if fixed_shape:  # rows stay in place; nothing here waits for the device
            found.vector = torch.where(done.unsqueeze(-1), c, found.vector)
            found.loss = torch.where(done, loss_now, found.loss)
            found.step = torch.where(done, column, found.step)
            running = running & ~done
            check = (iteration + 1) % SYNC_EVERY == 0 or iteration == s.fast_max_iters
            if check and not running.any():  # the loop's one host-device synchronisation
                break
        elif done.any():
            idx = active[done]
            found.vector[idx], found.loss[idx] = c[done], loss_now[done]
            found.step[idx] = column
            running[idx] = False
            if not running.any():
                break
            keep = _staying(running[active])
            if not keep.all():
                active, c, z, previous_loss = active[keep], c[keep], z[keep], previous_loss[keep]
                m_active = m_active[keep]
                gz, gc = gz[keep], gc[keep]
                past = [(p[keep], zp[keep]) for p, zp in past]
        r = radius[active]  # [n, 1]
        grad = proj.backward(gz) + gc  # [n, d], pass 1 of 2
        c_hat = c / r
        grad = grad - (grad * c_hat).sum(-1, keepdim=True) * c_hat  # tangent to the sphere
        # pass 2 of 2: the gradient's projection; c's and the past steps' are known already
        Q, ZQ = _orthonormal([(c_hat, z / r), (grad, proj.forward(grad)), *past])  # [n, k, d], [n, k, V]
        coef = _subspace_minimum(Q, ZQ, m_active, w[active], r, s)  # [n, k]
        c_new = r * torch.einsum("nk,nkd->nd", coef, Q)  # [n, d]
        z_new = r * torch.einsum("nk,nkv->nv", coef, ZQ)  # [n, V], no pass: z is linear in c
        past = [(c_new - c, z_new - z), *past][: s.fast_history]
        c, z = c_new, z_new
    found.step = found.step.cpu()
    return found


def _staying(live: torch.Tensor) -> torch.Tensor:
    """[n] bool: the rows that stay in a shrinking batch: the running ones, topped up with stopped
    ones (frozen, as with fixed_shape) to ROWS_AT_LEAST. With more than one thread, torch sums a
    single row's V values in two passes split across the threads, in another order than it sums
    the same row among others: a neuron left running alone would get other last bits."""
    short = ROWS_AT_LEAST - int(live.sum())
    if short <= 0:
        return live
    stay = live.clone()
    stay[(~live).nonzero().flatten()[:short]] = True
    return stay


def _rows_without_nan(table: torch.Tensor) -> list[list[float]]:
    return [[x for x in row if x == x] for row in table.cpu().tolist()]


def _orthonormal(pairs):
    """Gram-Schmidt on d-vectors, applying the same combinations to their V-long projections.
    A vector with nothing new in it (the first iteration's empty step) becomes zero.
    pairs: k of (v [n, d], zv = v @ U [n, V]); returns Q [n, k, d] orthonormal rows and
    ZQ = Q @ U [n, k, V], each row written in place (no stacked copy of the [n, V] projections)."""
    v0, zv0 = pairs[0]
    Q = v0.new_empty(v0.shape[0], len(pairs), v0.shape[1])
    ZQ = zv0.new_empty(zv0.shape[0], len(pairs), zv0.shape[1])
    for t, (v, zv) in enumerate(pairs):
        q_t, zq_t = Q[:, t], ZQ[:, t]
        for s in range(t):
            coef = (v * Q[:, s]).sum(-1, keepdim=True)  # [n, 1]
            v = v - coef * Q[:, s]
            if s == 0:
                torch.sub(zv, coef * ZQ[:, s], out=zq_t)
            else:
                zq_t.sub_(coef * ZQ[:, s])
        norm = v.norm(dim=-1, keepdim=True)
        scale = torch.where(norm > 1e-6, 1 / norm.clamp_min(1e-30), torch.zeros_like(norm))
        torch.mul(v, scale, out=q_t)
        if t == 0:
            torch.mul(zv, scale, out=zq_t)
        else:
            zq_t.mul_(scale)
    return Q, ZQ


def _subspace_minimum(Q, ZQ, m, w, r, s: Settings, newton_steps: int = 12):
    """argmin over unit a of the loss of c = r Q a, starting from a = e1 (the current c).

    With Y = r (ZQ - mu) * m (mu per row of ZQ, as in centred_weighted), the loss's x is Y^T a, so
        K(a) = M4[a,a,a,a] / (a^T S2 a)^2 - 3,   S2 = Y Y^T / V,   M4 = mean_v Y Y Y Y,
    and cos(w, c) = (Q w / |w|) . a / |a|. Damped Newton on a = e1 + (0, t), |t| <= tan(max angle).
    Q [n, k, d] orthonormal rows, ZQ [n, k, V] their projections."""
    n, k, _ = ZQ.shape
    S2, M4 = _moments(ZQ, m, r)  # [n, k, k], [n, k, k, k, k], float64
    # An elementwise product and a row sum, not einsum: einsum's batched product takes another
    # kernel for a single row, and a neuron left running alone must get the same numbers.
    w_q = (Q * (w / w.norm(dim=-1, keepdim=True)).unsqueeze(1)).sum(-1).double()  # [n, k]
    t = torch.zeros(n, k - 1, dtype=torch.float64, device=ZQ.device)  # [n, k - 1]
    damping = torch.full((n, 1, 1), 1e-6, dtype=torch.float64, device=ZQ.device)
    eye = torch.eye(k - 1, dtype=torch.float64, device=ZQ.device)
    radius = math.tan(s.fast_max_angle)  # |t| = tan(angle between a and e1)
    with_e1 = lambda t: torch.cat([torch.ones_like(t[:, :1]), t], 1)  # noqa: E731
    value, grad, hess = subspace_loss(with_e1(t), S2, M4, w_q, s)
    for _ in range(newton_steps):  # on k numbers per row: no pass over U
        g, h = grad[:, 1:], hess[:, 1:, 1:]  # [n, k-1], [n, k-1, k-1]: a = e1 + (0, t) is affine in t
        # Per row, not over the batch: whether a neuron moves must not depend on its batch-mates.
        moving = g.abs().amax(-1) >= 1e-12
        if not moving.any():
            break
        # Levenberg-Marquardt: a rejected step retries next round with ten times the damping.
        scale = h.abs().amax((1, 2), keepdim=True) + 1e-12
        step = torch.linalg.solve(h + damping * scale * eye, g.unsqueeze(-1)).squeeze(-1)
        trial = t - step
        trial = trial * (radius / trial.norm(dim=-1, keepdim=True).clamp_min(radius))
        trial_value, trial_grad, trial_hess = subspace_loss(with_e1(trial), S2, M4, w_q, s)
        better = (trial_value < value) & torch.isfinite(trial_value) & moving
        t = torch.where(better.unsqueeze(-1), trial, t)
        value = torch.where(better, trial_value, value)
        grad = torch.where(better.unsqueeze(-1), trial_grad, grad)
        hess = torch.where(better.view(n, 1, 1), trial_hess, hess)
        damping = torch.where(better.view(n, 1, 1), damping / 10, damping * 10).clamp(1e-9, 1e9)
    a = with_e1(t)
    return (a / a.norm(dim=-1, keepdim=True)).float()


def _moments(ZQ, m, r, chunk: int = 2048):
    """S2 [n, k, k] and M4 [n, k, k, k, k] of Y = r (ZQ - mu) * m, in float64. mu is linear in the
    projection, so Y^T a = centred_weighted(r a^T ZQ, m), and Y has mean 0 over the V tokens.
    Token by token chunks keep the k(k+1)/2 products in cache: built whole, they would be the
    largest tensors of the solver. The products are written row by row of the upper triangle
    (i <= j, row-major, the order of triu_indices) with broadcasting: a gather Y[:, i] * Y[:, j]
    gives the same numbers 6x slower (bench/README.md, "On the 2026-12-06 machine")."""
    n, k, V = ZQ.shape
    weights = r.unsqueeze(-1) * m.unsqueeze(1)  # [n, 1, V]: r m
    mean = (ZQ * m.unsqueeze(1)).sum(-1, keepdim=True) / m.sum(-1).view(n, 1, 1)  # [n, k, 1]
    i, j = torch.triu_indices(k, k, device=ZQ.device)
    S2 = ZQ.new_zeros(n, k, k)
    gram = ZQ.new_zeros(n, len(i), len(i))
    pairs_buffer = ZQ.new_empty(n, len(i), chunk)  # [n, P, chunk], P = k(k+1)/2 distinct products
    for start in range(0, V, chunk):
        Y = (ZQ[:, :, start : start + chunk] - mean) * weights[:, :, start : start + chunk]  # [n, k, chunk]
        pairs = pairs_buffer if Y.shape[-1] == chunk else ZQ.new_empty(n, len(i), Y.shape[-1])  # contiguous
        row = 0
        for a in range(k):  # pairs (a, a..k-1)
            torch.mul(Y[:, a : a + 1], Y[:, a:], out=pairs[:, row : row + k - a])
            row += k - a
        S2 += Y @ Y.transpose(1, 2)
        gram += pairs @ pairs.transpose(1, 2)
    pair_index = torch.zeros(k, k, dtype=torch.long, device=ZQ.device)
    pair_index[i, j] = pair_index[j, i] = torch.arange(len(i), device=ZQ.device)
    M4 = gram[:, pair_index.view(k, k, 1, 1), pair_index.view(1, 1, k, k)]
    return (S2 / V).double(), (M4 / V).double()


def subspace_loss(a, S2, M4, w_q, s: Settings):
    """The loss at subspace coefficients a [n, k] (any scale), its gradient [n, k] and Hessian
    [n, k, k], by hand. q4 = M4[a,a,a,a], q2 = a^T S2 a, K = q4 / q2^2 - 3, h = w_q.a / |a|."""
    M4aa = torch.einsum("nijkl,nk,nl->nij", M4, a, a)
    g4 = 4 * torch.einsum("nij,nj->ni", M4aa, a)  # grad q4
    q4 = (g4 * a).sum(-1) / 4
    g2 = 2 * torch.einsum("nij,nj->ni", S2, a)  # grad q2
    q2 = (g2 * a).sum(-1) / 2
    kurt = q4 / q2**2 - 3
    outer = lambda x, y: x.unsqueeze(-1) * y.unsqueeze(-2)  # noqa: E731
    _q2 = q2.view(-1, 1)
    grad_k = g4 / _q2**2 - 2 * q4.view(-1, 1) * g2 / _q2**3
    _q2, _q4 = q2.view(-1, 1, 1), q4.view(-1, 1, 1)
    hess_k = (
        12 * M4aa / _q2**2
        - 2 * (outer(g4, g2) + outer(g2, g4)) / _q2**3
        - 4 * _q4 * S2 / _q2**3
        + 6 * _q4 * outer(g2, g2) / _q2**4
    )
    slope = 1 / (1 + kurt.abs())  # slog'(K); slog''(K) = -sign(K) slope^2
    norm, wa = a.norm(dim=-1), (w_q * a).sum(-1)
    _n, _wa = norm.view(-1, 1), wa.view(-1, 1)
    grad_h = w_q / _n - _wa * a / _n**3
    _n, _wa = norm.view(-1, 1, 1), wa.view(-1, 1, 1)
    eye = torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    hess_h = -(outer(w_q, a) + outer(a, w_q)) / _n**3 - _wa * eye / _n**3 + 3 * _wa * outer(a, a) / _n**5
    value = -s.lambda_k * slog(kurt) + s.lambda_f * (1 - wa / norm)
    grad = -s.lambda_k * slope.view(-1, 1) * grad_k - s.lambda_f * grad_h
    sl = slope.view(-1, 1, 1)
    hess = (
        -s.lambda_k * (sl * hess_k - torch.sign(kurt).view(-1, 1, 1) * sl**2 * outer(grad_k, grad_k))
        - s.lambda_f * hess_h
    )
    return value, grad, hess


SOLVERS: dict[str, Callable] = {"fast": fast_channel, "paper": paper_channel}


# --- many channels -----------------------------------------------------------------------------


def initial_token_weights(U: torch.Tensor, kinds: list[str], s: Settings) -> torch.Tensor:
    """m0 [V]: 0 for control and unused tokens, glitch_weight where |U column| is above the
    quantile, 1 elsewhere ("Glitch tokens"). Tokens of weight 1 are the scored ones."""
    norms = U.float().norm(dim=0)
    m0 = torch.ones_like(norms)
    m0[norms > torch.quantile(norms, s.glitch_quantile)] = s.glitch_weight
    special = torch.tensor([kind != "normal" for kind in kinds], device=U.device)
    m0[special] = 0.0
    return m0


def z_scores(z: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Standardise each row over the scored (weight-1) tokens only; [N, V] -> [N, V]."""
    values = z[:, scored]
    return (z - values.mean(-1, keepdim=True)) / values.std(-1, unbiased=False, keepdim=True)


def tail_skew(z: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Skewness over the scored tokens, the tokens of the z-scores: its sign is the side of a
    projection's tail (the unscored ones, weight 0 or 1e-4, are part of no tail). [N, V] -> [N]"""
    return skewness(z[..., scored])


def tail_mask(zs: torch.Tensor, skew: torch.Tensor, scored: torch.Tensor, s: Settings):
    """The tokens a channel claims: z > t if skew > 10, z < -t if skew < -10, |z| > t otherwise."""
    upper, lower = zs > s.mask_z, zs < -s.mask_z
    sk = skew.unsqueeze(-1)
    claimed = torch.where(sk > s.mask_skew, upper, torch.where(sk < -s.mask_skew, lower, upper | lower))
    return claimed & scored


def neuron_seed(run_seed: int, layer: int, side: str, neuron: int) -> int:
    """A neuron's generator seed depends on nothing but its own coordinates ("Determinism")."""
    key = f"{run_seed}/{layer}/{side}/{neuron}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


@dataclass
class Channel:
    vector: torch.Tensor  # [d] float32, on the CPU
    kurtosis: float  # excess kurtosis of the unweighted projection
    skew: float  # over the scored tokens, as the z-scores: its sign is the side of T_k and top tokens
    cos: float  # cos(w, c)
    loss: float  # under the token weights it was found with
    masked: torch.Tensor  # token ids it claimed (T_k), int64
    step: int
    history: list[float]  # unweighted kurtosis against step / iteration


def decompose(
    w: torch.Tensor,
    proj: Projection,
    m0: torch.Tensor,
    seeds: list[int],
    s: Settings,
    batch_size: int = 256,
    on_channel: Callable[[int], None] | None = None,
    fixed_shape: bool | None = None,
    on_projection: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
):
    """C channels for each neuron vector in w [N, d]: a list (per neuron) of lists of Channel
    ("Many channels: masking", "Determinism").

    Every channel is a reflection of the original w; only the token weights change between
    channels. `seeds` gives each neuron its own generator (see neuron_seed), so a neuron's
    channels are the same in any batch. `on_channel(n)` reports n neuron-channels done.
    fixed_shape (default: on CUDA) pads every batch to batch_size rows (see the module's
    "Determinism"). on_projection(start, k, z, claimed), if given, sees the fp32 projection
    z [n, V] of channel k of rows start..start + n - 1 and the tokens it claimed [n, V], so the
    measures need no pass of their own ("Measures from the solver's projections")."""
    if fixed_shape is None:
        fixed_shape = w.is_cuda
    # Row sums over a transposed view (a model's `out` vectors are one) reduce several rows at
    # once, in an order that depends on the row count: batch-mates would then matter.
    w = w.contiguous()
    results = []
    for start in range(0, w.shape[0], batch_size):
        part, part_seeds = w[start : start + batch_size], seeds[start : start + batch_size]
        n = len(part)
        rows = max(batch_size, ROWS_AT_LEAST) if fixed_shape else ROWS_AT_LEAST
        if n < rows:  # copies of the first neuron, dropped afterwards
            part = torch.cat([part, part[:1].expand(rows - n, -1)])
            part_seeds = part_seeds + part_seeds[:1] * (rows - n)
        report = (lambda k, z, claimed, at=start: on_projection(at, k, z, claimed)) if on_projection else None
        results += _decompose_batch(part, proj, m0, part_seeds, s, fixed_shape, n, on_channel, report)
    return results


def _decompose_batch(w, proj, m0, seeds, s, fixed_shape, real, on_channel, on_projection=None):
    """The channels of the first `real` rows of w [N, d] (the rest is padding); "Many channels:
    masking". w is never deflated: only the token weights m change between channels."""
    n, d = w.shape
    scored = m0 == 1  # [V]
    m = m0.expand(n, -1).clone()  # [N, V]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    solve = SOLVERS[s.solver]
    channels: list[list[Channel]] = [[] for _ in range(real)]
    for k in range(s.channels):
        u0 = torch.stack([torch.randn(d, generator=g) for g in generators]).to(w.device)  # [N, d]
        found = solve(w, proj, m, u0, s, fixed_shape)  # found.vector [N, d]
        z = proj.forward(found.vector, exact=True)  # [N, V] in fp32, whatever the solver's precision
        found.loss = loss(z, m, found.vector, w, s)
        kurt, skew = excess_kurtosis(z), tail_skew(z, scored)  # [N] each
        claimed = tail_mask(z_scores(z, scored), skew, scored, s)  # [N, V] bool: T_k per row
        m = torch.where(claimed, torch.clamp(m, max=s.mask_weight), m)
        if on_projection:
            on_projection(k, z[:real], claimed[:real])
        cos = cosine(w, found.vector)  # [N]
        for i in range(real):
            channels[i].append(
                Channel(
                    vector=found.vector[i].cpu(),
                    kurtosis=float(kurt[i]),
                    skew=float(skew[i]),
                    cos=float(cos[i]),
                    loss=float(found.loss[i]),
                    masked=torch.nonzero(claimed[i]).flatten().cpu(),
                    step=int(found.step[i]),
                    history=found.history[i],
                )
            )
        if on_channel:
            on_channel(real)
    return channels


def with_overrides(s: Settings, **changes) -> Settings:
    return replace(s, **{k: v for k, v in changes.items() if v is not None})
