"""3-D U-Net backbone (qmri_labels.nets.unet3d)."""

import pytest
import torch
from torch import nn

from qmri_labels.nets.unet3d import PRESETS, UNet3D, UNet3DConfig, unet3d_preset


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_toy_preset_structure_and_shape():
    net = UNet3D(unet3d_preset("toy"))
    assert net.size_multiple == 2
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert {c.kernel_size for c in convs if c.kernel_size != (1, 1, 1)} == {(5, 5, 5)}
    assert sorted({c.out_channels for c in convs}) == [1, 2, 4]
    x = torch.randn(2, 1, 8, 8, 8)
    assert net(x).shape == (2, 1, 8, 8, 8)


def test_presets_channels_and_depth():
    qsmnet = unet3d_preset("qsmnet")
    assert (qsmnet.levels, qsmnet.init_channels, qsmnet.kernel_size) == (5, 32, 5)
    assert qsmnet.init_channels * 2 ** (qsmnet.levels - 1) == 512
    assert qsmnet.activation == "leaky_relu" and qsmnet.negative_slope == 0.1
    graf = UNet3D(unet3d_preset("graf"))
    assert graf.config.levels == 5 and graf.size_multiple == 16
    assert _count(graf, nn.MaxPool3d) == 1 and len(graf.encoders) == 5 and len(graf.decoders) == 4
    # 16 initial channels: ~5.6 M parameters, i.e. a bundle well under 25 MB in float32
    assert 5.0e6 < graf.n_parameters() < 6.3e6
    g32 = unet3d_preset("graf", init_channels=32)
    assert g32.init_channels == 32
    assert set(PRESETS) == {"toy", "qsmnet", "graf"}


@pytest.mark.parametrize("activation,kind", [("relu", nn.ReLU), ("leaky_relu", nn.LeakyReLU), ("elu", nn.ELU)])
def test_activation_and_batch_norm(activation, kind):
    net = UNet3D(levels=2, init_channels=2, kernel_size=3, activation=activation, negative_slope=0.3)
    # two encoder blocks and one decoder block of two convolutions each
    assert _count(net, kind) == 6 and _count(net, nn.BatchNorm3d) == 6
    if activation == "leaky_relu":
        assert all(m.negative_slope == 0.3 for m in net.modules() if isinstance(m, nn.LeakyReLU))
    plain = UNet3D(levels=2, init_channels=2, kernel_size=3, activation=activation, batch_norm=False)
    assert _count(plain, nn.BatchNorm3d) == 0


def test_gradients_flow_and_multichannel():
    net = UNet3D(levels=3, init_channels=2, in_channels=2, out_channels=1, kernel_size=3)
    x = torch.randn(1, 2, 8, 8, 12)
    net(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_input_and_config():
    net = UNet3D(levels=3, init_channels=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="activation"):
        UNet3DConfig(activation="gelu")
    with pytest.raises(ValueError, match="kernel_size"):
        UNet3DConfig(kernel_size=4)
    with pytest.raises(ValueError, match="preset"):
        unet3d_preset("huge")
    assert UNet3DConfig.from_dict(unet3d_preset("graf").to_dict()) == unet3d_preset("graf")
