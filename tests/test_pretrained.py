"""Exported folders (model.safetensors + config.json + flow_config.json + README.md): round trip, no pickle, the Hub
mixin's own loader, folders in the layout before flow_config.json, clear errors."""
import json
from pathlib import Path

import pytest
import torch

import checkpoint
import mnist_test
import pretrained
from checkpoint import (CheckpointError, load_checkpoint, model_config_from, model_from_checkpoint,
                        save_checkpoint)
from helpers import tiny_checkpoint
from reflow import sha256
from sampling import load_for_sampling, sample_from_checkpoint, sample_model
from solvers import Sampler
from unet import ConditionalUNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pth(tmp_path):
    """A checkpoint whose raw and EMA weights differ, with a recorded sampler, kind and class names."""
    path = tmp_path / "model.pth"
    tiny_checkpoint(path)
    ckpt = load_checkpoint(path)
    save_checkpoint(path, {**ckpt, "kind": "2-rectified", "class_names": ["a", "b", "c"],
                           "sampler": {"solver": "euler", "steps": 3, "guidance": 1.5},
                           "lineage": {"parent_kind": "1-rectified", "parent_sha256": "ab" * 32}})
    return path


def test_folder_samples_equal_the_checkpoint_bit_for_bit(pth, tmp_path):
    folder = pretrained.main(["export", "--checkpoint", str(pth), "--out", str(tmp_path / "export")])
    assert sorted(f.name for f in folder.iterdir()) == ["README.md", "config.json", "flow_config.json",
                                                        "model.safetensors"]
    labels = [0, 1, 2, 2, "a"]
    assert torch.equal(sample_from_checkpoint(folder, labels=labels, seed=3),
                       sample_from_checkpoint(pth, labels=labels, seed=3))
    stored = json.loads((folder / "config.json").read_text())  # the U-Net's config alone, as its constructor takes it
    assert ConditionalUNet(stored).config == ConditionalUNet(**stored).config == model_config_from(load_checkpoint(pth))
    config = json.loads((folder / "flow_config.json").read_text())
    assert config["sampler"] == {"solver": "euler", "steps": 3, "guidance": 1.5} and config["kind"] == "2-rectified"
    card = (folder / "README.md").read_text()
    assert "euler, 3 step(s), guidance w = 1.5" in card and "2-rectified" in card and "from_pretrained" in card
    header = card.split("---\n")[1]  # the metadata the Hub reads, between the --- lines that open the card
    assert card.startswith("---\n") and "license: mit" in header and "library_name: pytorch" in header
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        expected = model_from_checkpoint(load_checkpoint(pth))(x, t, y)
        assert torch.equal(ConditionalUNet.from_pretrained(str(folder))(x, t, y), expected)


def test_raw_export_holds_the_raw_weights_only(pth, tmp_path):
    ema = pretrained.export(pth, tmp_path / "ema")
    raw = pretrained.export(pth, tmp_path / "raw", weights="raw")
    assert torch.equal(sample_from_checkpoint(raw, labels=[0, 1], seed=0, use_ema=False),
                       sample_from_checkpoint(pth, labels=[0, 1], seed=0, use_ema=False))
    assert not torch.equal(sample_from_checkpoint(raw, labels=[0, 1], seed=0, use_ema=False),
                           sample_from_checkpoint(ema, labels=[0, 1], seed=0))
    with pytest.raises(CheckpointError, match="EMA weights only"):
        sample_from_checkpoint(ema, labels=[0], use_ema=False)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        sample_from_checkpoint(raw, labels=[0])


def test_loading_a_folder_unpickles_nothing(pth, tmp_path, monkeypatch):
    folder = pretrained.export(pth, tmp_path / "export")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    assert sample_from_checkpoint(folder, labels=[0, 1], seed=0).shape == (2, 1, 8, 8)


def test_scripts_take_a_folder(pth, tmp_path):
    folder = pretrained.export(pth, tmp_path / "export")
    mnist_test.main(["--checkpoint", str(folder), "--digits", "0,2", "--per-digit", "2",
                     "--out", str(tmp_path / "g.png")])
    assert (tmp_path / "g.png").stat().st_size > 100
    before = sha256(folder)
    assert before == sha256(pretrained.export(pth, tmp_path / "again"))  # the same content, the same name
    with pytest.raises(ValueError, match="pass --force to replace it"):
        pretrained.export(pth, folder, weights="raw")  # a committed model is not replaced by accident
    pretrained.export(pth, folder, weights="raw", force=True)  # an exported folder is replaced as a whole
    assert sha256(folder) != before and json.loads((folder / "flow_config.json").read_text())["weights"] == "raw"


def test_bad_folders_get_one_line(pth, tmp_path):
    folder = pretrained.export(pth, tmp_path / "export")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an exported model folder"):
        pretrained.export(pth, tmp_path / "plain")
    assert (tmp_path / "plain" / "notes.txt").is_file()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "plain")
    (tmp_path / "plain" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "plain")
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(weights)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "base_channels": 16}))
    with pytest.raises(CheckpointError, match=r"weights do not match its model config \(\d+ shapes differ.*first: "):
        sample_from_checkpoint(folder, labels=[0])
    (folder / "config.json").write_text(json.dumps({"architectures": ["SomethingElse"]}))
    with pytest.raises(CheckpointError, match="unknown U-Net config keys"):
        load_checkpoint(folder)
    meta = (folder / "flow_config.json").read_text()
    (folder / "flow_config.json").unlink()  # a foreign folder in the Hub layout: config.json and weights only
    with pytest.raises(CheckpointError, match="holds no Flow Image Generator model config"):
        load_checkpoint(folder)
    (folder / "flow_config.json").write_text(meta)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(folder)


