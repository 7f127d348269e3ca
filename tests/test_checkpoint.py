import torch
import pytest

from checkpoint import CheckpointError, RunRecord, load_checkpoint, model_from_checkpoint, save_checkpoint
from helpers import TINY, blobs, fit, tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    summary = fit(tiny_config(tmp), TINY, blobs(), blobs(24, seed=1), record=RunRecord(class_names=["a", "b", "c"]))
    return tmp, summary


def test_trainer_checkpoint_has_every_key(trained):
    tmp, _ = trained
    ckpt = load_checkpoint(tmp / "ck" / "last.pth")
    for key in ("epoch", "step", "model_state", "ema_state", "optimizer_state", "loss", "model_config", "train_config",
                "format_version", "class_names"):
        assert key in ckpt
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model_state"])
    assert "label_dropout" in ckpt["train_config"]  # what sampling checks before guiding


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """The model's velocity on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        return model(x, t, y)


def test_loaded_weights_are_the_saved_models(tmp_path):
    model, ema = tiny_checkpoint(tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    assert torch.equal(outputs(model_from_checkpoint(ckpt)), outputs(ema.model))
    assert torch.equal(outputs(model_from_checkpoint(ckpt, use_ema=False)), outputs(model))
    assert not torch.allclose(outputs(ema.model), outputs(model))  # so the two checks above tell EMA from raw


def test_config_field_missing_from_an_older_checkpoint_takes_its_default(tmp_path):
    _, ema = tiny_checkpoint(tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    del ckpt["model_config"]["upsample_conv"]  # written before the field existed, when every U-Net had the conv
    assert torch.equal(outputs(model_from_checkpoint(ckpt)), outputs(ema.model))


def test_dataparallel_prefixed_state_loads(tmp_path):
    model, ema = tiny_checkpoint(tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    ckpt["model_state"] = {f"module.{k}": v for k, v in ckpt["model_state"].items()}
    ckpt["ema_state"] = {f"module._orig_mod.{k}": v for k, v in ckpt["ema_state"]["weights"].items()}  # seed-style flat
    save_checkpoint(tmp_path / "dp.pth", ckpt)
    for use_ema, source in ((True, ema.model), (False, model)):
        loaded = model_from_checkpoint(load_checkpoint(tmp_path / "dp.pth"), use_ema)
        assert torch.equal(outputs(loaded), outputs(source))


def test_truncated_foreign_and_missing_files(tmp_path):
    tiny_checkpoint(tmp_path / "c.pth")
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")  # unpickles as garbage, not as refused objects
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pth")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a Flow Image Generator checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle's code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_code_in_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model_state": {}, "model_config": {}, "extra": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="holds pickled Python objects, not only tensors"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the payload is live: a full unpickle does run it
    assert marker.exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path / "a.pth", {"model_state": {}, "model_config": {}})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "a.pth", {"model_state": {}, "x": Boom()})
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # the old file survives, no temp left
    assert "x" not in torch.load(tmp_path / "a.pth", weights_only=True)


def test_resume_continues_the_step_count(trained, tmp_path):
    tmp, summary = trained
    steps_per_epoch = summary["step"] // 2
    cfg = tiny_config(tmp_path, epochs=3, resume=str(tmp / "ck" / "last.pth"))
    resumed = fit(cfg, TINY, blobs(), None, record=RunRecord(class_names=["a", "b", "c"]))
    assert resumed["step"] == 3 * steps_per_epoch
    assert load_checkpoint(tmp_path / "ck" / "last.pth")["epoch"] == 3
    assert not (tmp_path / "ck" / "epoch_1.pth").exists()  # epochs 1-2 were not re-run


def test_resume_with_another_model_is_refused(trained, tmp_path):
    tmp, _ = trained
    from dataclasses import replace

    cfg = tiny_config(tmp_path, resume=str(tmp / "ck" / "last.pth"))
    with pytest.raises(CheckpointError, match="another model config.*base_channels: 8 vs 16"):
        fit(cfg, replace(TINY, base_channels=16), blobs(), None)


def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # A launcher running in the background (nohup, `cmd &`) starts children with SIGINT ignored: restore Ctrl-C.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']\n"
            "from pathlib import Path; from helpers import TINY, blobs, fit, tiny_config\n"
            "fit(tiny_config(Path(sys.argv[2]), epochs=10_000), TINY, blobs(), None)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "ck" / "epoch_2.pth").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a trainer running if the assertion path fails
    assert proc.returncode == 0, err[-2000:]
    assert "continue with --resume auto" in out
    ckpt = load_checkpoint(tmp_path / "ck" / "last.pth")
    assert ckpt["step"] >= 12  # at least the two finished epochs of 6 steps
    model_from_checkpoint(ckpt)
