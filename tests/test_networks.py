"""The image networks: checkpoint layout, the documented traps, the shared call signature, CTM's s-input.

The paper-size networks are only built on the meta device (shapes and counts, no memory, no forward); every tiny
configuration runs forward on CPU.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from networks.checkpoint import is_s_key, load_teacher_into_student
from networks.edm_unet import (DHARIWALUNET_CONFIGS, SONGUNET_CONFIGS, Conv2d, DhariwalUNet, Init, SongUNet,
                               interleaved_qkv_attention)
from networks.uvit import TIME_SCALE, UVIT_CONFIGS, UViT, timestep_embedding

INVENTORY = json.loads((Path(__file__).parent / "data" / "edm_state_dict_inventory.json").read_text())
CLASSES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

ALL_CONFIGS = ([(SongUNet, n, c) for n, c in SONGUNET_CONFIGS.items()]
               + [(DhariwalUNet, n, c) for n, c in DHARIWALUNET_CONFIGS.items()]
               + [(UViT, n, c) for n, c in UVIT_CONFIGS.items()])
TINY = [pytest.param(cls, cfg, id=name) for cls, name, cfg in ALL_CONFIGS if name.startswith("tiny")]
TINY_UNETS = [p for p in TINY if p.values[0] is not UViT]


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # initialisations do not depend on test order


def make_inputs(net, B, s=False, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, C = net.img_resolution, net.img_channels
    x = torch.randn(B, C, R, R, generator=g)
    sigma = (torch.randn(B, generator=g) * 1.2 - 1.2).exp()
    c_noise = sigma.log() / 4                                               # EDM's c_noise
    class_labels = None
    if labels and net.label_dim:
        class_labels = F.one_hot(torch.randint(net.label_dim, (B,), generator=g), net.label_dim).float()
    c_noise_s = (c_noise - torch.rand(B, generator=g)) if s else None      # s < t
    return x, c_noise, class_labels, c_noise_s


def perturb_(net, seed=0, scale=0.1, skip=lambda key: False):
    """Move every parameter off its initialisation, as training would (the zero-initialised output layers would
    otherwise make every output ~0 and every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not skip(name):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return net


# ------------------------------------------------------------------------------------------------------------------
# The published checkpoints' layout

@pytest.mark.parametrize("name", list(INVENTORY))
def test_state_dict_equals_reference_inventory_key_for_key(name):
    entry = INVENTORY[name]
    configs = SONGUNET_CONFIGS if entry["class"] == "SongUNet" else DHARIWALUNET_CONFIGS
    assert configs[name] == entry["constructor_kwargs"]
    with torch.device("meta"):
        net = CLASSES[entry["class"]](**configs[name])
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert got == entry["keys"]                                             # same keys, shapes and order
    assert sum(p.numel() for p in net.parameters()) == entry["params"]


@pytest.mark.parametrize("name", list(INVENTORY))
def test_s_input_only_adds_keys_ending_in_s(name):
    entry = INVENTORY[name]
    configs = SONGUNET_CONFIGS if entry["class"] == "SongUNet" else DHARIWALUNET_CONFIGS
    with torch.device("meta"):
        net = CLASSES[entry["class"]](**configs[name], s_embedding=True)
    sd = net.state_dict()
    assert not any(is_s_key(k) for k, _ in entry["keys"])                   # the convention is unambiguous
    assert [[k, list(v.shape)] for k, v in sd.items() if not is_s_key(k)] == entry["keys"]
    s_modules = {k.rsplit(".", 1)[0] for k in sd if is_s_key(k)}
    blocks = {k.rsplit(".", 2)[0] for k, _ in entry["keys"] if k.endswith(".affine.weight")}
    assert s_modules == {"map_layer0_s", "map_layer1_s"} | {f"{b}.affine_s" for b in blocks}
    for b in blocks:                                                        # affine_s mirrors affine
        assert sd[f"{b}.affine_s.weight"].shape == sd[f"{b}.affine.weight"].shape


def test_ctm_cifar10_student_has_ctms_parameter_count():
    # DDPM++ without map_augment (55,732,739) plus the s-branch: map_layer0_s 66,048 + map_layer1_s 262,656 +
    # 33 affine_s × 131,328 = 60,395,267, the 60.40M of CTM's CIFAR-10 student.
    kwargs = dict(SONGUNET_CONFIGS["cifar10-ddpmpp-uncond"], augment_dim=0)
    with torch.device("meta"):
        net = SongUNet(**kwargs, s_embedding=True)
    assert sum(p.numel() for p in net.parameters()) == 60_395_267


def test_uvit_s2_has_the_papers_size_and_names():
    with torch.device("meta"):
        net = UViT(**UVIT_CONFIGS["cifar10-uvit-s2"])
    # U-ViT-S/2: 13 blocks of width 512, MLP 2048, 8 heads (Bao et al.: 44M)
    assert sum(p.numel() for p in net.parameters()) == 44_255_328
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert shapes["patch_embed.proj.weight"] == [512, 3, 2, 2]
    assert shapes["pos_embed"] == [1, 1 + 256, 512]
    assert shapes["in_blocks.5.attn.qkv.weight"] == [1536, 512] and "in_blocks.5.attn.qkv.bias" not in shapes
    assert shapes["out_blocks.0.skip_linear.weight"] == [512, 1024] and "in_blocks.6.norm1.weight" not in shapes
    assert shapes["mid_block.mlp.fc1.weight"] == [2048, 512]
    assert shapes["final_layer.weight"] == [3, 3, 3, 3]


# ------------------------------------------------------------------------------------------------------------------
# The traps, checked against their description rather than against this code

def test_resample_filters_are_nearest_upsampling_and_average_pooling():
    x = torch.randn(2, 4, 8, 8)
    up = Conv2d(4, 4, 0, Init("xavier_uniform"), up=True)
    down = Conv2d(4, 4, 0, Init("xavier_uniform"), down=True)
    assert dict(up.state_dict()).keys() == {"resample_filter"}              # kernel 0: no weight, no bias
    assert torch.equal(up.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), rtol=0, atol=1e-6)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    binomial = Conv2d(4, 4, 3, Init("xavier_uniform"), down=True, resample_filter=[1, 3, 3, 1])
    expected = torch.tensor([1.0, 3, 3, 1]).outer(torch.tensor([1.0, 3, 3, 1])) / 64
    assert torch.equal(binomial.resample_filter[0, 0], expected)
    assert binomial(x).shape == (2, 4, 4, 4)
    assert "resample_filter" not in Conv2d(4, 4, 3, Init("xavier_uniform")).state_dict()


