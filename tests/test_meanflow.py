"""MeanFlow: the JVP's total derivative, the average-velocity identity on a closed-form field, the loss's
limits, one-step sampling from the checkpoint alone, DDP, exact resume and the stop on a non-finite loss."""
import json
import math
from dataclasses import replace

import pytest
import torch

import flow
import runlog
import trainer
from checkpoint import RunRecord, load_checkpoint
from flow import (MeanFlowConfig, curriculum_alpha, difference_derivative, flow_matching_loss, interval_target,
                  mean_flow_loss)
from helpers import Field, TINY, assert_same_weights, blobs, ctrl_c_at_step, fit, tiny_config, total_derivative
from sampling import MEANFLOW_SAMPLER, load_for_sampling, sample_from_checkpoint, sample_model
from solvers import Sampler
from test_trainer import run_ddp_worker
from config import run_kind
from unet import ConditionalUNet

MF = replace(TINY, average_velocity=True, dropout=0.0)  # no dropout: the same function in every call


def mf_model(seed: int = 0) -> ConditionalUNet:
    """A tiny average-velocity U-Net with every layer away from its zero initialisation."""
    torch.manual_seed(seed)
    model = ConditionalUNet(MF).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_the_jvp_is_the_total_derivative_along_the_path():
    """du/dt = v·∂_x u + ∂_t u (t_end fixed) equals a central finite difference along (x + s·v, t + s), the one
    training's difference_derivative takes (fp64 here, so rounding stays out)."""
    model = mf_model()
    g = torch.Generator().manual_seed(1)
    x, v = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, t_end = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64), torch.full((4,), 0.9, dtype=torch.float64)
    y = torch.arange(4) % 3
    with torch.no_grad():
        u, du_dt = total_derivative(model, x, t, t_end, y, v)
        assert torch.allclose(u, model(x, t, y, t_end))
        assert du_dt.abs().max() > 1e-2  # not trivially zero

        def error(eps: float) -> float:
            fd = difference_derivative(model, x, t, t_end, y, v, eps)
            return ((fd - du_dt).abs().max() / du_dt.abs().max()).item()

        # the central difference converges to the JVP as eps² (the time embedding's high frequencies need small eps)
        assert error(1e-6) < 1e-6
        assert error(1e-5) / error(1e-6) == pytest.approx(100, rel=0.1)
        fd = difference_derivative(model, x, t, t_end, y, v, 1e-5)
        assert ((fd - du_dt).norm() / du_dt.norm()).item() < 1e-4


def test_the_jvp_runs_where_a_fused_attention_kernel_would_be_picked():
    """channels_last fp32 on a CPU picks SDPA's flash kernel, which has no forward-mode AD: the JVP takes the math
    kernel."""
    model = mf_model().float()
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, t_end, y = torch.tensor([0.2, 0.4]), torch.tensor([0.6, 0.9]), torch.tensor([0, 1])
    with torch.no_grad():
        plain = total_derivative(model, x, t, t_end, y, v)[1]
        model = model.to(memory_format=torch.channels_last)
        last = total_derivative(model, x.contiguous(memory_format=torch.channels_last), t, t_end, y, v)[1]
    # the derivative runs to ~1e2 on this untrained net: the layouts' different fp32 sums differ by ~1e-6 of that
    assert (plain - last).abs().max() <= 1e-5 * plain.abs().max()


class LinearODE(torch.nn.Module):
    """dx/dt = a·x: the average velocity over [t, t_end] is x·(e^{a h} - 1)/h with h = t_end - t (a at h = 0)."""

    config = MF

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x, t, y=None, t_end=None):
        h = (t_end - t).view(-1, 1, 1, 1) if t_end is not None else torch.zeros(len(x), 1, 1, 1, dtype=x.dtype)
        factor = torch.where(h > 0, torch.expm1(self.a * h) / h.clamp_min(1e-12), torch.full_like(h, self.a))
        return x * factor


