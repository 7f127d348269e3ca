"""One step from a flow: the warm start across objectives (u(x, t, t_end) = v(x, t) at step 0), the paths on the
flow's grid and the regression onto them, lineage, exact resume and the refusals."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import reflow
from checkpoint import (CheckpointError, RunRecord, load_checkpoint, load_ema_weights, model_config_from,
                        save_checkpoint, sha256)
from flow import MeanFlowConfig, grid_map_loss
from helpers import TINY, assert_same_weights, blobs, ctrl_c_at_step, fit, tiny_checkpoint, tiny_config
from sampling import SampleConfig
from solvers import solve
from unet import ConditionalUNet

FLOW = Path(__file__).resolve().parent.parent / "pretrained" / "mnist-1rf"


def test_a_flow_starts_a_meanflow_model_with_u_equal_to_v_at_every_interval():
    """The committed flow into the average-velocity U-Net: u(x, t, t_end) equals the flow's v(x, t) bit for bit."""
    ckpt = load_checkpoint(FLOW)
    cfg = replace(model_config_from(ckpt), average_velocity=True)
    student, flow = ConditionalUNet(cfg).eval(), ConditionalUNet(model_config_from(ckpt)).eval()
    flow.load_state_dict(ckpt["ema_state"]["weights"])
    lineage = load_ema_weights(FLOW, cfg, [student], torch.device("cpu"))
    assert lineage == {"parent": str(FLOW), "parent_sha256": sha256(FLOW), "parent_kind": "1-rectified"}
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 28, 28, generator=g), torch.rand(6, generator=g)
    t_end, y = t + (1 - t) * torch.rand(6, generator=g), torch.tensor([0, 3, 7, 9, 10, 2])  # 10: the null label
    with torch.no_grad():
        v = flow(x, t, y)
        assert torch.equal(student(x, t, y, t_end), v) and torch.equal(student(x, t, y), v)
        assert not torch.equal(student(x, t, y, t_end), student(x, t_end, y, t_end))  # not trivially constant


def convert(tmp_path: Path, name: str, parent: Path, **overrides):
    cfg = tiny_config(tmp_path / name, objective="meanflow", **{"init_from": str(parent), **overrides})
    return fit(cfg, TINY, blobs(), blobs(24, seed=1), RunRecord("meanflow"), meanflow=MeanFlowConfig(mf_curriculum=0.3))


def test_a_converted_run_records_its_parent_and_resumes_bit_exactly(tmp_path):
    parent = tmp_path / "flow.pth"
    tiny_checkpoint(parent)
    straight = convert(tmp_path, "straight", parent)
    ckpt = load_checkpoint(straight["checkpoint"])
    assert ckpt["lineage"] == {"parent": str(parent), "parent_sha256": sha256(parent), "parent_kind": "1-rectified"}
    assert ckpt["model_config"]["average_velocity"] and ckpt["kind"] == "meanflow"
    last = load_checkpoint(tmp_path / "straight" / "ck" / "last.pth")
    assert last["optimizer_state"]["state"][0]["step"] == 12  # a fresh optimizer: its steps are this run's alone
    with ctrl_c_at_step(5):
        assert convert(tmp_path, "parts", parent)["step"] == 5
    resumed = convert(tmp_path, "parts", parent, resume="auto", init_from="")
    assert_same_weights(load_checkpoint(tmp_path / "straight" / "ck" / "last.pth"),
                        load_checkpoint(tmp_path / "parts" / "ck" / "last.pth"))
    assert load_checkpoint(resumed["checkpoint"])["lineage"]["parent_sha256"] == sha256(parent)


@pytest.mark.parametrize("change, message", [
    (dict(image_size=16, attention_resolutions=(8,)), "image_size: 16 vs 8"),
    (dict(in_channels=3), "in_channels: 3 vs 1"),
    (dict(num_classes=5), "num_classes: 5 vs 3"),
    ("kind", "records kind 'painting', which this code does not know"),
    ("meanflow-into-flow", "average_velocity: True vs False"),
])
def test_a_parent_of_other_data_or_kind_is_one_line_and_nothing_is_written(tmp_path, change, message):
    parent = tmp_path / "parent.pth"
    if change == "kind":
        tiny_checkpoint(parent)
        save_checkpoint(parent, {**torch.load(parent, weights_only=True), "kind": "painting"})
    else:
        tiny_checkpoint(parent, replace(TINY, average_velocity=True) if change == "meanflow-into-flow"
                        else replace(TINY, **change))
    objective = "flow-matching" if change == "meanflow-into-flow" else "meanflow"
    cfg = tiny_config(tmp_path / "run", objective=objective, init_from=str(parent))
    with pytest.raises(CheckpointError, match=message) as error:
        fit(cfg, TINY, blobs(), None)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "ck").exists() or not any((tmp_path / "run" / "ck").iterdir())