def test_qkv_channels_are_interleaved_per_head():
    B, heads, c, H, W = 2, 3, 8, 4, 4
    qkv = torch.randn(B, 3 * heads * c, H, W)
    # EDM's checkpoints: channel (head·c + i)·3 + {0, 1, 2} is q, k, v of channel i of that head.
    q, k, v = (qkv[:, j::3].reshape(B, heads, c, H * W) for j in range(3))
    w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(c), dim=-1)
    expected = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(B, heads * c, H, W)
    torch.testing.assert_close(interleaved_qkv_attention(qkv, heads), expected, rtol=1e-5, atol=1e-6)
    chunked = qkv.chunk(3, dim=1)                                           # the wrong, contiguous reading
    assert not torch.allclose(expected, chunked[2], atol=1e-2)


def _input_of(module, run):
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_songunet_embeds_noise_as_sin_then_cos_and_scales_labels():
    net = SongUNet(**dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], label_dim=10)).eval()
    x, c_noise, labels, _ = make_inputs(net, 3)
    half = 32 // 2                                                          # noise channels 32, endpoint=True
    arg = c_noise[:, None] * (1 / 10000) ** (torch.arange(half) / (half - 1))
    label_in = _input_of(net.map_label, lambda: net(x, c_noise, labels))
    torch.testing.assert_close(label_in, labels * math.sqrt(10))            # one-hot × √label_dim
    e = _input_of(net.map_layer0, lambda: net(x, c_noise, labels))
    torch.testing.assert_close(e - net.map_label(label_in), torch.cat([arg.sin(), arg.cos()], 1))


