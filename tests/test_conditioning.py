"""Every network sees what it is conditioned on: its output changes with t, with the class (and
between a class and the null class), with the edge map. Checked at the sizes the tests train and at
the scripts' defaults, with random weights.

Why these tests exist: with one channel per GroupNorm group, a per-channel constant added before
the norm (the time embedding of a ResBlock) is subtracted again, and the network cannot see t. The
sampler tests never noticed, because they use an exact noise predictor, not the network.
Zero-initialised layers (output convolutions, zero convs, adaLN-Zero gates) would hide any input,
so `unzero` gives them small random weights first.
"""
import pytest
import torch

import cfg
import classifier_guidance as cg
import controlnet_canny as cn
from tools import ddpm_figures
import ddpm_mnist
import deepcache
import dit_cifar
import latent_diffusion as ld
import rectified_flow as rf
import toy_2d
from diffusion import DiffusionModel

MIN_CHANGE = 1e-2   # relative change of the output; a network blind to the input changes by ~1e-6

TEST_SIZE = dict(image_size=8, channels=1, base=8, mults=(1, 2), num_res=1)   # what the unit tests build
TINY = dict(image_size=28, channels=1, **ddpm_mnist.PRESETS["tiny"])           # the CPU recipe's size
DEFAULT = dict(image_size=28, channels=1, **ddpm_mnist.PRESETS["mnist"])       # ddpm_mnist.py's default
SIZES = {"test": TEST_SIZE, "tiny": TINY, "default": DEFAULT}


def unzero(net: torch.nn.Module) -> torch.nn.Module:
    """Small random values in every all-zero parameter (zero-initialised layers hide their inputs)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() > 1 and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def change(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |a|: how much an output moved when one input changed."""
    return ((a - b).norm() / a.norm()).item()


def x_for(c: dict, n: int = 2) -> torch.Tensor:
    return torch.randn(n, c["channels"], c["image_size"], c["image_size"], generator=torch.Generator().manual_seed(1))


def t_pair(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n,), 10), torch.full((n,), 900)


def assert_sees_t_class_and_null(net, x):
    """net(x, t, y) with 10 classes and the null class 10: the output moves with each input."""
    (t1, t2), y, y2, null = t_pair(), torch.tensor([3, 3]), torch.tensor([7, 7]), torch.tensor([10, 10])
    out = net(x, t1, y)
    assert change(out, net(x, t2, y)) > MIN_CHANGE, "t"
    assert change(out, net(x, t1, y2)) > MIN_CHANGE, "class"
    assert change(out, net(x, t1, null)) > MIN_CHANGE, "class against the null class"


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("time_embed", ["add", "concat"])
def test_unet_output_changes_with_t(size, time_embed):
    torch.manual_seed(0)
    c = SIZES[size]
    net = unzero(ddpm_figures.make_unet(time_embed, **c))
    x, (t1, t2) = x_for(c), t_pair()
    assert change(net(x, t1), net(x, t2)) > MIN_CHANGE


@torch.no_grad()
def test_concat_time_embedding_does_not_rely_on_the_zero_padding():
    """With circular padding a constant map has no border: t must still get through the norms."""
    torch.manual_seed(0)
    net = unzero(ddpm_figures.make_unet("concat", **TINY))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0):
            m.padding_mode = "circular"
    x, (t1, t2) = x_for(TINY), t_pair()
    assert change(net(x, t1), net(x, t2)) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("preset", ["tiny", "mnist"])
@pytest.mark.parametrize("time_embed", ["add", "concat"])
def test_graded_interface_model_changes_with_t(preset, time_embed):
    torch.manual_seed(0)
    net = unzero(DiffusionModel(28, 1, preset, time_embed))
    x, (t1, t2) = x_for(TINY), t_pair()
    assert change(net(x, t1), net(x, t2)) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("size", ["test", "tiny"])
