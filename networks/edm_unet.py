"""EDM's UNet backbones: SongUNet (DDPM++ / NCSN++) and DhariwalUNet (ADM), with CTM's optional second noise input.

- T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of Diffusion-Based Generative Models",
  NeurIPS 2022, arXiv:2206.00364v2 (its re-implementations of the DDPM++, NCSN++ and ADM backbones).
- DDPM++ / NCSN++: Y. Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations",
  ICLR 2021, arXiv:2011.13456.  ADM: P. Dhariwal, A. Nichol, "Diffusion Models Beat GANs on Image Synthesis",
  NeurIPS 2021, arXiv:2105.05233.
- The s-input: D. Kim et al., "Consistency Trajectory Models", ICLR 2024, arXiv:2310.02279v3 (as in its code,
  sony/ctm).

These are plain `nn.Module`s that know nothing of preconditioning. With EDM's wrapper around them,

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x ; c_noise(σ)),    c_noise(σ) = ln(σ)/4     (EDM Table 1)

this file is F: `forward(x, noise_labels, class_labels, noise_labels_s, augment_labels)` takes the already scaled
input c_in·x and c_noise, and returns a tensor shaped like x (and of its dtype, also under autocast). c_skip,
c_out and c_in live in `algorithms/`. Inputs a network was not built for (labels for an unconditional one, s
without the s-input, augment labels without augment_dim, another resolution) raise a ValueError that says so.

CTM's student is NN(c_in(t)·x_t, c_noise(t), c_noise(s)) inside EDM's preconditioning of t (algorithms/ctm.py).
Built with `s_embedding=True`, a network embeds c_noise(s) with the same noise embedding, passes it through its own MLP
(`map_layer0_s`, `map_layer1_s`) and adds a per-block `affine_s(emb_s)` to the block's `affine(emb_t)`.
Every s-layer's name ends in `_s` and all other keys are unchanged, so a teacher's state_dict loads into a
student with only the s-keys missing (`networks.checkpoint.load_teacher_into_student`). Given no s, such a network
is evaluated at s = t, CTM's g(x_t, t, t): the denoiser.

Written from the published architectures and the layout of EDM's checkpoints, not from NVlabs' code, which is
CC BY-NC-SA. Module names, tensor shapes and constructor defaults match theirs (facts about the checkpoint
format), so `state_dict()` equals the published checkpoints' key for key and shape for shape and they load with
`strict=True`. The traps of that format are commented where they are handled.

| code            | paper / checkpoint                                                    |
|-----------------|-----------------------------------------------------------------------|
| `noise_labels`  | c_noise(σ) = ln(σ)/4 (EDM Table 1); CTM's c_noise(t)                  |
| `noise_labels_s`| CTM's c_noise(s)                                                      |
| `emb`, `emb_s`  | time (and class) embedding of t, and of s                             |
| `map_noise`     | sinusoidal ("positional") or random Fourier embedding of c_noise      |
| `affine`        | per-block projection of emb (ADM: into a scale and a shift)           |
| `skip_scale`    | 1/√2 in DDPM++/NCSN++ (Song et al.), 1 in ADM                         |
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------------------
# Initialisation (the modes and gains of EDM's checkpoints' constructors)

class Init:
    """A weight-initialisation rule: `mode` with the fans of the weight, scaled by `weight` (weights) and `bias`."""

    def __init__(self, mode: str, weight: float = 1.0, bias: float = 0.0):
        if mode not in ("xavier_uniform", "kaiming_uniform", "kaiming_normal"):
            raise ValueError(f"unknown init mode {mode!r}")
        self.mode, self.weight, self.bias = mode, weight, bias

    def fill_(self, tensor: torch.Tensor, fan_in: int, fan_out: int, scale: float) -> None:
        with torch.no_grad():
            if self.mode == "xavier_uniform":
                tensor.uniform_(-1, 1).mul_(math.sqrt(6 / (fan_in + fan_out)) * scale)
            elif self.mode == "kaiming_uniform":
                tensor.uniform_(-1, 1).mul_(math.sqrt(3 / fan_in) * scale)
            else:
                tensor.normal_().mul_(math.sqrt(1 / fan_in) * scale)

    def apply_(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # Fans of a weight [out, in, k, k]: in·k² and out·k². The bias is drawn with the weight's fans.
        receptive = math.prod(weight.shape[2:])
        fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
        self.fill_(weight, fan_in, fan_out, self.weight)
        if bias is not None:
            self.fill_(bias, fan_in, fan_out, self.bias)


def linear(in_features: int, out_features: int, init: Init, bias: bool = True) -> nn.Linear:
    """An `nn.Linear` (keys `weight [out, in]`, `bias [out]`) initialised by `init`."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    init.apply_(layer.weight, layer.bias)
    return layer