def test_dhariwalunet_embeds_noise_as_cos_then_sin_and_feeds_raw_labels_after_the_mlp():
    net = DhariwalUNet(**DHARIWALUNET_CONFIGS["tiny-adm-cond-16"]).eval()
    x, c_noise, labels, _ = make_inputs(net, 3)
    half = 32 // 2                                                          # model_channels 32, endpoint=False
    arg = c_noise[:, None] * (1 / 10000) ** (torch.arange(half) / half)
    torch.testing.assert_close(_input_of(net.map_layer0, lambda: net(x, c_noise, labels)),
                               torch.cat([arg.cos(), arg.sin()], 1))
    assert torch.equal(_input_of(net.map_label, lambda: net(x, c_noise, labels)), labels)
    assert net.map_label.bias is None


def test_uvit_embeds_rescaled_c_noise():
    net = UViT(**UVIT_CONFIGS["tiny-uvit-8"]).eval()
    x, c_noise, _, _ = make_inputs(net, 3)
    token = _input_of(net.time_embed, lambda: net(x, c_noise))
    torch.testing.assert_close(token, timestep_embedding(TIME_SCALE * c_noise, 128))
    # The point of the rescaling (networks/uvit.py docstring): σ = 0.002 and σ = 80 differ in the slow half of the
    # sinusoid.
    ends = timestep_embedding(TIME_SCALE * torch.tensor([0.002, 80.0]).log() / 4, 128)
    assert (ends[0, 32:64] - ends[1, 32:64]).abs().max() > 1.0


# ------------------------------------------------------------------------------------------------------------------
# The shared call signature on every tiny configuration

@pytest.mark.parametrize("cls,cfg", TINY)
@pytest.mark.parametrize("with_s", [False, True], ids=["no_s", "s"])
@pytest.mark.parametrize("B", [1, 3])
def test_forward_returns_x_shape_and_dtype(cls, cfg, with_s, B):
    torch.manual_seed(0)
    net = cls(**cfg, s_embedding=with_s)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (
        cfg["img_resolution"], cfg.get("img_channels", cfg.get("in_channels")), cfg.get("label_dim", 0))
    x, c_noise, labels, c_noise_s = make_inputs(net, B, s=with_s)
    y = net(x, c_noise, labels, c_noise_s)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    if net.label_dim:                                                       # "no class": all-zero one-hot
        assert net(x, c_noise, None, c_noise_s).shape == x.shape


@pytest.mark.parametrize("cls,cfg", TINY)
def test_bf16_autocast_stays_close_to_fp32(cls, cfg):
    net = perturb_(cls(**cfg), scale=0.05).eval()
    x, c_noise, labels, _ = make_inputs(net, 2)
    y = net(x, c_noise, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = net(x, c_noise, labels)
    assert y_bf16.dtype == torch.float32                                    # returned in x's dtype
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 ≈ 0.4%); through ~20 layers a few percent is expected.
    assert ((y_bf16 - y).norm() / y.norm()).item() < 0.05


@pytest.mark.parametrize("cls,cfg", [(SongUNet, dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], label_dim=10)),
                                     (DhariwalUNet, DHARIWALUNET_CONFIGS["tiny-adm-cond-16"])])
def test_samples_in_a_batch_are_independent(cls, cfg):
    net = perturb_(cls(**cfg)).eval()
    x, c_noise, labels, _ = make_inputs(net, 3)
    together = net(x, c_noise, labels)
    alone = torch.cat([net(x[i:i + 1], c_noise[i:i + 1], labels[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls,kwargs,match", [
    (SongUNet, dict(SONGUNET_CONFIGS["tiny-ddpmpp-16"], img_resolution=18), "multiple of 4"),
    (SongUNet, dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], img_resolution=7), "multiple of 2"),
    (DhariwalUNet, dict(DHARIWALUNET_CONFIGS["tiny-adm-cond-16"], img_resolution=15), "multiple of 2"),
    (UViT, dict(UVIT_CONFIGS["tiny-uvit-16"], img_resolution=15), "not a multiple of patch_size"),
    (SongUNet, dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], out_channels=1), "must equal out_channels"),
    (SongUNet, dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], decoder_type="skip"), "not implemented"),
    (DhariwalUNet, dict(DHARIWALUNET_CONFIGS["tiny-adm-cond-16"], attn_resolutions=[16]), "fewer than"),
])
def test_unbuildable_configurations_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls,cfg", TINY)
def test_inputs_the_network_was_not_built_for_are_refused(cls, cfg):
    net = cls(**cfg)
    x, c_noise, labels, _ = make_inputs(net, 2)
    R = net.img_resolution
    with pytest.raises(ValueError, match=rf"expects x of shape \[B, 3, {R}, {R}\], got \[2, 3, {R - 1}, {R - 1}\]"):
        net(x[..., 1:, 1:], c_noise, labels)                                # odd resolution
    with pytest.raises(ValueError, match="noise_labels must have shape"):
        net(x, c_noise[:1], labels)
    with pytest.raises(ValueError, match="s_embedding=False"):
        net(x, c_noise, labels, c_noise)
    with pytest.raises(ValueError, match="augment"):
        net(x, c_noise, labels, None, torch.zeros(2, 9))
    if net.label_dim:
        with pytest.raises(ValueError, match="one-hot of shape"):
            net(x, c_noise, labels[:, :-1])
    else:
        with pytest.raises(ValueError, match="unconditional"):
            net(x, c_noise, torch.zeros(2, 10))


