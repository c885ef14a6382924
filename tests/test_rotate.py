"""The ROTATE core against the formulas of docs/method.md, on small known inputs and planted data."""

import math

import pytest
import torch

from channelscope.method import rotate as R

# --- the formulas, read straight off docs/method.md -------------------------------------------------


def test_excess_kurtosis_matches_the_textbook_formula():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    mean = sum(x.tolist()) / 5
    m2 = sum((v - mean) ** 2 for v in x.tolist()) / 5
    m4 = sum((v - mean) ** 4 for v in x.tolist()) / 5
    assert R.excess_kurtosis(x).item() == pytest.approx(m4 / m2**2 - 3, rel=1e-6)
    gaussian = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(R.excess_kurtosis(gaussian).item()) < 0.05


def test_slog_and_reflection():
    assert R.slog(torch.tensor([-3.0, 0.0, 3.0])).tolist() == pytest.approx([-math.log(4), 0, math.log(4)])
    g = torch.Generator().manual_seed(1)
    u, w = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    c = R.reflect(u, w)
    assert torch.allclose(c.norm(dim=-1), w.norm(dim=-1))  # a reflection keeps the norm
    assert torch.allclose(R.reflect(u, c), w, atol=1e-5)  # and is its own inverse
    target = R.reflect(torch.randn(4, 16, generator=g), w)
    assert torch.allclose(R.reflect(w - target, w), target, atol=1e-5)  # H(w - c) w = c


def test_loss_gradient_matches_autograd():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 500, generator=g).pow(3).requires_grad_(True)
    m = torch.rand(3, 500, generator=g)
    c, w = torch.randn(3, 8, generator=g, requires_grad=True), torch.randn(3, 8, generator=g)
    s = R.Settings()
    loss = R.loss(z, m, c, w, s)
    auto_z, auto_c = torch.autograd.grad(loss.sum(), (z, c))
    k_term, grad_z, _ = R.loss_gradient_z(z.detach(), m, s)
    cos_term, grad_c = R.cosine_gradient(c.detach(), w, s)
    assert torch.allclose(k_term + cos_term, loss.detach(), atol=1e-6)
    assert torch.allclose(grad_z, auto_z, atol=1e-6, rtol=1e-4)
    assert torch.allclose(grad_c, auto_c, atol=1e-6, rtol=1e-4)


def test_fused_step_gradient_matches_autograd():
    """The explore step's dL/du in closed form (no autograd in the loop) against autograd
    through the reflection, the projection and the literal loss."""
    g = torch.Generator().manual_seed(12)
    n, d, V = 4, 16, 700
    U = torch.randn(d, V, generator=g).pow(3) + 0.5
    u, w = torch.randn(n, d, generator=g, requires_grad=True), torch.randn(n, d, generator=g)
    m = torch.rand(n, V, generator=g)
    s = R.Settings()
    c = R.reflect(u, w)
    auto_loss = R.loss(c @ U, m, c, w, s)
    (auto_u,) = torch.autograd.grad(auto_loss.sum(), u)
    c2, z, loss, grad_u, kurt = R._loss_and_u_gradient(u.detach(), w, R.Projection(U), m, s)
    assert torch.allclose(loss, auto_loss.detach(), atol=1e-5)
    assert torch.allclose(grad_u, auto_u, atol=1e-5, rtol=1e-3)
    assert torch.allclose(kurt, R.excess_kurtosis(z), atol=1e-4, rtol=1e-5)  # unweighted, for history


def test_compiled_and_eager_kernels_agree():
    g = torch.Generator().manual_seed(13)
    z, m = torch.randn(9, 5000, generator=g).pow(3), torch.rand(9, 5000, generator=g)
    R._kernels()
    if "compiled" not in R.KERNELS:
        pytest.skip("torch.compile is off here (CHANNELSCOPE_COMPILE=0 or no compiler)")
    eager, compiled = R.KERNELS["eager"](z, m, 0.3), R.KERNELS["compiled"](z, m, 0.3)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max()))


