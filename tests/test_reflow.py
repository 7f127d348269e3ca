"""reflow.py: pairs -> 2-rectified flow -> k-step distillation on real MNIST digits, shards that survive
crashes and split over ranks, and the distillation objective's oracle."""
import json
import os

import pytest
import torch

import reflow
from checkpoint import load_checkpoint
from flow import flow_matching_loss, sample_t
from helpers import tiny_checkpoint, tiny_config, training_times
from sampling import SampleConfig, load_for_sampling, sample_model
from solvers import Sampler

PAIR_FLAGS = ["--count", "96", "--shard-size", "32", "--solver", "euler", "--steps", "2", "--batch-size", "40",
              "--device", "cpu"]
STAGE_FLAGS = ["--epochs", "1", "--batch-size", "16", "--val-size", "16", "--val-t-points", "1", "--log-every", "2",
               "--warmup-steps", "0", "--device", "cpu"]


@pytest.fixture
def parent(tmp_path):
    """A tiny class-conditional checkpoint (8x8, 3 classes)."""
    path = tmp_path / "parent.pth"
    tiny_checkpoint(path)
    return path


def pairs(parent, out, *extra):
    return reflow.main(["pairs", "--checkpoint", str(parent), "--out-dir", str(out), *PAIR_FLAGS, *extra])


def shard_contents(folder):
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("shard_*.pt"))}


def test_pairs_are_class_balanced_and_recorded(parent, tmp_path):
    result = pairs(parent, tmp_path / "pairs")
    shards = shard_contents(tmp_path / "pairs")
    assert sorted(shards) == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"] and result["drawn"] == 96
    y = torch.cat([s["y"] for s in shards.values()])
    assert torch.bincount(y).tolist() == [32, 32, 32]
    x0 = shards["shard_00001.pt"]["x0"]
    from solvers import make_noise

    torch.testing.assert_close(x0.float(), make_noise(32, (1, 8, 8), 0, "cpu", start=32), atol=2e-3, rtol=1e-3)
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["parent_sha256"] == reflow.sha256(parent) and manifest["solver"] == "euler"
    assert (manifest["steps"], manifest["guidance"], manifest["seed"], manifest["count"]) == (2, 1.0, 0, 96)


def test_pairs_default_to_the_parents_recorded_sampler(parent, tmp_path):
    flags = [f for f in PAIR_FLAGS if f not in ("--solver", "euler", "--steps", "2")]
    result = reflow.main(["pairs", "--checkpoint", str(parent), "--out-dir", str(tmp_path / "p"), *flags])
    assert (result["solver"], result["steps"], result["guidance"], result["nfe"]) == ("midpoint", 4, 1.0, 8)


def test_a_crash_loses_at_most_one_shard_and_the_rerun_finishes_the_rest(parent, tmp_path, monkeypatch):
    pairs(parent, tmp_path / "straight")
    calls = []
    real_save = reflow.save_checkpoint

    def crash_on_second(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while shard 1 is being written
        real_save(path, state)

    monkeypatch.setattr(reflow, "save_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        pairs(parent, tmp_path / "crashed")
    assert [p.name for p in sorted((tmp_path / "crashed").iterdir())] == ["manifest.json", "shard_00000.pt"]
    monkeypatch.setattr(reflow, "save_checkpoint", real_save)
    assert pairs(parent, tmp_path / "crashed")["drawn"] == 64  # shard 0 was kept, not redrawn
    a, b = shard_contents(tmp_path / "straight"), shard_contents(tmp_path / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k]["x1"], b[k]["x1"]) for k in a)


def test_other_settings_in_the_same_folder_are_refused(parent, tmp_path):
    pairs(parent, tmp_path / "pairs")
    with pytest.raises(ValueError, match="steps 2 there, 4 now"):
        pairs(parent, tmp_path / "pairs", "--steps", "4")