def test_deepcache_changes_with_t_at_full_and_cached_steps(size):
    torch.manual_seed(0)
    c = SIZES[size]
    unet = unzero(ddpm_mnist.UNet(**c))
    x, (t1, t2) = x_for(c), t_pair()
    outs = []
    for t in (t1, t2):
        cache = deepcache.DeepCache(unet, branch=1)
        cache.reset([0])
        full = cache(x, t1)                 # fills the cache at t1
        outs.append((full, cache(x, t)))    # a cached step: only the shallow branch runs, at t
    assert change(outs[0][1], outs[1][1]) > MIN_CHANGE
    cache.reset([0])
    assert change(cache(x, t1), cache.unet(x, t2)) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cond", ["input", "xattn"])
def test_cfg_unet_changes_with_t_class_and_null(size, cond):
    torch.manual_seed(0)
    c = SIZES[size]
    assert_sees_t_class_and_null(unzero(cfg.CondUNet(10, cond, **c)), x_for(c))


@torch.no_grad()
@pytest.mark.parametrize("size", SIZES)
def test_noisy_classifier_logits_change_with_t(size):
    torch.manual_seed(0)
    c = SIZES[size]
    net = unzero(cg.NoisyClassifier(10, **c))
    x, (t1, t2) = x_for(c), t_pair()
    assert change(net(x, t1), net(x, t2)) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("size", ["test", "tiny"])
def test_controlnet_changes_with_t_and_edges(size):
    torch.manual_seed(0)
    c = SIZES[size]
    unet = unzero(ddpm_mnist.UNet(**c))
    model = unzero(cn.ControlledUNet(unet, cn.ControlNet(unet)))
    x, (t1, t2) = x_for(c), t_pair()
    edges = (torch.rand(2, 1, c["image_size"], c["image_size"], generator=torch.Generator().manual_seed(2)) > 0.8)
    edges, other = edges.float() * 2 - 1, edges.flip(-1).float() * 2 - 1
    out = model(x, t1, edges)
    assert change(out, model(x, t2, edges)) > MIN_CHANGE, "t"
    assert change(out, model(x, t1, other)) > MIN_CHANGE, "edge map"
    r1, _ = model.control(x, t1, edges)                 # the control branch alone sees t too
    r2, _ = model.control(x, t2, edges)
    assert change(r1, r2) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("base", [8, 16, 32, 128])
def test_latent_unet_changes_with_t(base):
    torch.manual_seed(0)
    net = unzero(ld.latent_unet((4, 7, 7), base, 1))
    z, (t1, t2) = torch.randn(2, 4, 7, 7), t_pair()
    assert change(net(z, t1), net(z, t2)) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_velocity_unet_changes_with_t(space):
    torch.manual_seed(0)
    net = unzero(rf.VelocityUNet(**TINY) if space == "pixel" else ld.latent_unet((4, 7, 7), 8, 1, cls=rf.VelocityUNet))
    x = x_for(TINY) if space == "pixel" else torch.randn(2, 4, 7, 7)
    assert change(net(x, torch.full((2,), 0.05)), net(x, torch.full((2,), 0.9))) > MIN_CHANGE


@torch.no_grad()
@pytest.mark.parametrize("model", ["test", "DiT-S/2"])
def test_dit_changes_with_t_class_and_null(model):
    torch.manual_seed(0)
    size = dict(input_size=4, in_channels=4, num_classes=10, patch=2, hidden=32, depth=2, heads=2) \
        if model == "test" else dict(input_size=8, in_channels=4, num_classes=10, **dit_cifar.parse_model(model))
    assert_sees_t_class_and_null(unzero(dit_cifar.DiT(**size)), torch.randn(2, 4, size["input_size"], size["input_size"]))


@torch.no_grad()
def test_toy_mlp_changes_with_t():
    torch.manual_seed(0)
    net = toy_2d.MLP().eval()
    x = torch.randn(64, 2)
    assert change(net(x, torch.full((64,), 5)), net(x, torch.full((64,), 90))) > MIN_CHANGE