def test_a_kernel_that_fails_on_its_first_call_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no working C++ compiler")

    R._kernels()
    monkeypatch.setitem(R.KERNELS, "chosen", broken)
    g = torch.Generator().manual_seed(14)
    z, m = torch.randn(9, 300, generator=g), torch.rand(9, 300, generator=g)
    got = R.loss_gradient_z(z, m, R.Settings())
    assert R.KERNELS["chosen"] is R.KERNELS["eager"]
    for a, b in zip(got, R.KERNELS["eager"](z, m, 0.3), strict=True):
        assert torch.equal(a, b)


def test_checking_convergence_every_k_iterations_changes_nothing(monkeypatch):
    """Fixed-shape batches (CUDA) ask the device whether a row still runs every SYNC_EVERY
    iterations only; converged rows are frozen, so the channels are those of a check per step."""
    U, w, _, _ = _planted(seed=2)
    g = torch.Generator().manual_seed(4)
    batch = torch.cat([w[None], torch.randn(5, w.shape[0], generator=g)])
    s = R.with_overrides(R.Settings(), channels=2)
    m0, seeds = torch.ones(U.shape[1]), [R.neuron_seed(0, 1, "in", i) for i in range(6)]
    runs = []
    for every in (1, 8):
        monkeypatch.setattr(R, "SYNC_EVERY", every)
        runs.append(R.decompose(batch, R.Projection(U), m0, seeds, s, batch_size=8, fixed_shape=True))
    for a, b in zip(*runs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.vector, y.vector) and x.step == y.step and x.history == y.history


def test_subspace_derivatives_match_autograd():
    g = torch.Generator().manual_seed(3)
    n, k = 3, 4
    Y = torch.randn(n, k, 300, generator=g, dtype=torch.float64).pow(3)
    Y = Y - Y.mean(-1, keepdim=True)
    S2 = Y @ Y.transpose(1, 2) / 300
    pairs = (Y.unsqueeze(2) * Y.unsqueeze(1)).reshape(n, k * k, 300)
    M4 = (pairs @ pairs.transpose(1, 2) / 300).reshape(n, k, k, k, k)
    w_q = torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    s = R.Settings()
    value, grad, hess = R.subspace_loss(a, S2, M4, w_q, s)

    def single(a1, S2_1, M4_1, w1):
        return R.subspace_loss(a1[None], S2_1[None], M4_1[None], w1[None], s)[0][0]

    for i in range(n):
        auto_grad = torch.func.grad(single)(a[i], S2[i], M4[i], w_q[i])
        auto_hess = torch.func.hessian(single)(a[i], S2[i], M4[i], w_q[i])
        assert torch.allclose(grad[i], auto_grad, atol=1e-9)
        assert torch.allclose(hess[i], auto_hess, atol=1e-8)
    # and the value is the method's loss of the corresponding vector
    kurt = R.excess_kurtosis(torch.einsum("nk,nkv->nv", a, Y))
    cos = (w_q * a).sum(-1) / a.norm(dim=-1)
    assert torch.allclose(value, -s.lambda_k * R.slog(kurt) + s.lambda_f * (1 - cos))


def test_subspace_moments_give_the_loss_of_the_vector():
    g = torch.Generator().manual_seed(6)
    n, k, d, V = 3, 4, 16, 400
    U = torch.randn(d, V, generator=g, dtype=torch.float64).pow(3) + 2.0  # off-centre, as U is
    Q = torch.linalg.qr(torch.randn(n, d, k, generator=g, dtype=torch.float64))[0].transpose(1, 2)
    m = torch.rand(n, V, generator=g, dtype=torch.float64)
    m[:, :40] = 0.0
    w, r = torch.randn(n, d, generator=g, dtype=torch.float64), torch.full((n, 1), 3.0, dtype=torch.float64)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    S2, M4 = R._moments(Q @ U, m, r)
    w_q = torch.einsum("nkd,nd->nk", Q, w / w.norm(dim=-1, keepdim=True))
    value, _, _ = R.subspace_loss(a, S2, M4, w_q, R.Settings())
    c = r * torch.einsum("nk,nkd->nd", a / a.norm(dim=-1, keepdim=True), Q)
    assert torch.allclose(value, R.loss(c @ U, m, c, w, R.Settings()), atol=1e-9)