def group_norm(num_channels: int, eps: float) -> nn.GroupNorm:
    # Trap: the number of groups is min(32, C // 4), not always 32.
    return nn.GroupNorm(min(32, num_channels // 4), num_channels, eps=eps)


class Conv2d(nn.Module):
    """A 2-D convolution with optional 2× up- or downsampling by a fixed FIR filter.

    `kernel=0` makes a pure resampler without weight or bias (ADM's up/down skips). Resampling happens before the
    convolution, except in the fused down path of NCSN++'s aux_residual (convolve, then filter with stride 2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, init: Init, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter=(1, 1), fused_resample: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        if fused_resample and not (down and kernel):
            raise ValueError("fused resampling is only implemented for a downsampling convolution with a kernel")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
            init.apply_(self.weight, self.bias)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # Trap: `resample_filter` is a persistent buffer, registered only on up/down convolutions, so that the
        # state_dict lists it exactly where the checkpoints do. Value: the outer product of
        # the 1-D filter, normalised to sum 1: [1,1] -> 2x2 of 0.25, [1,3,3,1] -> 4x4 binomial.
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = (torch.outer(f, f) / f.sum() ** 2)[None, None]                        # [1, 1, F, F]
        self.register_buffer("resample_filter", f if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, f = self.weight, self.bias, self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample:
            # Conv at full resolution with the padding widened by the filter's, then filter with stride 2:
            # (H + 2·(w_pad+f_pad) − k + 1 − F)/2 + 1 = H/2.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
            return x + b.to(x.dtype)[None, :, None, None] if b is not None else x
        if self.up:
            # Depthwise transposed conv with 4·f, stride 2: nearest-neighbour for [1,1], bilinear-like otherwise.
            x = F.conv_transpose2d(x, (4 * f).tile(self.in_channels, 1, 1, 1), groups=self.in_channels,
                                   stride=2, padding=f_pad)
        if self.down:
            # Depthwise filter with stride 2: a 2x2 average pool for [1,1].
            x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, b, padding=w_pad)
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x·f_j) | sin(x·f_j)], f_j = (1/max_positions)^(j / (C/2 − endpoint)). No state."""

    def __init__(self, num_channels: int, endpoint: bool, max_positions: int = 10000):
        super().__init__()
        self.num_channels, self.endpoint, self.max_positions = num_channels, endpoint, max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:                           # x: [B] -> [B, C]
        half = self.num_channels // 2
        j = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (j / (half - (1 if self.endpoint else 0)))
        arg = torch.outer(x.float(), freqs)
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π f x) | sin(2π f x)], f ~ N(0, scale²) (NCSN++, Song et al. 2021)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        # Trap: `freqs` is random at init, so it must come from the checkpoint.
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                           # x: [B] -> [B, C]
        arg = torch.outer(x.float(), 2 * math.pi * self.freqs.float())
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def interleaved_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over the H·W positions of an EDM `qkv` conv output [B, 3C, H, W] -> [B, C, H, W].

    Trap: q, k and v are interleaved per channel, qkv channel (head·c_head + c)·3 + {0: q, 1: k, 2: v}; they are
    not three contiguous blocks, so no chunk(3). softmax(qᵀk/√c_head)·v is computed in float32
    even under autocast, as EDM's AttentionOp does: bf16 logits lose too much precision.
    """
    B, C3, H, W = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B * num_heads, C // num_heads, 3, H * W).unbind(2)     # each [B·heads, c_head, HW]
    with torch.autocast(qkv.device.type, enabled=False):
        a = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                           v.float().transpose(1, 2))             # [B·heads, HW, c_head]
    # contiguous: forward-mode AD through the following group_norm (Analytic-Precond's JVPs) refuses a strided view
    return a.transpose(1, 2).reshape(B, C, H, W).contiguous().to(qkv.dtype)


# --------------------------------------------------------------------------------------------------------------
# The residual block shared by both UNets (EDM's "UNetBlock")

class UNetBlock(nn.Module):
    """GroupNorm-SiLU-conv, embedding injection, GroupNorm-SiLU-dropout-conv, skip, then optional self-attention.

    adaptive_scale=False (DDPM++/NCSN++): h = silu(norm1(h + affine(emb))).
    adaptive_scale=True (ADM):            h = silu(shift + norm1(h)·(scale + 1)),  (scale, shift) = affine(emb).
    With s_embedding, affine(emb) becomes affine(emb) + affine_s(emb_s) (CTM).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, init: Init, init_zero: Init,
                 init_attn: Init | None = None, up: bool = False, down: bool = False, attention: bool = False,
                 num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_filter=(1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, s_embedding: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        if attention and self.num_heads == 0:
            raise ValueError(f"attention asked for in a block with {out_channels} channels, fewer than "
                             f"channels_per_head={channels_per_head}: it would have no heads")
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        affine_channels = out_channels * (2 if adaptive_scale else 1)

        # Registration order = state_dict order: norm0, conv0, affine, norm1, conv1, skip, attn.
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, init, up=up, down=down, resample_filter=resample_filter)
        self.affine = linear(emb_channels, affine_channels, init)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # Trap: a same-width up/down skip without resample_proj (ADM) has kernel 0: a pure resampler with no
            # weight or bias, only `skip.resample_filter`.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, init, up=up, down=down,
                               resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_attn if init_attn is not None else init)
            self.proj = Conv2d(out_channels, out_channels, 1, init_zero)
        # Registered last so that the base keys keep the checkpoints' order. CTM's own code initialises
        # affine_s like affine (not zero). We zero it: a student copied from the teacher then computes exactly
        # the teacher's F for every s, and the s-branch still trains (d out / d affine_s.weight ≠ 0).
        self.affine_s = linear(emb_channels, affine_channels, Init("xavier_uniform", 0.0)) if s_embedding else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, emb_s: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))                                    # [B, out, H', W']
        p = self.affine(emb)                                                       # [B, out or 2·out]
        if self.affine_s is not None:
            p = p + self.affine_s(emb_s)                                           # CTM: s added to t's conditioning
        p = p[:, :, None, None].to(h.dtype)                                        # [B, ·, 1, 1]
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)                                       # this order: scale, then shift
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale

        if self.num_heads:
            a = interleaved_qkv_attention(self.qkv(self.norm2(x)), self.num_heads)    # [B, C, H, W]
            x = (self.proj(a) + x) * self.skip_scale
        return x