def test_augment_labels_condition_a_network_built_for_them():
    net = perturb_(SongUNet(**dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], augment_dim=9))).eval()
    x, c_noise, _, _ = make_inputs(net, 2)
    aug = torch.randn(2, 9)
    assert not torch.allclose(net(x, c_noise, None, None, aug), net(x, c_noise))


def test_label_dropout_one_makes_training_outputs_label_free():
    net = perturb_(SongUNet(**dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], label_dim=10, label_dropout=1.0)))
    x, c_noise, labels, _ = make_inputs(net, 2)
    assert torch.equal(net(x, c_noise, labels), net(x, c_noise, torch.zeros_like(labels)))
    net.eval()                                                              # no dropout at inference
    assert not torch.allclose(net(x, c_noise, labels), net(x, c_noise, torch.zeros_like(labels)))


# ------------------------------------------------------------------------------------------------------------------
# CTM's s-input

@pytest.mark.parametrize("cls,cfg", TINY_UNETS)
def test_at_initialisation_the_output_does_not_depend_on_s(cls, cfg):
    # A "trained" base network (every non-s weight moved), with the s-branch as initialised.
    net = perturb_(cls(**cfg, s_embedding=True), skip=is_s_key).eval()
    x, c_noise, labels, s1 = make_inputs(net, 3, s=True, seed=1)
    s2 = c_noise - 3.0
    y1 = net(x, c_noise, labels, s1)
    assert torch.equal(y1, net(x, c_noise, labels, s2))
    assert torch.equal(y1, net(x, c_noise, labels))                         # no s: queried at s = t
    # The test can fail: once affine_s has moved, s matters.
    perturb_(net, seed=2, skip=lambda k: not k.endswith("affine_s.weight"))
    assert not torch.allclose(net(x, c_noise, labels, s1), net(x, c_noise, labels, s2))


@pytest.mark.parametrize("cls,cfg", TINY_UNETS)
def test_student_loaded_from_teacher_is_the_teacher_for_every_s(cls, cfg):
    teacher = perturb_(cls(**cfg)).eval()
    student = cls(**cfg, s_embedding=True).eval()
    load_teacher_into_student(student, teacher)
    x, c_noise, labels, c_noise_s = make_inputs(teacher, 3, s=True)
    assert torch.equal(student(x, c_noise, labels, c_noise_s), teacher(x, c_noise, labels))
    # ... and the s-branch is trainable from there: the zero layer receives a gradient.
    student.train()
    student(x, c_noise, labels, c_noise_s).square().sum().backward()
    grads = [p.grad for k, p in student.named_parameters() if k.endswith("affine_s.weight")]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_uvit_s_token_is_used_and_teacher_keys_load():
    teacher = UViT(**UVIT_CONFIGS["tiny-uvit-16"])
    student = UViT(**UVIT_CONFIGS["tiny-uvit-16"], s_embedding=True).eval()
    load_teacher_into_student(student, teacher)
    assert {k for k in student.state_dict() if is_s_key(k)} == {"pos_embed_s"}
    x, c_noise, _, s = make_inputs(student, 2, s=True)
    assert not torch.allclose(student(x, c_noise, None, s), student(x, c_noise, None, s - 2.0))