def test_masking_rule():
    s = R.Settings(mask_z=2.0)
    zs = torch.tensor([[3.0, -3.0, 1.0, 2.5, -2.5, 0.0]] * 3)
    scored = torch.tensor([True, True, True, True, True, False])
    skew = torch.tensor([11.0, -11.0, 5.0])
    claimed = R.tail_mask(zs, skew, scored, s)
    assert claimed[0].tolist() == [True, False, False, True, False, False]  # z > t only
    assert claimed[1].tolist() == [False, True, False, False, True, False]  # z < -t only
    assert claimed[2].tolist() == [True, True, False, True, True, False]  # |z| > t


def test_glitch_weights():
    U = torch.ones(4, 200)
    U[:, 7] = 10.0  # one high-norm column
    kinds = ["normal"] * 200
    kinds[0] = "control"
    kinds[1] = "unused"
    m0 = R.initial_token_weights(U, kinds, R.Settings())
    assert m0[0] == 0 and m0[1] == 0
    assert m0[7] == pytest.approx(1e-4)
    assert (m0[2:7] == 1).all() and (m0[8:] == 1).all()


def test_adamw_is_torch_adamw_with_warmup():
    s = R.PAPER
    g = torch.Generator().manual_seed(4)
    u0 = torch.randn(3, 8, generator=g)
    grads = [torch.randn(3, 8, generator=g) for _ in range(150)]
    param = torch.nn.Parameter(u0.clone())
    opt = torch.optim.AdamW([param], lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / s.warmup_steps))
    u = u0.clone()
    moments = (torch.zeros_like(u), torch.zeros_like(u))
    for step, grad in enumerate(grads):
        param.grad = grad.clone()
        opt.step()
        sched.step()
        u = R._adamw(u, grad, moments, torch.arange(3), step, s.lr, s.warmup_steps, s.betas, s)
    assert torch.allclose(u, param.detach(), atol=1e-6)


# --- the paper preset is the straightforward reading ---------------------------------------------


def _reference_paper_channel(w, U, m, u0, s):
    """One neuron, no batching, torch.optim: the preset exactly as docs/method.md words it, with
    its one departure from the paper ("The loss"): z is centred on its weighted mean before
    weighting."""
    u = torch.nn.Parameter(u0.clone())
    opt = torch.optim.AdamW([u], lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / s.warmup_steps))
    losses, best, best_k, best_step = [], None, -1.0, 0
    for step in range(s.max_steps + 1):
        c = w - 2 * u * (u @ w) / (u @ u)
        z = c @ U
        x = (z - (z * m).sum() / m.sum()) * m
        xc = x - x.mean()
        kurt = (xc**4).mean() / (xc**2).mean() ** 2 - 3
        cos = (c @ w) / (c.norm() * w.norm())
        loss = -s.lambda_k * torch.sign(kurt) * torch.log1p(kurt.abs()) + s.lambda_f * (1 - cos)
        losses.append(loss.item())
        window = torch.tensor(losses[-s.plateau_window :])
        stop = step == s.max_steps or (
            step >= s.plateau_from and len(window) == s.plateau_window and window.std() < s.plateau_std
        )
        if stop or (step > 0 and step % s.checkpoint_every == 0):
            zc = z.detach() - z.detach().mean()
            unweighted = (zc**4).mean() / (zc**2).mean() ** 2 - 3
            if unweighted.abs() > best_k:
                best, best_k, best_step = c.detach().clone(), unweighted.abs().item(), step
        if stop:
            return best, best_step
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    raise AssertionError("unreachable")


def test_paper_preset_equals_the_straightforward_reading():
    s = R.with_overrides(R.PAPER, max_steps=600, plateau_from=150, plateau_window=30, checkpoint_every=50)
    g = torch.Generator().manual_seed(5)
    U = torch.randn(12, 300, generator=g, dtype=torch.float64).pow(3)
    w = torch.randn(3, 12, generator=g, dtype=torch.float64)
    u0 = torch.randn(3, 12, generator=g, dtype=torch.float64)
    m = torch.ones(300, dtype=torch.float64)
    m[:5] = 1e-4
    proj = R.Projection(U)
    proj.exact = proj.low = U  # float64 throughout, so the two readings agree to rounding
    found = R.paper_channel(w, proj, m.expand(3, -1), u0, s)
    for i in range(3):
        vector, step = _reference_paper_channel(w[i], U, m, u0[i], s)
        assert int(found.step[i]) == step
        assert torch.allclose(found.vector[i], vector, atol=1e-8)


