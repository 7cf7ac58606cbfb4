"""U-ViT: a ViT backbone for diffusion, with the project's call signature and CTM's s as one more token.

F. Bao, S. Nie, K. Xue, Y. Cao, C. Li, H. Su, J. Zhu, "All are Worth Words: A ViT Backbone for Diffusion
Models", CVPR 2023, arXiv:2209.12152 (details of the architecture from its public code, baofff/U-ViT).

Everything is a token: the image as p×p patches (a strided conv), the time as one token (a sinusoid, optionally
through an MLP), the class as one token. A plain pre-LN transformer of depth+1 blocks runs on them; out-block j
first fuses its input with in-block (depth/2 − 1 − j)'s output, Linear(concat[x, skip]) ("long skips").
The patch tokens are mapped back to pixels and a 3×3 conv follows.

    tokens = [label?, time, patch_1 … patch_L] + pos_embed          L = (img_resolution / p)²
    h_i    = Block_i(h_{i−1})                                       i = 1 … depth/2          (in_blocks)
    h_mid  = Block_mid(h_{depth/2})
    h'_j   = Block'_j(Linear([h'_{j−1}, h_{depth/2+1−j}]))          j = 1 … depth/2          (out_blocks)
    F      = Conv3×3(unpatchify(Linear(LN(h')[patches])))

Written from U-ViT's published architecture; no code copied. Module names follow the official code's
(`patch_embed.proj`, `pos_embed`, `in_blocks.i.attn.qkv`, …); U-ViT-S/2 has the paper's 44M parameters.

Two additions of ours:
- Time input. U-ViT was trained on 999·t_VP; EDM hands networks c_noise = ln(σ)/4, about −1.6…1.1 on
  σ ∈ [0.002, 80], which would only reach the top frequencies of a max-period-10000 sinusoid and make noise levels
  nearly indistinguishable. We embed TIME_SCALE·c_noise = 250·ln σ (−1554…1095), the range CM
  and CTM feed their ADM UNet.
- CTM's s (our design; neither paper has it): one extra token, the same sinusoid of 250·ln s (through its own MLP
  `time_embed_s` when mlp_time_embed), plus its own position row `pos_embed_s`. All base keys are unchanged, so
  a U-ViT teacher's weights load with only the `_s` keys missing. Unlike the UNets' zero-initialised affine_s,
  a new token changes every attention softmax, so such a student does not start exactly at its teacher.

| code                 | paper                                    |
|----------------------|------------------------------------------|
| `patch_size`         | p (patch size)                           |
| `embed_dim`, `depth` | hidden size D, number of layers − 1      |
| `in_blocks`, `mid_block`, `out_blocks` | shallow, middle, deep blocks |
| `skip_linear`        | the long-skip Linear                     |
| `final_layer`        | the extra 3×3 conv at the output         |
"""
import math

import einops
import torch
import torch.nn.functional as F
from torch import nn

from networks.edm_unet import check_inputs