def test_the_mean_flow_identity_holds_for_a_closed_form_average_velocity():
    """u(x_t, t, t_end) = v(x_t, t) + (t_end - t)·du/dt (Eq. 6 in this repo's time direction), and one jump
    with the average velocity lands where the ODE does."""
    field, a = LinearODE(-1.3), -1.3
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t, t_end = torch.tensor([0.0, 0.2, 0.6], dtype=torch.float64), torch.tensor([1.0, 0.5, 0.9], dtype=torch.float64)
    u, du_dt = total_derivative(field, x, t, t_end, None, a * x)
    assert torch.allclose(u, a * x + (t_end - t).view(-1, 1, 1, 1) * du_dt, atol=1e-12)
    jumped = x + (t_end - t).view(-1, 1, 1, 1) * u
    assert torch.allclose(jumped, x * torch.exp(a * (t_end - t)).view(-1, 1, 1, 1), atol=1e-12)


class PointData(torch.nn.Module):
    """The exact average velocity when all data is one image c: paths are straight, u = (c - x)/(1 - t)."""

    config = replace(MF, num_classes=None, image_size=2)

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t, y=None, t_end=None):
        return (self.c - x) / (1 - t).view(-1, 1, 1, 1)


def test_the_loss_is_zero_for_the_exact_average_velocity():
    """A wrong sign in the tangent or the identity would give du/dt != 0 here, and a positive loss."""
    c = torch.full((1, 1, 2, 2), 0.5)
    x1, every = c.expand(64, -1, -1, -1), dict(label_dropout=0.0)
    # the difference quotient is exact up to fp32 rounding / h
    exact = Field(PointData(c))
    assert mean_flow_loss(exact, x1, None, MeanFlowConfig(mf_share=1.0, mf_weight_power=0), **every) < 1e-4
    zero = Field(lambda x, t, y, e=None: torch.zeros_like(x))
    assert mean_flow_loss(zero, x1, None, MeanFlowConfig(mf_share=1.0), **every) > 0.5


def test_where_t_end_equals_t_the_loss_is_flow_matching(monkeypatch):
    model = mf_model().float()
    x1, x0 = torch.rand(8, 1, 8, 8) * 2 - 1, torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 3
    t = torch.linspace(0.05, 0.95, 8)
    monkeypatch.setattr(flow, "mean_flow_times", lambda n, *a, **k: (t, t))
    monkeypatch.setattr(flow, "sample_t", lambda n, *a, **k: t)
    flow_matching_only = MeanFlowConfig(mf_share=0.0, mf_weight_power=0.0)
    mf = mean_flow_loss(model, x1, y, flow_matching_only, label_dropout=0.0, x0=x0)
    fm = flow_matching_loss(model, x1, y, 3, 0.0, x0=x0)
    assert mf.item() == pytest.approx(fm.item(), rel=1e-6)


def test_interval_times_are_sorted_and_a_share_of_them_are_intervals():
    t, t_end = flow.mean_flow_times(1000, share=0.4, mu=-0.4, sigma=1.0)
    assert t.shape == t_end.shape == (1000,) and bool((t_end >= t).all()) and bool((t >= 0).all())
    assert bool((t_end[:400] > t[:400]).all()) and torch.equal(t_end[400:], t[400:])  # the rest: flow matching


def test_the_alpha_flow_target_is_v_at_one_and_meanflows_to_first_order():
    """α·v + (1 - α)·u(x + α·Δ·v, t + α·Δ, t_end) = u + α·(v + Δ·du/dt - u) + O(α²), Δ = t_end - t: at α = 1 the
    target is v (trajectory flow matching), and (target - u) / α converges to MeanFlow's target - u as α."""
    model = mf_model()
    g = torch.Generator().manual_seed(2)
    x, v = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.1, 0.2, 0.4, 0.6], dtype=torch.float64)
    t_end, y = torch.tensor([0.3, 0.9, 1.0, 0.7], dtype=torch.float64), torch.arange(4) % 3
    assert torch.equal(interval_target(model, x, t, t_end, y, v, alpha=1.0), v)
    with torch.no_grad():
        u, du_dt = total_derivative(model, x, t, t_end, y, v)
    meanflow = v + (t_end - t).view(-1, 1, 1, 1) * du_dt - u
    assert meanflow.abs().max() > 0.1  # u is far from its target: the comparison is not trivial

    def error(alpha: float) -> float:
        step = (interval_target(model, x, t, t_end, y, v, alpha=alpha) - u) / alpha
        return ((step - meanflow).norm() / meanflow.norm()).item()

    # first order: the error falls tenfold per decade of α (the random time embedding's high frequencies need small α)
    assert error(1e-5) < 5e-3
    assert error(1e-4) / error(1e-5) == pytest.approx(10, rel=0.2)