# --- planted structure ---------------------------------------------------------------------------


def _planted(seed=0, d=32, V=3000, groups=3, size=12):
    """A vocabulary with `groups` sparse token directions d_j planted in U, and a neuron w
    that mixes them with a little noise."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d, V, generator=g) / math.sqrt(d)
    directions = torch.linalg.qr(torch.randn(d, groups, generator=g))[0].T  # [groups, d] orthonormal
    token_sets = torch.randperm(V, generator=g)[: groups * size].reshape(groups, size)
    for j in range(groups):
        U[:, token_sets[j]] += 2.5 * directions[j].unsqueeze(-1)
    w = directions.sum(0) + 0.1 * torch.randn(d, generator=g)
    return U, w, directions, [set(t.tolist()) for t in token_sets]


@pytest.mark.parametrize("solver", ["fast", "paper"])
def test_both_solvers_recover_planted_token_sets(solver):
    U, w, directions, token_sets = _planted()
    s = R.with_overrides(R.PAPER if solver == "paper" else R.Settings(), channels=3)
    m0 = torch.ones(U.shape[1])
    (channels,) = R.decompose(w[None], R.Projection(U), m0, [7], s)
    cos_w = directions @ w / w.norm()
    recovered = set()
    for ch in channels:
        claimed = set(ch.masked.tolist())
        jaccard = [len(claimed & t) / len(claimed | t) for t in token_sets]
        j = max(range(len(token_sets)), key=lambda i: jaccard[i])
        assert jaccard[j] >= 0.8, (solver, jaccard)
        cos_c = float(directions[j] @ ch.vector / ch.vector.norm())
        assert cos_c > float(cos_w[j]) + 0.2, (solver, cos_c, float(cos_w[j]))
        recovered.add(j)
    assert recovered == {0, 1, 2}


def _shifted(seed=0, d=32, V=3000, size=12):
    """The hole in the literal loss K(z * m) (docs/method.md, "Where this departs from the
    paper"): every token of U shares an offset b, 60 tokens have weight 0, a weak sparse token
    set is planted along e, and w leans on b. A projection shifted along b makes the 60 zeros a
    tail of z * m (K(z * m) ~30 at unweighted K ~0.5), and under the literal loss that beats the
    planted set."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d, V, generator=g) / math.sqrt(d)
    e, b = torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T
    tokens = torch.randperm(V, generator=g)
    planted, zeros = tokens[:size], tokens[size : size + 60]
    U[:, planted] += 1.5 * e.unsqueeze(-1)
    U += 3.0 * b.unsqueeze(-1)
    w = e + 2.0 * b + 0.1 * torch.randn(d, generator=g)
    m0 = torch.ones(V)
    m0[zeros] = 0.0
    return U, w, m0, set(planted.tolist())


@pytest.mark.parametrize("solver", ["fast", "paper"])
def test_zero_weight_tokens_are_no_tail(solver):
    """Uncentred, both solvers returned the shifted direction: unweighted K 0.5 (fast) and 1.4
    (paper), no token claimed, and every later channel the same vector."""
    U, w, m0, planted = _shifted()
    s = R.with_overrides(R.PAPER if solver == "paper" else R.Settings(), channels=1)
    ((channel,),) = R.decompose(w[None], R.Projection(U), m0, [7], s)
    claimed = set(channel.masked.tolist())
    assert channel.kurtosis > 5, channel.kurtosis
    assert len(claimed & planted) / len(claimed | planted) >= 0.5, (claimed, planted)


@pytest.mark.parametrize("solver", ["fast", "paper"])
def test_a_neurons_channels_do_not_depend_on_its_batch(solver):
    U, w, _, _ = _planted(seed=1)
    g = torch.Generator().manual_seed(9)
    batch = torch.cat([w[None], torch.randn(11, w.shape[0], generator=g)])
    base = R.PAPER if solver == "paper" else R.Settings()
    s = R.with_overrides(base, channels=2, max_steps=2500)
    m0 = torch.ones(U.shape[1])
    seeds = [R.neuron_seed(0, 3, "out", i) for i in range(12)]
    alone = R.decompose(batch[:1], R.Projection(U), m0, seeds[:1], s)[0]
    together = R.decompose(batch, R.Projection(U), m0, seeds, s, batch_size=5)[0]
    # The CUDA mode: batches padded to batch_size, converged neurons frozen in place.
    fixed = R.decompose(batch, R.Projection(U), m0, seeds, s, batch_size=8, fixed_shape=True)
    assert len(fixed) == len(batch)
    for a, b, c in zip(alone, together, fixed[0], strict=True):
        assert torch.equal(a.vector, b.vector) and torch.equal(a.vector, c.vector)
        assert a.step == b.step == c.step and torch.equal(a.masked, b.masked)
        assert torch.equal(a.masked, c.masked) and a.history == c.history
    last = R.decompose(batch[11:], R.Projection(U), m0, seeds[11:], s)[0]  # padded in `fixed`
    assert all(torch.equal(a.vector, c.vector) for a, c in zip(last, fixed[11], strict=True))


def test_neuron_seed_depends_only_on_coordinates():
    assert R.neuron_seed(0, 25, "out", 7) == R.neuron_seed(0, 25, "out", 7)
    assert (
        len(
            {
                R.neuron_seed(0, 25, "out", 7),
                R.neuron_seed(1, 25, "out", 7),
                R.neuron_seed(0, 24, "out", 7),
                R.neuron_seed(0, 25, "in", 7),
            }
        )
        == 4
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batch_invariance_at_a_real_models_width(precision):
    """At d = 576 (SmolLM2) the CPU libraries choose kernels by row count where a tiny model's
    shapes never show it: GEMMs by their number of rows, row sums over a transposed view of w (a
    model's `out` vectors are one), a batched product for one row, and, above 32,768 values, a
    single row's sum split across threads. Both U and w come as transposed views here, as a
    model hands them over. In bf16 the GEMM library rounds a few outputs by the other rows'
    values, so there the test asks for the same channel, not the same bits (docs/method.md,
    "Determinism")."""
    g = torch.Generator().manual_seed(3)
    d, V, n = 576, 33_000, 20
    U = (torch.randn(V, d, generator=g) / d**0.5).T  # [d, V], a view of E^T
    U[:, :40] += 0.3 * torch.randn(d, 1, generator=g)  # a planted direction with a tail
    w = torch.randn(d, n, generator=g).T  # [n, d], a view, as model.vectors(layer, "out")
    m0 = torch.ones(V)
    seeds = [R.neuron_seed(0, 25, "out", i) for i in range(n)]
    s = R.Settings(channels=2, precision=precision)
    alone = R.decompose(w[:1], R.Projection(U, precision), m0, seeds[:1], s)[0]
    together = R.decompose(w, R.Projection(U, precision), m0, seeds, s, batch_size=n)[0]
    for a, b in zip(alone, together, strict=True):
        if precision == "fp32":
            assert torch.equal(a.vector, b.vector) and a.step == b.step
        else:
            assert float(R.cosine(a.vector, b.vector)) > 0.999


def test_projection_rows_do_not_depend_on_their_batch():
    """Every product is made in 64-row blocks from contiguous copies of U and U^T, so a row's
    product is the same bits in a batch of any size; a transposed bf16 view of U also stopped
    the process with SIGFPE at exactly 32 rows on an AMX CPU (torch 2.13)."""
    g = torch.Generator().manual_seed(4)
    U = torch.randn(4096, 576, generator=g).T  # [d, V] view
    c, gz = torch.randn(130, 576, generator=g), torch.randn(130, 4096, generator=g)
    for precision in ("fp32", "bf16"):
        proj = R.Projection(U, precision)
        first_c, first_g = proj.forward(c[:1]), proj.backward(gz[:1])
        for n in (8, 32, 64, 65, 130):
            assert torch.equal(proj.forward(c[:n])[:1], first_c), (precision, n)
            assert torch.equal(proj.backward(gz[:n])[:1], first_g), (precision, n)
        assert proj.passes == 2 * (1 + 8 + 32 + 64 + 65 + 130)