def test_ranks_write_disjoint_shards_that_add_up_to_one_process(parent, tmp_path, monkeypatch):
    pairs(parent, tmp_path / "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        before = set(p.name for p in (tmp_path / "two").glob("shard_*")) if (tmp_path / "two").exists() else set()
        pairs(parent, tmp_path / "two")
        written[rank] = set(p.name for p in (tmp_path / "two").glob("shard_*")) - before
    assert written == {"0": {"shard_00000.pt", "shard_00002.pt"}, "1": {"shard_00001.pt"}}
    one, two = shard_contents(tmp_path / "one"), shard_contents(tmp_path / "two")
    assert all(torch.equal(one[k]["x1"], two[k]["x1"]) and torch.equal(one[k]["x0"], two[k]["x0"]) for k in one)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_distillation_oracle_has_zero_loss(k):
    """A model whose k Euler steps follow the straight line from the pair's noise to its image gets loss 0."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 1, 4, 4, generator=g), torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    oracle = lambda xt, t, y=None: x1 - x0  # noqa: E731 - on the straight path the velocity is constant
    assert flow_matching_loss(oracle, x1, x0=x0, t=sample_t(6, grid=k)) == 0
    x = x0
    for i in range(k):  # and its k Euler steps land exactly on the image
        x = x + oracle(x, torch.full((6,), i / k)) / k
    torch.testing.assert_close(x, x1)
    wrong = lambda xt, t, y=None: torch.zeros_like(xt)  # noqa: E731
    grid = sample_t(6, grid=k)
    assert flow_matching_loss(wrong, x1, x0=x0, t=grid) == pytest.approx((x1 - x0).square().mean().item())


def test_distillation_trains_only_at_the_euler_grid_times(tmp_path, monkeypatch):
    times = training_times(tiny_config(tmp_path, t_grid=4), monkeypatch)
    assert sorted(set(times.tolist())) == [0.0, 0.25, 0.5, 0.75]


def test_mnist_pipeline_pairs_reflow_distill_then_one_step_sampling(tmp_path, mnist_root):
    import mnist_train

    mnist_train.main(["--data-root", str(mnist_root), "--no-download", "--subset", "640", "--epochs", "1",
                      "--base-channels", "8", "--num-res-blocks", "1", "--attention-resolutions", "7",
                      "--batch-size", "32",
                      "--lr", "2e-3", "--val-size", "32", "--val-t-points", "1", "--out-dir", str(tmp_path / "rf1"),
                      "--out", str(tmp_path / "rf1" / "best.pth"), "--device", "cpu"])
    parent = tmp_path / "rf1" / "best.pth"
    assert load_checkpoint(parent)["kind"] == "1-rectified"
    pairs(parent, tmp_path / "pairs", "--count", "160", "--shard-size", "80")
    reflow.main(["train", "--pairs", str(tmp_path / "pairs"), "--out-dir", str(tmp_path / "rf2"), *STAGE_FLAGS])
    rf2 = load_checkpoint(tmp_path / "rf2" / "best.pth")
    assert rf2["kind"] == "2-rectified" and rf2["lineage"]["parent_sha256"] == reflow.sha256(parent)
    assert rf2["lineage"]["pairs"]["count"] == 160
    assert Sampler.recorded(rf2["sampler"]) == Sampler("euler", 2, 1.0)
    assert rf2["train_config"]["init_from"] == str(parent)
    reflow.main(["distill", "--pairs", str(tmp_path / "pairs"), "--k", "1",
                 "--init-from", str(tmp_path / "rf2" / "best.pth"),
                 "--out-dir", str(tmp_path / "d1"), *STAGE_FLAGS])
    d1 = load_checkpoint(tmp_path / "d1" / "best.pth")
    assert d1["kind"] == "distilled-1" and d1["train_config"]["t_grid"] == 1
    assert d1["lineage"]["parent_sha256"] == reflow.sha256(tmp_path / "rf2" / "best.pth")
    loaded = load_for_sampling(tmp_path / "d1" / "best.pth", device="cpu")  # no sampler given
    samples = sample_model(loaded.model, 10, None, loaded.sampler, seed=0)
    assert (samples.sampler.solver, samples.sampler.steps, samples.nfe) == ("euler", 1, 1)
    assert samples.images.shape == (10, 1, 28, 28) and samples.images.std() > 0.05


def test_distill_needs_the_reflowed_model_and_pairs_need_a_flow(parent, tmp_path):
    pairs(parent, tmp_path / "pairs")
    with pytest.raises(ValueError, match="pass --init-from PATH"):
        reflow.main(["distill", "--pairs", str(tmp_path / "pairs"), *STAGE_FLAGS])
    with pytest.raises(ValueError, match="no manifest.json"):
        reflow.main(["train", "--pairs", str(tmp_path / "nothing"), *STAGE_FLAGS])
    for flag in ("--hflip", "--coupling=ot"):  # each pair's image comes with its own noise
        with pytest.raises(ValueError, match="cannot be used with reflow pairs"):
            reflow.main(["train", "--pairs", str(tmp_path / "pairs"), "--out-dir", str(tmp_path / "r"), flag,
                         *STAGE_FLAGS])
    assert not (tmp_path / "r").exists()
    os.remove(tmp_path / "pairs" / "shard_00001.pt")
    with pytest.raises(ValueError, match="1 of 3 shards missing"):
        reflow.main(["train", "--pairs", str(tmp_path / "pairs"), *STAGE_FLAGS])


def test_straightness_is_zero_for_straight_paths_and_positive_for_curved_ones():
    from evaluate import straightness

    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.rand(8, 1, 2, 2)
    straight = straightness(lambda t, x: target - noise, noise, steps=16)  # x1 - x0 constant along every path
    assert straight["straightness"] < 1e-12 and all(d < 1e-6 for d in straight["distance"].values())
    rotate = lambda t, x: torch.stack([-x[:, :, 1], x[:, :, 0]], dim=2)  # noqa: E731 - circles: as curved as it gets
    curved = straightness(rotate, noise, steps=16)
    assert curved["straightness"] > 0.05
    assert curved["distance"][1] > curved["distance"][2] > curved["distance"][8]  # more steps follow the curve better


def test_an_exported_folder_is_a_parent_like_its_checkpoint(parent, tmp_path):
    import pretrained

    folder = pretrained.export(parent, tmp_path / "parent")
    pairs(folder, tmp_path / "from_folder")
    pairs(parent, tmp_path / "from_pth")
    a, b = shard_contents(tmp_path / "from_folder"), shard_contents(tmp_path / "from_pth")
    assert all(torch.equal(a[k]["x1"], b[k]["x1"]) for k in a)  # the same EMA weights draw the same pairs
    manifest = json.loads((tmp_path / "from_folder" / "manifest.json").read_text())
    assert manifest["parent_sha256"] == reflow.sha256(folder)
    reflow.main(["train", "--pairs", str(tmp_path / "from_folder"), "--out-dir", str(tmp_path / "rf2"), *STAGE_FLAGS])
    child = load_checkpoint(tmp_path / "rf2" / "best.pth")
    assert child["kind"] == "2-rectified" and child["lineage"]["parent_sha256"] == reflow.sha256(folder)


def test_the_default_validation_share_fits_a_small_pairs_folder(parent, tmp_path):
    reflow.draw_pairs(parent, tmp_path / "pairs", count=40, shard_size=20,
                      sample=SampleConfig(solver="euler", steps=2, guidance=1.0))
    train_set, val_set, _ = reflow.load_pairs(tmp_path / "pairs", val_size=reflow.PairData().val_size)
    assert (len(train_set), len(val_set)) == (38, 2)  # a twentieth held out, where 1,000 would leave none