TIME_SCALE = 1000.0  # embed 1000·c_noise = 250·ln σ, not c_noise itself (module docstring)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """U-ViT's (and ADM's) time embedding [cos(t·f_j) | sin(t·f_j)], f_j = max_period^(−j/(dim/2)).

    [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                              # [B, N, D]
        # Contiguous q | k | v blocks, each split into heads (unlike EDM's interleaved qkv).
        q, k, v = einops.rearrange(self.qkv(x), "B N (K H c) -> K B H N c", K=3, H=self.num_heads)
        a = F.scaled_dot_product_attention(q, k, v)                                   # [B, H, N, c], scale 1/√c
        return self.proj(einops.rearrange(a, "B H N c -> B N (H c)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; with `skip`, first x = skip_linear(concat[x, skip]) (the long skip)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                              # [B, C, H, W] -> [B, L, D]
        return self.proj(x).flatten(2).transpose(1, 2)


def _time_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))


class UViT(nn.Module):
    """U-ViT (module docstring) with forward(x, noise_labels, class_labels, noise_labels_s, augment_labels)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, patch_size: int = 2,
                 embed_dim: int = 512, depth: int = 12, num_heads: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, mlp_time_embed: bool = False, s_embedding: bool = False):
        super().__init__()
        if img_resolution <= 0 or img_resolution % patch_size:
            raise ValueError(f"UViT: img_resolution={img_resolution} is not a multiple of patch_size={patch_size}")
        if depth % 2:
            raise ValueError(f"UViT: depth={depth} must be even (depth/2 in-blocks, a mid block, depth/2 out-blocks)")
        if embed_dim % num_heads:
            raise ValueError(f"UViT: embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.augment_dim, self.s_embedding, self.patch_size = 0, s_embedding, patch_size
        num_patches = (img_resolution // patch_size) ** 2
        self.extras = 1 + (1 if label_dim else 0)                                   # time token (+ label token)

        self.patch_embed = PatchEmbed(patch_size, img_channels, embed_dim)
        self.time_embed = _time_mlp(embed_dim) if mlp_time_embed else nn.Identity()
        self.label_emb = nn.Embedding(label_dim, embed_dim) if label_dim else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        self.in_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2)])
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True)
                                         for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * img_channels)
        self.final_layer = nn.Conv2d(img_channels, img_channels, 3, padding=1)
        if s_embedding:
            self.time_embed_s = _time_mlp(embed_dim) if mlp_time_embed else nn.Identity()
            self.pos_embed_s = nn.Parameter(torch.zeros(1, 1, embed_dim))

        # U-ViT's init: trunc-normal(0.02) for Linear weights and position embeddings, zero biases, LayerNorm 1/0;
        # the convolutions and the label embedding keep PyTorch's defaults.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if s_embedding:
            nn.init.trunc_normal_(self.pos_embed_s, std=0.02)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                noise_labels_s: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        class_labels, noise_labels_s = check_inputs(self, x, noise_labels, class_labels, noise_labels_s,
                                                    augment_labels)
        dtype, D = x.dtype, self.pos_embed.shape[-1]
        tokens = [self.time_embed(timestep_embedding(TIME_SCALE * noise_labels, D))[:, None]]      # [B, 1, D]
        if self.label_emb is not None:
            # one-hot @ table = the embedding of that class; an all-zero "no class" one-hot gives a zero token.
            tokens.insert(0, (class_labels.to(self.label_emb.weight.dtype) @ self.label_emb.weight)[:, None])
        h = torch.cat([*tokens, self.patch_embed(x)], dim=1) + self.pos_embed          # [B, extras + L, D]
        if self.s_embedding:
            s_token = self.time_embed_s(timestep_embedding(TIME_SCALE * noise_labels_s, D))[:, None]
            h = torch.cat([s_token + self.pos_embed_s, h], dim=1)                     # [B, 1 + extras + L, D]

        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())                                               # LIFO: the long skips

        h = self.decoder_pred(self.norm(h))                                         # [B, N, p²·C]
        h = h[:, self.extras + (1 if self.s_embedding else 0):]                    # drop the non-patch tokens
        h = einops.rearrange(h, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=self.img_resolution // self.patch_size,
                             p1=self.patch_size, p2=self.patch_size)
        return self.final_layer(h).to(dtype)


# Named configurations: constructor kwargs. The paper's CIFAR-10 U-ViT-S/2 (its public config: 13 blocks of width
# 512, 8 heads, patch 2, 44,255,328 parameters); the tiny ones are ours, for 2 CPU cores.
UVIT_CONFIGS = {
    "cifar10-uvit-s2": dict(img_resolution=32, img_channels=3, patch_size=2, embed_dim=512, depth=12, num_heads=8,
                            mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False),
    "tiny-uvit-8": dict(img_resolution=8, img_channels=3, patch_size=2, embed_dim=128, depth=4, num_heads=4),
    "tiny-uvit-16": dict(img_resolution=16, img_channels=3, patch_size=2, embed_dim=128, depth=6, num_heads=4),
    "tiny-uvit-32": dict(img_resolution=32, img_channels=3, patch_size=2, embed_dim=128, depth=6, num_heads=4),
    "tiny-uvit-cond-32": dict(img_resolution=32, img_channels=3, label_dim=10, patch_size=2, embed_dim=128, depth=6,
                              num_heads=4, mlp_time_embed=True),
}
