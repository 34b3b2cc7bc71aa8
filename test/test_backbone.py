"""The VGG-16 trunk and the HiLM descriptor net: levels, strides, widths, options."""
import pytest
import torch

from dense_match_ros.core.networks.backbone import LEVELS, STRIDES, VGGBackbone, VGGConfig, level_channels
from dense_match_ros.core.networks.hilm_net import HilmNet, HilmNetConfig


@pytest.mark.parametrize('size', [(32, 48), (35, 50)])
def test_levels_have_vgg_strides_and_channels(size):
    net = VGGBackbone(VGGConfig(width=0.125))
    feats = net(torch.rand(2, 3, *size))
    assert list(feats) == list(LEVELS)
    chans = level_channels(0.125)
    assert [chans[lv] for lv in LEVELS] == [8, 16, 32, 64, 64]
    for lv, f in feats.items():
        s = STRIDES[lv]
        # VGG pooling floors odd sizes, so a level has floor(H / s) cells.
        assert f.shape == (2, chans[lv], size[0] // s, size[1] // s), lv


def test_width_scales_parameters_quadratically():
    count = lambda w: sum(p.numel() for p in VGGBackbone(VGGConfig(width=w)).parameters())
    full = 14_714_688 - 3 * (512 * 512 * 9 + 512)  # VGG-16's convs without block 5
    assert count(1.0) == full
    assert 0.2 < count(0.5) / count(1.0) < 0.3


def test_batch_norm_option_adds_norm_layers_and_drops_conv_bias():
    plain = VGGBackbone(VGGConfig(width=0.125, batch_norm=False))
    bn = VGGBackbone(VGGConfig(width=0.125, batch_norm=True))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert n_bn == 10  # 2 + 2 + 3 + 3 convs up to conv4_3
    assert all(m.bias is None for m in bn.modules() if isinstance(m, torch.nn.Conv2d))


def test_requesting_shallow_levels_skips_deep_blocks():
    net = VGGBackbone(VGGConfig(width=0.125))
    calls = []
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    out = net(torch.rand(1, 3, 32, 32), levels=('conv2',))
    assert list(out) == ['conv2'] and calls == [0, 1]
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 32, 32), levels=('conv5',))


def test_features_are_translation_equivariant_in_the_interior():
    torch.manual_seed(0)
    net = VGGBackbone(VGGConfig(width=0.125)).eval()
    x = torch.rand(1, 3, 128, 128)
    shifted = torch.roll(x, shifts=(8, 8), dims=(2, 3))
    a, b = net(x, ('conv4',))['conv4'], net(shifted, ('conv4',))['conv4']
    # An 8 px shift is one conv4 cell. Cells 6..8 have receptive fields (92 px) that stay
    # clear of the padding and of the wrapped rows, so they must agree exactly...
    assert torch.allclose(a[..., 6:9, 6:9], b[..., 7:10, 7:10], atol=1e-4)
    # ... while unshifted cells differ (the check is not vacuous).
    assert not torch.allclose(a[..., 6:9, 6:9], b[..., 6:9, 6:9], atol=1e-2)


def test_hilm_net_descriptors_are_unit_length_at_two_levels():
    net = HilmNet(HilmNetConfig(width=0.125, shallow_dim=8, deep_dim=16))
    shallow, deep = net(torch.rand(2, 3, 40, 48))
    assert shallow.shape == (2, 8, 20, 24) and deep.shape == (2, 16, 5, 6)
    assert torch.allclose(shallow.norm(dim=1), torch.ones(2, 20, 24), atol=1e-5)
    assert torch.allclose(deep.norm(dim=1), torch.ones(2, 5, 6), atol=1e-5)
    assert (net.shallow_stride, net.deep_stride) == (2, 8)
    (shallow.sum() + deep.sum()).backward()
    assert net.backbone.blocks[0][0].weight.grad.abs().sum() > 0