def test_the_curriculum_anneals_alpha_from_flow_matching_to_meanflow():
    assert [curriculum_alpha(p, 1.0) for p in (0.0, 0.5, 0.75, 1.0)] == [1.0, 0.5, 0.0, 0.0]
    assert curriculum_alpha(0.3, 0.5) == pytest.approx(1 - 1 / (1 + math.exp(-25 * 0.1)))  # centred at span / 2
    alphas = [curriculum_alpha(i / 100, 0.8) for i in range(101)]
    assert all(a >= b for a, b in zip(alphas, alphas[1:])) and alphas[0] == 1.0 and alphas[57] == 0.0
    assert curriculum_alpha(0.0, 0.0) == curriculum_alpha(0.9, 0.0) == 0.0  # no curriculum: MeanFlow throughout


def test_a_curriculum_run_logs_alpha_falling_from_one_to_zero(tmp_path):
    cfg = tiny_config(tmp_path, objective="meanflow")
    fit(cfg, TINY, blobs(), None, meanflow=MeanFlowConfig(mf_curriculum=1.0))
    assert load_checkpoint(tmp_path / "ck" / "last.pth")["train_config"]["mf_guidance"] == 1.5  # the default, resolved
    records = [json.loads(line) for line in (tmp_path / "ck" / "log.jsonl").read_text().splitlines()]
    alphas = [r["mf_alpha"] for r in records if r["kind"] == "step"]
    assert len(alphas) == 6 and alphas[0] == 1.0 and alphas[-1] == 0.0  # steps 2, 4, ..., 12 of 12
    assert all(a >= b for a, b in zip(alphas, alphas[1:])) and any(0 < a < 1 for a in alphas)
    fit(tiny_config(tmp_path / "fm"), TINY, blobs(), None)  # flow matching: the default curriculum has no α to log
    assert "mf_alpha" not in (tmp_path / "fm" / "ck" / "log.jsonl").read_text()


def test_folded_guidance_mixes_the_unconditional_velocity_into_the_target(monkeypatch):
    """Target for labelled items: w·v + (1 - w)·u(x_t, t, t | null); dropped labels keep v (Eq. 13-14)."""
    seen = {}

    def model(x, t, y, t_end=None):
        null = (y == 3).view(-1, 1, 1, 1)
        out = torch.where(null, torch.full_like(x, 2.0), torch.zeros_like(x))  # u(. | null) = 2, u(. | y) = 0
        if x.requires_grad or t_end is not None:
            seen["y"] = y
        return out

    x1, x0 = torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    monkeypatch.setattr(flow, "drop_labels", lambda y, p, null_class: torch.tensor([0, 3, 2, 0]))
    plain = MeanFlowConfig(mf_share=0.0, mf_weight_power=0.0, mf_guidance=3.0)
    loss = mean_flow_loss(Field(model, num_classes=3), x1, y, plain, label_dropout=0.5, x0=x0)
    # v = 0; labelled items: target 3·0 + (1 - 3)·2 = -4 against a prediction of 0; the dropped one: 0 against 2
    assert loss.item() == pytest.approx((3 * 16 + 4) / 4)


def test_a_meanflow_run_records_its_one_step_sampler_and_samples_in_one_evaluation(tmp_path):
    cfg = tiny_config(tmp_path, objective="meanflow")
    record = RunRecord(run_kind(cfg), MEANFLOW_SAMPLER.record())
    summary = fit(cfg, TINY, blobs(), blobs(24, seed=1), record, meanflow=MeanFlowConfig(mf_share=0.5))
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["kind"] == "meanflow" and ckpt["model_config"]["average_velocity"]
    loaded = load_for_sampling(ckpt)
    assert loaded.sampler == Sampler("meanflow", 1, 1.0)
    samples = sample_model(loaded.model, 6, None, loaded.sampler)
    assert samples.nfe == 1 and samples.images.shape == (6, 1, 8, 8)
    images = sample_from_checkpoint(summary["checkpoint"], batch_size=6, seed=0)
    assert torch.equal(images, samples.images)  # the recorded sampler, without being told
    two = sample_model(loaded.model, 6, None, Sampler("meanflow", 2, 1.5))
    assert two.nfe == 4  # two jumps, each guided: cond + uncond
    with pytest.raises(ValueError, match="solver meanflow jumps along average velocities"):
        sample_model(ConditionalUNet(TINY), 2, None, Sampler("meanflow", 1))
    with pytest.raises(ValueError, match="needs a model trained with --objective meanflow"):
        ConditionalUNet(TINY)(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1))