# --------------------------------------------------------------------------------------------------------------
# Input checks shared by every network of the project (the shared call signature)

def check_inputs(net: nn.Module, x: torch.Tensor, noise_labels: torch.Tensor, class_labels, noise_labels_s,
                 augment_labels) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Refuse inputs the network was not built for, with a message that says which; return the class labels and
    the s labels to use.

    `net` must have img_resolution, img_channels, label_dim, augment_dim and s_embedding. Two defaults:
    - a class-conditional network given no labels gets all-zero one-hots: EDM's own wrapper does the same, and
      it is the "no class" input of a network trained with label dropout;
    - a network with the s-input given no s is queried at s = t, CTM's g(x_t, t, t), the plain denoiser (as
      networks/mlp.py does), so `algorithms/edm.py`'s denoiser works on a CTM student.
    """
    name = type(net).__name__
    R, C = net.img_resolution, net.img_channels
    if x.ndim != 4 or tuple(x.shape[1:]) != (C, R, R):
        raise ValueError(f"{name} expects x of shape [B, {C}, {R}, {R}], got {list(x.shape)}")
    B = x.shape[0]
    if noise_labels.shape != (B,):
        raise ValueError(f"{name}: noise_labels must have shape [{B}], got {list(noise_labels.shape)}")
    if net.label_dim == 0:
        if class_labels is not None:
            raise ValueError(f"{name} is unconditional (label_dim=0) but class_labels were given")
    elif class_labels is None:
        class_labels = torch.zeros(B, net.label_dim, device=x.device)
    elif class_labels.shape != (B, net.label_dim):
        raise ValueError(f"{name}: class_labels must be one-hot of shape [{B}, {net.label_dim}], "
                         f"got {list(class_labels.shape)}")
    elif not class_labels.is_floating_point():
        class_labels = class_labels.float()                                    # e.g. F.one_hot's int64
    if not net.s_embedding:
        if noise_labels_s is not None:
            raise ValueError(f"{name} was built without the s-input (s_embedding=False) but noise_labels_s "
                             f"was given; build it with s_embedding=True for CTM")
    elif noise_labels_s is None:
        noise_labels_s = noise_labels
    elif noise_labels_s.shape != (B,):
        raise ValueError(f"{name}: noise_labels_s must have shape [{B}], got {list(noise_labels_s.shape)}")
    if augment_labels is not None:
        if net.augment_dim == 0:
            raise ValueError(f"{name} was built with augment_dim=0 but augment_labels were given")
        if augment_labels.shape != (B, net.augment_dim):
            raise ValueError(f"{name}: augment_labels must have shape [{B}, {net.augment_dim}], "
                             f"got {list(augment_labels.shape)}")
    return class_labels, noise_labels_s


def _check_resolution(name: str, img_resolution: int, num_levels: int) -> None:
    factor = 2 ** (num_levels - 1)
    if img_resolution <= 0 or img_resolution % factor:
        raise ValueError(f"{name}: img_resolution={img_resolution} cannot be halved {num_levels - 1} times "
                         f"(it must be a multiple of {factor} for {num_levels} levels of channel_mult)")


def _check_image_channels(name: str, in_channels: int, out_channels: int) -> None:
    # The shared call signature returns a tensor shaped like x.
    if in_channels != out_channels:
        raise ValueError(f"{name}: in_channels ({in_channels}) must equal out_channels ({out_channels})")


def _drop_labels(class_labels: torch.Tensor, label_dropout: float) -> torch.Tensor:
    """Zero each sample's one-hot with probability label_dropout (training for classifier-free guidance)."""
    keep = torch.rand(class_labels.shape[0], 1, device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


# --------------------------------------------------------------------------------------------------------------
# SongUNet: DDPM++ ("vp" checkpoints) and NCSN++ ("ve" checkpoints)

class SongUNet(nn.Module):
    """DDPM++ / NCSN++ as re-implemented by EDM. Arguments and defaults are EDM's constructor's;
    the CIFAR-10 checkpoints use the presets in SONGUNET_CONFIGS (note channel_mult [2,2,2], not the default)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10,
                 label_dropout: float = 0.0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard", resample_filter=(1, 1),
                 s_embedding: bool = False):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"SongUNet: embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"SongUNet: encoder_type {encoder_type!r} is not implemented ('standard' for DDPM++, "
                             f"'residual' for NCSN++; no published EDM checkpoint uses another)")
        if decoder_type != "standard":
            raise ValueError(f"SongUNet: decoder_type {decoder_type!r} is not implemented (only 'standard', "
                             f"which every published EDM checkpoint uses)")
        _check_resolution("SongUNet", img_resolution, len(channel_mult))
        _check_image_channels("SongUNet", in_channels, out_channels)
        self.img_resolution, self.img_channels = img_resolution, in_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        self.s_embedding, self.residual_encoder = s_embedding, encoder_type == "residual"
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        init_attn = Init("xavier_uniform", weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=init_attn, s_embedding=s_embedding)

        # Mapping network. Registration order = checkpoint order.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = linear(label_dim, noise_channels, init) if label_dim else None
        self.map_augment = linear(augment_dim, noise_channels, init, bias=False) if augment_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels, init)
        self.map_layer1 = linear(emb_channels, emb_channels, init)

        # Encoder: every output except the aux path is pushed on the skip stack.
        self.enc = nn.ModuleDict()
        cout, caux = in_channels, in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3, init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if self.residual_encoder:
                    # NCSN++: a parallel path from the input image, downsampled by a fused conv at each level.
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, init, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter)
                    caux = cout
            skip_channels.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skip_channels.append(cout)

        # Decoder: num_blocks + 1 blocks per level, each eating one skip; attention only in the
        # last block of a level (and in the bottleneck's in0).
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=attention, **block)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = group_norm(cout, eps=1e-6)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(cout, out_channels, 3, init_zero)

        if s_embedding:
            # CTM's separate MLP for s on the same noise (and label) embedding, as in CTM's SongUNet.
            self.map_layer0_s = linear(noise_channels, emb_channels, init)
            self.map_layer1_s = linear(emb_channels, emb_channels, init)

    def _embed_noise(self, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        e = self.map_noise(c_noise)                                                # [B, C_noise] = [cos | sin]
        # Trap: SongUNet swaps the halves to [sin | cos]; DhariwalUNet does not.
        e = e.reshape(e.shape[0], 2, -1).flip(1).reshape(e.shape)
        if self.map_label is not None:
            # Trap: the one-hot is scaled by sqrt(label_dim) and enters before the MLP, through a Linear with a
            # bias; DhariwalUNet does neither.
            e = e + self.map_label(class_labels * math.sqrt(self.label_dim))
        return e

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                noise_labels_s: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels, noise_labels_s = check_inputs(self, x, noise_labels, class_labels, noise_labels_s,
                                                    augment_labels)
        if class_labels is not None and self.training and self.label_dropout:
            class_labels = _drop_labels(class_labels, self.label_dropout)     # the same mask for t and s
        dtype = x.dtype

        e = self._embed_noise(noise_labels, class_labels)                         # [B, C_noise]
        if augment_labels is not None:
            e = e + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(e))))                 # [B, C_emb]
        emb_s = None
        if self.s_embedding:
            e_s = self._embed_noise(noise_labels_s, class_labels)
            emb_s = F.silu(self.map_layer1_s(F.silu(self.map_layer0_s(e_s))))     # [B, C_emb]

        skips, aux = [], x
        for name, layer in self.enc.items():
            if name.endswith("_aux_residual"):
                # NCSN++ residual encoder: x = (x + conv(aux))/√2 replaces the down block's skip.
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb, emb_s) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        for layer in self.dec.values():
            if isinstance(layer, UNetBlock):
                if x.shape[1] != layer.in_channels:                                # a block that eats a skip
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb, emb_s)
            elif isinstance(layer, nn.GroupNorm):                                  # aux_norm
                x = F.silu(layer(x))
            else:                                                                  # aux_conv
                x = layer(x)
        return x.to(dtype)                                                         # fp32 in -> fp32 out under autocast


# --------------------------------------------------------------------------------------------------------------
# DhariwalUNet: ADM ("adm" checkpoint, ImageNet-64)

class DhariwalUNet(nn.Module):
    """ADM as re-implemented by EDM: scale/shift conditioning, attention in every block at the
    attention resolutions, 64 channels per head, weightless up/down skips."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult=(1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions=(32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0.0, s_embedding: bool = False):
        super().__init__()
        _check_resolution("DhariwalUNet", img_resolution, len(channel_mult))
        _check_image_channels("DhariwalUNet", in_channels, out_channels)
        self.img_resolution, self.img_channels = img_resolution, in_channels
        self.label_dim, self.augment_dim, self.label_dropout = label_dim, augment_dim, label_dropout
        self.s_embedding = s_embedding
        emb_channels = model_channels * channel_mult_emb
        # kaiming_uniform × √(1/3) on weights and biases: U(±1/√fan_in), PyTorch's own default for Linear/Conv.
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, skip_scale=1.0, eps=1e-5,
                     resample_proj=False, adaptive_scale=True, init=init, init_zero=init_zero, s_embedding=s_embedding)

        # Mapping network. Registration order = checkpoint order.
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = linear(augment_dim, model_channels, init_zero, bias=False) if augment_dim else None
        self.map_layer0 = linear(model_channels, emb_channels, init)
        self.map_layer1 = linear(emb_channels, emb_channels, init)
        # Trap: no bias, applied after map_layer1 to the raw one-hot; the √label_dim lives in the init instead of
        # the input (kaiming_normal × √label_dim = N(0, 1) entries).
        self.map_label = (linear(label_dim, emb_channels, Init("kaiming_normal", weight=math.sqrt(label_dim)),
                                 bias=False) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3, init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skip_channels.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
                skip_channels.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = group_norm(cout, eps=1e-5)
        self.out_conv = Conv2d(cout, out_channels, 3, init_zero)

        if s_embedding:
            # CTM's separate MLP for s (CTM's ADM: `time_embed_s`), on the same sinusoid.
            self.map_layer0_s = linear(model_channels, emb_channels, init)
            self.map_layer1_s = linear(emb_channels, emb_channels, init)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                noise_labels_s: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels, noise_labels_s = check_inputs(self, x, noise_labels, class_labels, noise_labels_s,
                                                    augment_labels)
        if class_labels is not None and self.training and self.label_dropout:
            class_labels = _drop_labels(class_labels, self.label_dropout)
        dtype = x.dtype

        e = self.map_noise(noise_labels)                                           # [B, C] = [cos | sin], no swap
        if augment_labels is not None:
            e = e + self.map_augment(augment_labels)
        e = self.map_layer1(F.silu(self.map_layer0(e)))                            # [B, C_emb]
        if self.map_label is not None:
            e = e + self.map_label(class_labels)
        emb = F.silu(e)
        emb_s = None
        if self.s_embedding:
            # As in CTM's ADM student, s gets its own MLP and no class embedding.
            emb_s = F.silu(self.map_layer1_s(F.silu(self.map_layer0_s(self.map_noise(noise_labels_s)))))

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb, emb_s) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:                                    # a block that eats a skip
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb, emb_s)
        x = self.out_conv(F.silu(self.out_norm(x)))
        return x.to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Named configurations: constructor kwargs. The paper ones are those of the published checkpoints (EDM's train.py
# presets). The tiny ones are ours, sized to train on 2 CPU cores; they keep each architecture's structure
# (attention level, bottleneck, aux path).

_DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
               resample_filter=[1, 1])
_NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
               resample_filter=[1, 3, 3, 1])
_CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9, model_channels=128,
                channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)

SONGUNET_CONFIGS = {
    # edm-cifar10-32x32-uncond-vp.pkl / -cond-vp.pkl / -uncond-ve.pkl ("vp" = DDPM++, "ve" = NCSN++)
    "cifar10-ddpmpp-uncond": dict(**_CIFAR10, label_dim=0, **_DDPMPP),
    "cifar10-ddpmpp-cond": dict(**_CIFAR10, label_dim=10, **_DDPMPP),
    "cifar10-ncsnpp-uncond": dict(**_CIFAR10, label_dim=0, **_NCSNPP),
    "tiny-ddpmpp-8": dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[4], dropout=0.0, **_DDPMPP),
    "tiny-ddpmpp-16": dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                           channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, **_DDPMPP),
    "tiny-ddpmpp-32": dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=32,
                           channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.0, **_DDPMPP),
    "tiny-ddpmpp-cond-32": dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
                                channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.0, **_DDPMPP),
    "tiny-ncsnpp-16": dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=32,
                           channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, **_NCSNPP),
}

DHARIWALUNET_CONFIGS = {
    # edm-imagenet-64x64-cond-adm.pkl
    "imagenet64-adm-cond": dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, augment_dim=0,
                                model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                                attn_resolutions=[32, 16, 8], dropout=0.10),
    # 64 channels at the attention level: one head of 64 channels, as in ADM.
    "tiny-adm-cond-16": dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0),
}
