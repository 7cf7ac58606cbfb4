"""A small residual MLP denoiser backbone for 2D (or any flat) data.

It has the call signature every network in `networks/` shares,

    net(x, noise_labels, class_labels=None, noise_labels_s=None) -> tensor shaped like x

where `x` is the already-preconditioned input c_in·x, `noise_labels` is [B] (EDM's c_noise = ln σ / 4),
`class_labels` is one-hot [B, label_dim] and `noise_labels_s` is CTM's second noise label c_noise(s), accepted
only when the network is built with `s_embedding=True`. Like the image networks it knows nothing of the
algorithms: every c_skip/c_out lives in `algorithms/`.

The s-path follows CTM's design for the UNets (Kim et al., arXiv:2310.02279v3, as in its code): a separate MLP on
the same noise embedding, whose output enters every block through its own affine layer added to the time conditioning.
Those per-block layers are zero-initialised, so a student loaded from a teacher (the s-keys are then the only
missing ones) computes exactly the teacher's function for every s at initialisation.
"""
import math

import torch
from torch import nn


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar noise label, with fixed geometric frequencies."""

    def __init__(self, dim=64, max_period=1e3):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half) * 4 * math.pi)

    def forward(self, c):  # [B] -> [B, dim]
        a = c.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return torch.cat([a.cos(), a.sin()], dim=1)


class Block(nn.Module):
    def __init__(self, hidden, emb, s_embedding):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.affine = nn.Linear(emb, 2 * hidden)
        self.affine_s = nn.Linear(emb, 2 * hidden) if s_embedding else None
        if s_embedding:  # zero-init: at initialisation the s-path adds nothing (module docstring)
            nn.init.zeros_(self.affine_s.weight)
            nn.init.zeros_(self.affine_s.bias)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, h, emb, emb_s):
        cond = self.affine(emb) if emb_s is None else self.affine(emb) + self.affine_s(emb_s)
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h)) + cond))


class MLP(nn.Module):
    def __init__(self, dim=2, hidden=128, num_blocks=4, emb=128, label_dim=0, s_embedding=False):
        super().__init__()
        self.dim, self.label_dim, self.s_embedding = dim, label_dim, s_embedding
        self.img_resolution, self.img_channels = None, dim  # what train.py checks against the data
        self.map_noise = FourierEmbedding(64)
        self.map_layer = nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.map_label = nn.Linear(label_dim, emb, bias=False) if label_dim else None
        self.map_layer_s = (nn.Sequential(nn.Linear(64, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
                            if s_embedding else None)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([Block(hidden, emb, s_embedding) for _ in range(num_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, x, noise_labels, class_labels=None, noise_labels_s=None):
        if noise_labels_s is not None and not self.s_embedding:
            raise ValueError("noise_labels_s given, but this MLP was built without s_embedding=True")
        dtype = self.inp.weight.dtype
        emb = self.map_layer(self.map_noise(noise_labels).to(dtype))                     # [B, emb]
        if self.map_label is not None and class_labels is not None:
            emb = emb + self.map_label(class_labels.to(dtype))
        # Without an s label, CTM's network is queried at s = t (the plain denoiser).
        c_s = noise_labels if noise_labels_s is None else noise_labels_s
        emb_s = self.map_layer_s(self.map_noise(c_s).to(dtype)) if self.s_embedding else None
        h = self.inp(x.to(dtype))                                                      # [B, hidden]
        for block in self.blocks:
            h = block(h, emb, emb_s)
        return self.out(h)