@pytest.mark.parametrize("curriculum", [0.0, 1.0])
def test_meanflow_resume_equals_an_uninterrupted_run(tmp_path, curriculum):
    make = lambda name, **kw: tiny_config(tmp_path / name, objective="meanflow", **kw)  # noqa: E731
    mf = MeanFlowConfig(mf_guidance=2.0, mf_curriculum=curriculum)
    fit(make("straight"), TINY, blobs(), None, meanflow=mf)
    with ctrl_c_at_step(5):
        assert fit(make("parts"), TINY, blobs(), None, meanflow=mf)["step"] == 5
    fit(make("parts", resume="auto"), TINY, blobs(), None, meanflow=mf)
    assert_same_weights(load_checkpoint(tmp_path / "straight" / "ck" / "last.pth"),
                        load_checkpoint(tmp_path / "parts" / "ck" / "last.pth"))


def test_meanflow_under_ddp_keeps_both_ranks_identical(tmp_path):
    run_ddp_worker(tmp_path, "cpu", "0", "meanflow")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert "interval_embed.mlp.0.weight" in r0["weights"]
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN in epoch 2 (step 9): epoch 1's checkpoint stays what is on disk, nothing after it is written."""
    original = trainer.mean_flow_loss
    step = {"n": 0}

    def failing(*args, **kwargs):
        step["n"] += 1
        loss = original(*args, **kwargs)
        return loss * math.nan if step["n"] == 9 else loss

    monkeypatch.setattr(trainer, "mean_flow_loss", failing)
    cfg = tiny_config(tmp_path, objective="meanflow", log_every=100)
    message = r"became nan at step 9: stopped, and the last good checkpoint is"
    with pytest.raises(runlog.TrainingDiverged, match=message):
        fit(cfg, TINY, blobs(), None)
    last = load_checkpoint(tmp_path / "ck" / "last.pth")
    assert last["step"] == 6 and all(torch.isfinite(w).all() for w in last["model_state"].values())
    assert not (tmp_path / "ck" / "epoch_2.pth").exists()


@pytest.mark.parametrize("flags, message", [
    (dict(t_grid=2), "--t-grid"),
    (dict(mf_share=1.5), "--mf-share must lie in"),
    (dict(mf_curriculum=2.0), "--mf-curriculum must lie in"),
    (dict(mf_sigma=0.0), "--mf-sigma must be > 0"),
    (dict(mf_guidance=float("nan")), "--mf-guidance >= 0"),
])
def test_impossible_meanflow_settings_are_refused(tmp_path, flags, message):
    mf = {k: flags.pop(k) for k in list(flags) if k.startswith("mf_")}
    with pytest.raises(ValueError, match=message):
        fit(tiny_config(tmp_path, objective="meanflow", **flags), TINY, blobs(), None, meanflow=MeanFlowConfig(**mf))
    with pytest.raises(ValueError, match="unknown --objective 'mean'"):
        fit(tiny_config(tmp_path, objective="mean"), TINY, blobs(), None)


def test_folded_guidance_needs_the_null_label(tmp_path):
    with pytest.raises(ValueError, match="--mf-guidance 2.0 folds classifier-free guidance"):
        fit(tiny_config(tmp_path, objective="meanflow", label_dropout=0.0), TINY, blobs(), None,
              meanflow=MeanFlowConfig(mf_guidance=2.0))


@pytest.mark.parametrize("curriculum", [0.0, 1.0])
def test_meanflow_trains_under_bf16_autocast(tmp_path, curriculum):
    """The derivative leaves autocast (forward-mode AD refuses its mixed dtypes) and runs in fp32; the loss pass and
    α-Flow's target pass are bf16."""
    cfg = tiny_config(tmp_path, objective="meanflow", amp="bf16", epochs=1)
    summary = fit(cfg, TINY, blobs(), None, meanflow=MeanFlowConfig(mf_curriculum=curriculum))
    ckpt = load_checkpoint(tmp_path / "ck" / "last.pth")
    assert math.isfinite(summary["loss"]) and ckpt["train_config"]["amp"] == "bf16" and ckpt["step"] == 6
