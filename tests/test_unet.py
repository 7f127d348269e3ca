from dataclasses import replace

import pytest
import torch

from unet import ConditionalUNet, ModelConfig


@pytest.mark.parametrize("size,mult", [(28, (1, 2, 2)), (32, (1, 2, 2)), (64, (1, 2, 2, 2))])
@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("upsample_conv", [True, False])
def test_output_shape(size, mult, num_classes, upsample_conv):
    cfg = ModelConfig(image_size=size, in_channels=3, base_channels=16, channel_mult=mult, num_res_blocks=1,
                     attention_resolutions=(size // 4,), num_classes=num_classes, upsample_conv=upsample_conv)
    model = ConditionalUNet(cfg)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([3, num_classes]) if num_classes else None  # index num_classes = the null token
    assert model(x, torch.rand(2), y).shape == x.shape


def test_upsample_conv_off_drops_the_conv_after_each_upsampling():
    def convs(model: ConditionalUNet) -> list[tuple[int, int, int]]:
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        return [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs]

    cfg = ModelConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1)
    with_conv, without = convs(ConditionalUNet(cfg)), convs(ConditionalUNet(replace(cfg, upsample_conv=False)))
    for c in without:
        with_conv.remove(c)
    assert sorted(with_conv) == [(32, 32, 3), (64, 64, 3)]  # 7 -> 14 at 64 channels, 14 -> 28 at 32


def test_labels_must_match_num_classes():
    cond = ConditionalUNet(ModelConfig(base_channels=16, num_res_blocks=1, num_classes=10))
    uncond = ConditionalUNet(ModelConfig(base_channels=16, num_res_blocks=1, num_classes=None))
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    with pytest.raises(ValueError, match="labels y must be given"):
        cond(x, t)
    with pytest.raises(ValueError, match="labels y must be given"):
        uncond(x, t, torch.tensor([1, 2]))


def test_labels_change_the_output():
    torch.manual_seed(0)
    model = ConditionalUNet(ModelConfig(base_channels=16, num_res_blocks=1, num_classes=10))
    for p in model.parameters():  # zero-initialised output layers would hide the conditioning
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 1, 28, 28), torch.rand(1)
    assert not torch.allclose(model(x, t, torch.tensor([1])), model(x, t, torch.tensor([7])))


@pytest.mark.parametrize("bad", [dict(image_size=30), dict(base_channels=12),
                                 dict(image_size=28, channel_mult=(1, 2, 2, 2))])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="multiple"):
        ConditionalUNet(ModelConfig(**bad))