def test_solving_with_states_visits_the_grid_with_the_same_arithmetic():
    v = lambda t, x: torch.cos(3 * t) * x + t  # noqa: E731
    x0 = torch.randn(3, 2)
    for solver in ("euler", "midpoint", "heun", "rk4"):
        end, nfe = solve(v, x0, solver, 4)
        path, nfe_path = solve(v, x0, solver, 4, states=True)
        assert path.shape == (3, 5, 2) and torch.equal(path[:, 0], x0) and torch.equal(path[:, -1], end)
        assert nfe_path == nfe and torch.equal(path[:, 2], solve(v, x0, solver, 2, span=(0.0, 0.5))[0])
    with pytest.raises(ValueError, match="fixed-step solver"):
        solve(v, x0, "dopri5", 4, states=True)


def test_the_grid_map_loss_is_zero_for_the_teachers_average_velocities():
    """A teacher that moved along straight lines x_t = x0 + t·d: every interval's average velocity is d."""
    x0, d = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    path = torch.stack([x0 + k / 4 * d for k in range(5)], 1)
    seen = []

    def net(x, t, y, t_end):
        seen.append((t, t_end))
        k = ((x - x0).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # where on the line
        assert torch.allclose(k.flatten(), t, atol=1e-5)
        return d

    assert grid_map_loss(net, path, None).item() == pytest.approx(0.0, abs=1e-10)
    t, t_end = seen[0]
    assert (t < t_end).all() and set((4 * t).round().tolist()) <= {0, 1, 2, 3}
    torch.manual_seed(0)
    seen.clear()
    grid_map_loss(lambda x, t, y, t_end: (seen.append((t, t_end)), torch.zeros_like(x))[1],
                  path.repeat(200, 1, 1, 1, 1), None)
    jumps = {(round(4 * float(a)), round(4 * float(b))) for a, b in zip(*seen[0])}  # 1-, 2- and 4-step jumps
    assert jumps == {(0, 4), (0, 2), (2, 4), (0, 1), (1, 2), (2, 3), (3, 4)}
    assert grid_map_loss(lambda x, t, y, t_end: d + 1, path, None).item() == pytest.approx(1.0)


def test_pairs_with_states_train_a_one_step_model_on_the_parents_grid(tmp_path):
    parent = tmp_path / "flow.pth"
    tiny_checkpoint(parent)
    drawn = reflow.draw_pairs(parent, tmp_path / "pairs", count=40, shard_size=20,
                              sample=SampleConfig(solver="midpoint", steps=4, guidance=1.0), states=True)
    shard = torch.load(tmp_path / "pairs" / "shard_00000.pt", weights_only=True)
    assert drawn["states"] and shard["xs"].shape == (20, 3, 1, 8, 8)
    plain = reflow.draw_pairs(parent, tmp_path / "plain", count=20, shard_size=20,
                              sample=SampleConfig(solver="midpoint", steps=4, guidance=1.0))
    assert torch.equal(torch.load(tmp_path / "plain" / "shard_00000.pt", weights_only=True)["x1"], shard["x1"])
    assert not plain["states"]
    train_set, _, _ = reflow.load_pairs(tmp_path / "pairs", val_size=8, states=True)
    assert len(reflow.load_pairs(tmp_path / "pairs", val_size=8)[0][0]) == 3  # without states: (x1, y, x0)
    x1, _, x0, path = train_set[0]
    assert path.shape == (5, 1, 8, 8) and torch.equal(path[0], x0) and torch.equal(path[-1], x1)
    flags = ["--val-size", "8", "--objective", "meanflow", "--epochs", "1", "--batch-size", "8", "--warmup-steps", "0",
             "--init-from", str(parent), "--out-dir", str(tmp_path / "mf"), "--out", str(tmp_path / "mf.pth"),
             "--sample-dir", str(tmp_path / "mf" / "samples")]
    summary = reflow.main(["distill", "--pairs", str(tmp_path / "pairs"), *flags])
    ckpt = load_checkpoint(summary["checkpoint"])
    assert summary["step"] == 4 and ckpt["kind"] == "meanflow" and ckpt["model_config"]["average_velocity"]
    last = load_checkpoint(tmp_path / "mf" / "last.pth")
    assert last["train_config"]["label_dropout"] == 0.0  # the null label learns no average velocity: no guidance
    parts = [*flags[:-6], "--out-dir", str(tmp_path / "parts"), "--out", str(tmp_path / "parts.pth"),
             "--sample-dir", str(tmp_path / "parts" / "samples")]
    with ctrl_c_at_step(3):  # interrupted inside step 3 of 4, then resumed: the same weights
        assert reflow.main(["distill", "--pairs", str(tmp_path / "pairs"), *parts])["step"] == 3
    reflow.main(["distill", "--pairs", str(tmp_path / "pairs"), *parts, "--resume", "auto"])  # (--init-from: its model)
    assert_same_weights(last, load_checkpoint(tmp_path / "parts" / "last.pth"))
    with pytest.raises(ValueError, match="holds endpoints only, not the paths between them"):
        reflow.main(["distill", "--pairs", str(tmp_path / "plain"), *flags])