def test_the_hub_mixins_own_loader_reads_an_exported_folder_and_save_pretrained_writes_one(pth, tmp_path):
    from huggingface_hub import PyTorchModelHubMixin

    assert issubclass(ConditionalUNet, PyTorchModelHubMixin)  # installed: from_pretrained is the mixin's
    folder = pretrained.export(pth, tmp_path / "export")
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        expected = model_from_checkpoint(load_checkpoint(pth))(x, t, y)
        model = ConditionalUNet.from_pretrained(str(folder))
        assert model.config == model_config_from(load_checkpoint(pth)) and torch.equal(model(x, t, y), expected)
        model.save_pretrained(tmp_path / "saved")  # the mixin's writer: config.json + model.safetensors
        assert json.loads((tmp_path / "saved" / "config.json").read_text()) == json.loads(
            (folder / "config.json").read_text())
        assert torch.equal(ConditionalUNet.from_pretrained(tmp_path / "saved")(x, t, y), expected)


@pytest.mark.parametrize("name", ["pretrained/mnist-1rfx", "./mnist-1rf", "no-such-folder", "a/b/c"])
def test_from_pretrained_refuses_a_local_looking_path_without_asking_the_hub(name, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(ValueError, match="is not an exported model folder .*: no such folder"):
        ConditionalUNet.from_pretrained(name)


def test_from_pretrained_names_a_config_that_does_not_fit_the_weights(pth, tmp_path):
    folder = pretrained.export(pth, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "base_channels": 16}))
    with pytest.raises(ValueError, match="the weights do not match config.json .*size mismatch|the weights do not"):
        ConditionalUNet.from_pretrained(folder)


@pytest.mark.parametrize("name,nfe", [("mnist-1rf", 16), ("mnist-meanflow", 1)])
def test_committed_models_load_and_sample_with_their_recorded_sampler(name, nfe):
    folder = checkpoint.PRETRAINED / name
    loaded = load_for_sampling(folder)
    samples = sample_model(loaded.model, 20, torch.arange(20) % 10, loaded.sampler)
    assert samples.images.shape == (20, 1, 28, 28) and samples.nfe == nfe
    config = json.loads((folder / "flow_config.json").read_text())
    card = (folder / "README.md").read_text()
    assert config["metrics"]["n"] >= 4000 and f"{config['metrics']['accuracy']:.1%}" in card


def test_the_committed_photo_model_draws_its_classes_by_name_with_its_recorded_sampler(tmp_path):
    folder = checkpoint.PRETRAINED / "cifar10-1rf"
    images = sample_from_checkpoint(folder, tmp_path / "grid.png", labels=["airplane", "cat", "truck"], seed=0)
    assert images.shape == (3, 3, 32, 32) and (tmp_path / "grid.png").is_file()
    assert images.std(dim=(1, 2, 3)).min() > 0.05  # photos, not flat fields
    loaded = load_for_sampling(folder)
    assert loaded.sampler == Sampler("euler", 16, 2.0) and loaded.ckpt["class_names"][9] == "truck"
    config = json.loads((folder / "flow_config.json").read_text())
    metrics, card = config["metrics"], (folder / "README.md").read_text()
    assert metrics["n"] == 1000 and f"| {metrics['fid']:.1f} | {metrics['floor']:.1f} |" in card


def test_mnist_test_uses_the_committed_model_until_make_train_has_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoints/flow_matching_mnist.pth here
    mnist_test.main(["--digits", "3", "--per-digit", "2", "--solver", "euler", "--steps", "1", "--out", "g.png"])
    assert "using the committed model" in capsys.readouterr().out and (tmp_path / "g.png").is_file()
    assert checkpoint.mnist_checkpoint()[0] == checkpoint.PRETRAINED / "mnist-1rf"
    (tmp_path / "checkpoints").mkdir()
    tiny = tmp_path / checkpoint.MNIST_TRAINED
    tiny_checkpoint(tiny)
    assert checkpoint.mnist_checkpoint() == (tiny.relative_to(tmp_path), None)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_the_cards_own_code_runs_for_each_backbone(backbone, tmp_path, monkeypatch):
    """The card's "Use" block, run as written (its folder path filled in), loads the exported network of either
    backbone; a run that never validated shows no validation loss (not inf)."""
    from helpers import TINY, TINY_DIT

    tiny_checkpoint(tmp_path / "m.pth", TINY_DIT if backbone == "dit" else TINY)
    save_checkpoint(tmp_path / "m.pth", {**load_checkpoint(tmp_path / "m.pth"), "best_val_loss": float("inf")})
    folder = pretrained.export(tmp_path / "m.pth", tmp_path / "export")
    card = (folder / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(folder))
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(code, scope)
    assert type(scope["model"]).__name__ == ("DiT" if backbone == "dit" else "ConditionalUNet")
    assert scope["images"].shape[0] == 3 and "| validation loss | n/a (not validated) |" in card


def test_the_committed_one_step_models_name_the_committed_flows_as_their_parents():
    """Each committed one-step model was made from a committed flow as it is: its lineage's sha256 is that folder's
    (weights and configs), for the paths it regressed on and for the weights it started from."""
    for child, parent in (("mnist-meanflow", "mnist-1rf"), ("cifar10-one-step", "cifar10-1rf")):
        lineage = json.loads((ROOT / "pretrained" / child / "flow_config.json").read_text())["lineage"]
        assert lineage["parent_sha256"] == lineage["pairs"]["parent_sha256"] == sha256(ROOT / "pretrained" / parent)
