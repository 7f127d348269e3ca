"""The diffusion transformer (`--backbone dit`): shapes at 28 and 32 px, adaLN-zero's zero start, its conditioning on
t, the class and MeanFlow's t_end, guidance through the solvers, export and torch.hub, exact resume, and a
checkpoint of the other backbone refused in one line."""
from dataclasses import replace

import pytest
import torch

import pretrained
from checkpoint import CheckpointError, build_model, load_checkpoint, load_ema_weights, model_from_checkpoint
from cli import parse_configs
from dit import DiT
from helpers import TINY, TINY_DIT, assert_same_weights, blobs, fit, tiny_checkpoint, tiny_config
from hubconf import from_checkpoint
from sampling import load_for_sampling, sample_model
from solvers import guided_velocity
from unet import ModelConfig, check_config


def shaken(cfg: ModelConfig, seed: int = 0) -> DiT:
    """A DiT with every weight moved off its initialisation (adaLN-zero would otherwise hide the conditioning)."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("size,patch,channels", [(28, 2, 1), (28, 4, 1), (32, 2, 3), (32, 4, 3)])
def test_shapes_at_28_and_32_px_and_a_zero_start(size, patch, channels):
    cfg = ModelConfig(image_size=size, in_channels=channels, base_channels=32, head_channels=16, backbone="dit",
                     patch_size=patch, depth=2, num_classes=10)
    model = build_model(cfg)
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10: the null label
    assert isinstance(model, DiT) and out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-zero: every block the identity, the output layer zero
    assert shaken(cfg)(x, torch.rand(3), torch.tensor([0, 5, 10])).shape == x.shape


def test_the_output_follows_the_time_the_class_and_the_interval():
    model = shaken(replace(TINY_DIT, average_velocity=True))
    x, t, y = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t + 0.2, y))
        assert not torch.allclose(base, model(x, t, torch.tensor([2, 2])))
        assert not torch.allclose(base, model(x, t, y, t + 0.5))  # MeanFlow's second time
        assert torch.equal(base, model(x, t, y, t))  # t_end = t is the velocity
        assert torch.equal(base[0], base[1])  # the same input, the same output: no batch coupling
    with pytest.raises(ValueError, match="labels y must be given"):
        model(x, t)
    with pytest.raises(ValueError, match="needs a model trained with --objective meanflow"):
        shaken(TINY_DIT)(x, t, y, t + 0.5)


def test_guidance_mixes_the_conditional_and_the_null_labels_velocity():
    model = shaken(TINY_DIT)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor(0.4), torch.tensor([0, 1, 2, 0])
    tb = t.expand(4)
    with torch.no_grad():
        cond, uncond = model(x, tb, y), model(x, tb, torch.full_like(y, 3))
        torch.testing.assert_close(guided_velocity(model, y, 2.5)(t, x), uncond + 2.5 * (cond - uncond))


def test_bad_dit_configs_are_one_line():
    with pytest.raises(ValueError, match="patches of --patch-size 3"):
        check_config(replace(TINY_DIT, patch_size=3))
    with pytest.raises(ValueError, match="multiple of 4 and of --head-channels 8"):
        check_config(replace(TINY_DIT, base_channels=12))
    with pytest.raises(ValueError, match="unknown --backbone 'vit'"):
        check_config(replace(TINY_DIT, backbone="vit"))
    from unet import ConditionalUNet
    with pytest.raises(ValueError, match="builds a dit, not a unet"):
        ConditionalUNet(TINY_DIT)
    with pytest.raises(ValueError, match="builds a unet, not a dit"):
        DiT(TINY)
    with pytest.raises(ValueError, match="patches of --patch-size 3"):  # the DiT checks its config as the U-Net does
        DiT(replace(TINY_DIT, patch_size=3))


def test_export_torch_hub_and_the_hub_mixin_load_a_dit_as_its_checkpoint(tmp_path):
    tiny_checkpoint(tmp_path / "d.pth", TINY_DIT)
    folder = pretrained.export(tmp_path / "d.pth", tmp_path / "export")
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        expected = model_from_checkpoint(load_checkpoint(tmp_path / "d.pth"))(x, t, y)
        assert torch.equal(load_for_sampling(folder).model(x, t, y), expected)
        assert torch.equal(DiT.from_pretrained(str(folder))(x, t, y), expected)
        assert torch.equal(from_checkpoint(folder)(x, t, y), expected)
    samples = sample_model(load_for_sampling(folder).model, 6)
    assert samples.images.shape == (6, 1, 8, 8) and samples.nfe == 8


def test_a_dit_run_resumes_exactly_and_refuses_a_checkpoint_of_the_other_backbone(tmp_path):
    fit(tiny_config(tmp_path / "whole"), TINY_DIT, blobs(), None)
    fit(tiny_config(tmp_path / "cut", max_steps=5), TINY_DIT, blobs(), None)
    fit(tiny_config(tmp_path / "cut", resume="auto"), TINY_DIT, blobs(), None)
    assert_same_weights(load_checkpoint(tmp_path / "cut" / "ck" / "last.pth"),
                        load_checkpoint(tmp_path / "whole" / "ck" / "last.pth"))
    with pytest.raises(CheckpointError, match="backbone: dit vs unet"):
        fit(tiny_config(tmp_path / "cut", resume="auto", max_steps=13), TINY, blobs(), None)


def test_a_dit_flow_starts_a_meanflow_dit_as_itself(tmp_path):
    tiny_checkpoint(tmp_path / "flow.pth", TINY_DIT)
    flow = model_from_checkpoint(load_checkpoint(tmp_path / "flow.pth"))
    student = build_model(replace(TINY_DIT, average_velocity=True))
    load_ema_weights(tmp_path / "flow.pth", student.config, [student], torch.device("cpu"))
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x, t, y, t + 0.3), flow(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("script,preset,size,channels", [("mnist_train", "cpu-dit", 28, 1),
                                                         ("rectified_flow_train", "dit32", 32, 3)])
def test_the_dit_presets_build_transformers_of_their_data(script, preset, size, channels):
    module = __import__(script)
    (_, model_cfg, *_), _ = parse_configs(module.DEFAULTS, module.PRESETS, None, ["--preset", preset])
    model_cfg = replace(model_cfg, num_classes=10)  # the folder's classes decide this for photos
    check_config(model_cfg)
    model = build_model(model_cfg)
    x = torch.randn(2, channels, size, size)
    assert isinstance(model, DiT) and model(x, torch.rand(2), torch.tensor([0, 9])).shape == x.shape
