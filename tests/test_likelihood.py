"""Log-likelihood by the change of variables, against Gaussian data whose rectified flow is known in closed form.

For x1 ~ N(mu, Σ) and x0 ~ N(0, I), x_t = (1-t)·x0 + t·x1 is Gaussian, and the flow's velocity is the regression
v(x, t) = E[x1 - x0 | x_t = x] = mu + (tΣ - (1-t)I)((1-t)²I + t²Σ)^-1 (x - t·mu), which carries N(0, I) to N(mu, Σ)
exactly: log p(x) under the flow is the Gaussian's own log-density.
"""
import json
import math

import pytest
import torch

import evaluate
from helpers import TINY, TINY_MNIST, tiny_checkpoint
from likelihood import bits_per_dim, dequantize, divergence, image_bits_per_dim, log_likelihood, rademacher
from solvers import Sampler
from unet import ConditionalUNet, ModelConfig

D = 6


def gaussian_flow(mu: torch.Tensor, q: torch.Tensor, s: torch.Tensor):
    """The closed-form velocity v(t, x) for x: (B, D) of data N(mu, Q diag(s²) Qᵀ), and that distribution."""
    def v(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = float(t)
        gain = (t * s**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * s**2)  # the matrix's eigenvalues, along Q's columns
        return mu + ((x - t * mu) @ q) * gain @ q.T

    cov = q @ torch.diag(s**2) @ q.T
    return v, torch.distributions.MultivariateNormal(mu, cov)


@pytest.fixture
def data64():
    """Float64 throughout, so the tolerances test the method rather than rounding."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    s = torch.rand(D, generator=g, dtype=torch.float64) + 0.3
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return mu, s, q, g


def test_exact_divergence_and_dopri5_give_the_gaussian_log_density(data64):
    mu, s, _, g = data64
    v, dist = gaussian_flow(mu, torch.eye(D, dtype=torch.float64), s)  # diagonal: x1 ~ N(mu, diag(s²))
    x = dist.sample((5,))
    log_p, noise, nfe = log_likelihood(v, x, Sampler("dopri5", 1, 1.0, 1e-8, 1e-8))
    assert torch.allclose(log_p, dist.log_prob(x), atol=1e-6)
    # the noise is where the exact map sends x: componentwise (x - mu) / s
    assert torch.allclose(noise, (x - mu) / s, atol=1e-6)
    assert nfe > 10


@pytest.mark.parametrize("solver,steps,tol", [("rk4", 64, 1e-4), ("midpoint", 256, 1e-3)])
def test_fixed_step_solvers_converge_to_it(data64, solver, steps, tol):
    mu, s, q, _ = data64
    v, dist = gaussian_flow(mu, q, s)
    x = dist.sample((4,))
    coarse = (log_likelihood(v, x, Sampler(solver, steps // 8))[0] - dist.log_prob(x)).abs().max()
    fine = (log_likelihood(v, x, Sampler(solver, steps))[0] - dist.log_prob(x)).abs().max()
    assert fine < tol and fine < coarse


def test_hutchinson_agrees_with_the_exact_log_density_in_expectation(data64):
    mu, s, q, _ = data64
    v, dist = gaussian_flow(mu, q, s)  # rotated: the Jacobian is not diagonal, so one probe has real variance
    x = dist.sample((1,)).repeat(2000, 1)  # one point, 2,000 independent single-probe estimates in one solve
    probes = rademacher(1, tuple(x.shape), seed=3, dtype=torch.float64)
    log_p, _, _ = log_likelihood(v, x, Sampler("dopri5", 1, 1.0, 1e-7, 1e-7), probes)
    exact = dist.log_prob(x[:1])
    se = log_p.std() / len(log_p) ** 0.5
    assert log_p.std() > 0.05  # the estimator is noisy...
    assert (log_p.mean() - exact).abs() < 4 * se  # ...and unbiased


def test_exact_divergence_is_the_trace_of_a_linear_map():
    a = torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    out, div = divergence(lambda z: (z.flatten(1) @ a.T).view(z.shape), x)
    assert torch.allclose(div, torch.trace(a).expand(3))
    assert torch.allclose(out, (x.flatten(1) @ a.T).view(x.shape))


def test_divergence_of_a_unet_matches_its_jacobian():
    torch.manual_seed(0)
    model = ConditionalUNet(TINY).double().eval()
    for p in model.parameters():  # zero-initialised output layers would make the Jacobian zero
        p.data.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64), torch.arange(3)
    f = lambda z: model(z, t, y)  # noqa: E731
    jac = torch.autograd.functional.jacobian(lambda z: f(z).sum(0), x).reshape(64, 3, 64)
    trace = torch.stack([jac[:, b, :].diagonal().sum() for b in range(3)])
    _, exact = divergence(f, x)
    assert torch.allclose(exact, trace, atol=1e-9)
    k = 1000  # single-probe estimates per image, as one batch of repeated images
    rep = lambda z: z.repeat_interleave(k, 0)  # noqa: E731
    probes = rademacher(1, (3 * k, 1, 8, 8), seed=0, dtype=torch.float64)
    _, estimates = divergence(lambda z: model(z, rep(t), rep(y)), rep(x), probes)
    estimates = estimates.view(3, k)
    se = estimates.std(1) / k**0.5
    assert (estimates.std(1) > 0.1 * trace.abs()).all()  # single probes are noisy...
    assert ((estimates.mean(1) - trace).abs() < 4 * se).all()  # ...and unbiased


def test_bits_per_dim_of_the_uniform_density_is_eight():
    dims = 784
    log_uniform = torch.tensor([-dims * math.log(2)])  # density 2^-D on [-1, 1]^D
    assert bits_per_dim(log_uniform, dims).item() == pytest.approx(8.0)


def test_dequantize_stays_in_each_pixel_bin():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(4, 1)
    z = dequantize(pixels, seed=0)
    assert z.min() >= -1 and z.max() <= 1
    assert torch.equal(((z + 1) * 128).floor().to(torch.uint8), pixels)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(pixels.float())


def test_image_bits_per_dim_runs_on_a_unet_and_refuses_bad_input():
    torch.manual_seed(0)
    model = ConditionalUNet(TINY).eval()
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    # an untrained U-Net's velocity is zero (zero-initialised output): the flow is the identity, log p the prior's
    identity = image_bits_per_dim(model, pixels, labels, Sampler("euler", 2), divergence="exact")
    z = dequantize(pixels, seed=0)
    prior = -0.5 * (z.flatten(1).square().sum(1) + 64 * math.log(2 * math.pi))
    assert identity["per_image"] == pytest.approx(bits_per_dim(prior, 64).tolist(), abs=1e-5)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    exact = image_bits_per_dim(model, pixels, labels, Sampler("euler", 4), divergence="exact")
    many = image_bits_per_dim(model, pixels, labels, Sampler("euler", 4), probes=100)
    assert len(exact["per_image"]) == 4 and exact["nfe"] == 4 and exact["probes"] == 0
    assert abs(exact["bpd"] - identity["bpd"]) > 0.05  # the flow now moves the points
    assert many["bpd"] == pytest.approx(exact["bpd"], abs=0.02)
    with pytest.raises(ValueError, match="uint8"):
        image_bits_per_dim(model, pixels.float() / 255, labels)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        image_bits_per_dim(model, pixels[:, :, :4], labels)
    with pytest.raises(ValueError, match="one per image"):
        image_bits_per_dim(model, pixels, labels[:3])
    with pytest.raises(ValueError, match="out of range"):
        image_bits_per_dim(model, pixels, torch.tensor([0, 1, 2, 4]))  # 3 is the null label: log p(x)
    with pytest.raises(ValueError, match="unknown divergence"):
        image_bits_per_dim(model, pixels, labels, divergence="skilling")
    unconditional = ConditionalUNet(ModelConfig(**{**TINY.__dict__, "num_classes": None}))
    with pytest.raises(ValueError, match="unconditional"):
        image_bits_per_dim(unconditional, pixels, labels)


def test_evaluate_likelihood_cli(tmp_path, mnist_root):
    path = tmp_path / "mnist.pth"
    tiny_checkpoint(path, TINY_MNIST)
    args = ["likelihood", "--checkpoint", str(path), "--data-root", str(mnist_root), "--n", "20", "--solver", "euler",
            "--steps", "2"]
    result = evaluate.main([*args, "--json", str(tmp_path / "l.json")])
    assert result["n"] == 20 and result["conditional"] and not result["marginal"] and result["nfe"] == 2
    assert 0 < result["bpd"] < 16 and result["bpd_se"] > 0
    assert json.loads((tmp_path / "l.json").read_text())["bpd"] == result["bpd"]
    marginal = evaluate.main([*args, "--marginal"])
    assert marginal["marginal"] and marginal["bpd"] != result["bpd"]
    with pytest.raises(ValueError, match="multiple of 10"):
        evaluate.main([*args[:5], "--n", "25"])
    tiny_checkpoint(tmp_path / "no_null.pth", TINY_MNIST, label_dropout=0.0)
    with pytest.raises(ValueError, match="label-dropout"):
        evaluate.main(["likelihood", "--checkpoint", str(tmp_path / "no_null.pth"), "--data-root", str(mnist_root),
                       "--n", "10", "--marginal", "--solver", "euler", "--steps", "1"])
