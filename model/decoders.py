"""Equivariant heads on the z_eq tokens: the reconstruction decoders and SIE's hypernetwork predictor.

Every decoder takes the z_eq tokens of both views, z1 and z2 (B, N, d_eq) on a g×g grid, and has
    forward(z1, z2) -> (B, K, N, P) predicted patches,   P = p_t² · 3, p_t = target_size / g
    predict(z1, z2) -> (B, K, 3, Ht, Wt) the same as images
    loss(z1, z2, targets (B, K, 3, Ht, Wt), norm_pix) -> scalar pixel MSE (kernels.recon_loss*)
Patches are laid out (row, col, channel) inside each patch, MAE's order.

- `conv`       (path paper) K independent decoders: a linear layer on [z1 | z2] per token, then conv
               layers with x2 upsampling from the token grid to the target size.
- `xattn`      (cross-attention paper) block 1 cross-attention, Q from view-2 tokens, K/V from view-1
               tokens; self-attention blocks after; reconstructs view 2 (K = 1). With mask_ratio > 0,
               that fraction of the queries is a mask token (Siamese MAE): without it the queries
               already hold view 2 and the decoder can be an autoencoder that never reads view 1.
- `xattn-path` (this project) one decoder for all K steps: Q = view-2 tokens + a learned embedding of
               step k, K/V = tokens of both views; the K steps run in one batched pass.
Attention goes through `kernels` (cross-attention: the Triton kernel; self-attention: SDPA), so the
fast paths swap in with the same state_dict.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp, build_sincos2d_pos_embed, trunc_normal_
from torch import nn

import kernels
from kernels.cross_attention import SUPPORTED_D
from model.losses import recon_mse, recon_mse_linear
from pipeline.errors import ConfigError

MIN_CONV_CHANNELS = 16  # the conv decoder halves its width per x2 stage but never goes below this


# (B, K, 3, H, W) -> (B, K, grid², p·p·3): the patch layout is the loss kernels' (one owner)
patchify = kernels.image_patches


def unpatchify(patches: torch.Tensor, grid: int, channels: int = 3) -> torch.Tensor:
    """(B, K, grid², p·p·3) -> (B, K, 3, H, W), the inverse of `patchify`."""
    b, k, _, pp = patches.shape
    p = math.isqrt(pp // channels)
    x = patches.reshape(b, k, grid, grid, p, p, channels)
    return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, k, channels, grid * p, grid * p)


def denormalise_patches(pred: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Map predictions of per-patch normalised targets back to pixel space with the targets' own
    patch statistics (for pictures only). pred, targets (B, K, N, P) -> (B, K, N, P)."""
    mean = targets.mean(dim=-1, keepdim=True)
    std = torch.sqrt(targets.var(dim=-1, unbiased=False, keepdim=True) + eps)
    return pred * std + mean


class Attention(nn.Module):
    """Multi-head attention of x over a context (itself when None): (B, Nq, C), (B, Nk, C) -> (B, Nq, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self_attn = context is None
        context = x if self_attn else context
        (b, nq, c), nk = x.shape, context.shape[1]
        h, d = self.heads, c // self.heads
        q = self.q(x).reshape(b, nq, h, d).transpose(1, 2)  # (B, Nq, C) -> (B, H, Nq, D)
        k, v = self.kv(context).reshape(b, nk, 2, h, d).permute(2, 0, 3, 1, 4)  # 2 × (B, H, Nk, D)
        # Self-attention: SDPA (FlashAttention/cuDNN serve it). Cross-attention: the Triton kernel.
        out = (kernels.self_attention if self_attn else kernels.cross_attention)(q, k, v)  # (B, H, Nq, D)
        return self.proj(out.transpose(1, 2).reshape(b, nq, c))


class Block(nn.Module):
    """Pre-norm transformer block; with cross=True the attention reads a separately normalised context."""

    def __init__(self, dim: int, heads: int, cross: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_context is not None:
            context = self.norm_context(context)
        x = x + self.attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class XAttnDecoder(nn.Module):
    """The cross-attention paper's decoder: reconstructs view 2 (K = 1) from Q = view-2 tokens and
    K/V = view-1 tokens in block 1, then self-attention blocks, a final norm and a pixel head.

    Positions: fixed 2D sin-cos embeddings (a non-persistent buffer: not in the state_dict).
    """

    def __init__(
        self,
        d_in: int,
        width: int,
        depth: int,
        heads: int,
        grid: int,
        patch_dim: int,
        mask_ratio: float = 0.0,
    ):
        super().__init__()
        self.grid, self.steps, self.mask_ratio = grid, 1, mask_ratio
        self.embed = nn.Linear(d_in, width)
        # Siamese-MAE reading of the cross-attention paper: masked query tokens carry no view-2
        # content, so the decoder has to fetch it from view 1's keys/values.
        self.mask_token = nn.Parameter(torch.zeros(width)) if mask_ratio > 0 else None
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)
        pos = build_sincos2d_pos_embed([grid, grid], dim=width)  # (N, width)
        self.register_buffer("pos_embed", pos[None], persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads, cross=(i == 0)) for i in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)

    def queries_and_context(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d_eq) × 2 -> queries (B, K·N, width), context (B, Nk, width)."""
        return self.mask_queries(self.embed(z2)) + self.pos_embed, self.embed(z1) + self.pos_embed

    def mask_queries(self, e2: torch.Tensor) -> torch.Tensor:
        """Replace round(mask_ratio · N) random tokens of each sample by the mask token. (B, N, W)."""
        if self.mask_token is None:
            return e2
        b, n, _ = e2.shape
        n_mask = round(self.mask_ratio * n)
        rank = torch.rand(b, n, device=e2.device).argsort(dim=1).argsort(dim=1)  # a random permutation
        masked = (rank < n_mask)[..., None]  # (B, N, 1)
        return torch.where(masked, self.mask_token.to(e2.dtype), e2)

    def hidden(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The normalised last hidden state: (B, N, d_eq) × 2 -> (B, K, N, width)."""
        x, context = self.queries_and_context(z1, z2)
        b, n = z1.shape[0], z1.shape[1]
        # Cross-attention treats each query independently, so the K steps can share one call as a
        # K·N-long query sequence against the same K/V; self-attention then needs them apart.
        x = self.blocks[0](x, context)  # (B, K·N, width)
        x = x.reshape(b * self.steps, n, -1)  # (B, K·N, width) -> (B·K, N, width)
        for block in self.blocks[1:]:
            x = block(x)
        return self.norm(x).reshape(b, self.steps, n, -1)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(z1, z2))  # (B, K, N, P)

    def predict(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return unpatchify(self(z1, z2), self.grid)  # (B, K, 3, Ht, Wt)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, targets: torch.Tensor, norm_pix: bool) -> torch.Tensor:
        """Pixel MSE against targets (B, K, 3, Ht, Wt), fused with the pixel head (no (B, K, N, P)
        prediction is materialised on the kernel path)."""
        hidden = self.hidden(z1, z2)  # (B, K, N, width); fp32 under autocast (LayerNorm output)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # the head runs where an autocast nn.Linear would
            hidden = hidden.to(torch.get_autocast_dtype(device))
        # targets in image layout: the kernel reads them in place (no patchified copy per step)
        return recon_mse_linear(hidden, self.head.weight, self.head.bias, targets, norm_pix)


class XAttnPathDecoder(XAttnDecoder):
    """One decoder for all K path steps: Q = view-2 tokens + step embedding k, K/V = both views' tokens
    (+ a learned view embedding, since both views share the same positions)."""

    def __init__(self, d_in: int, width: int, depth: int, heads: int, grid: int, patch_dim: int, steps: int):
        super().__init__(d_in, width, depth, heads, grid, patch_dim)
        self.steps = steps
        self.step_embed = nn.Parameter(torch.zeros(steps, width))
        self.view_embed = nn.Parameter(torch.zeros(2, width))
        trunc_normal_(self.step_embed, std=0.02)
        trunc_normal_(self.view_embed, std=0.02)

    def queries_and_context(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e1 = self.embed(z1) + self.pos_embed  # (B, N, width)
        e2 = self.embed(z2) + self.pos_embed
        b, n, w = e2.shape
        queries = e2[:, None] + self.step_embed[None, :, None]  # (B, K, N, width)
        context = torch.cat([e1 + self.view_embed[0], e2 + self.view_embed[1]], dim=1)  # (B, 2N, width)
        return queries.reshape(b, self.steps * n, w), context


class ConvDecoder(nn.Module):
    """The path paper's decoder: K independent branches, each a linear layer on [z1 | z2] per token
    (2·d_eq -> width) then max(4, S) 3×3 conv layers, where S = log2(target_size / grid) and the first
    S of them are preceded by x2 nearest upsampling. Channels halve at each upsampling (floor
    MIN_CONV_CHANNELS); the last conv outputs RGB at the target size.
    E.g. 14×14 tokens -> 224 px: 4 stages, 256 -> 128 -> 64 -> 32 -> 3 channels.
    """

    def __init__(self, d_eq: int, width: int, grid: int, target_size: int, steps: int):
        super().__init__()
        self.grid, self.steps = grid, steps
        n_up = int(math.log2(target_size // grid))
        self.branches = nn.ModuleList([_ConvBranch(2 * d_eq, width, grid, n_up) for _ in range(steps)])

    def predict(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = torch.cat([z1, z2], dim=-1)  # (B, N, 2·d_eq)
        return torch.stack([branch(z) for branch in self.branches], dim=1)  # (B, K, 3, Ht, Wt)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return patchify(self.predict(z1, z2), self.grid)  # (B, K, N, P)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, targets: torch.Tensor, norm_pix: bool) -> torch.Tensor:
        return recon_mse(self(z1, z2), targets, norm_pix)  # targets read in image layout


class _ConvBranch(nn.Module):
    def __init__(self, d_in: int, width: int, grid: int, n_up: int):
        super().__init__()
        self.grid = grid
        self.linear = nn.Linear(d_in, width)
        layers: list[nn.Module] = []
        n_conv = max(4, n_up)
        c_in = width
        for i in range(n_conv):
            last = i == n_conv - 1
            if i < n_up:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            c_out = 3 if last else (max(c_in // 2, MIN_CONV_CHANNELS) if i < n_up else c_in)
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if not last:
                layers.append(nn.GELU())
            c_in = c_out
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z)  # (B, N, d_in) -> (B, N, width)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)  # -> (B, width, g, g)
        return self.convs(x)  # (B, 3, Ht, Wt)


class HyperPredictor(nn.Module):
    """SIE's predictor (the official `ParametrizedNet` with a linear `HyperNet`, no biases, no
    activation): a bias-free linear map of the transformation code t (B, T) to a d × d matrix
    W(t), then pred = W(t) x. x (B, d), t (B, T) -> (B, d). T·d² parameters (d = 128, T = 13: 213 k)."""

    def __init__(self, t_dim: int, d: int):
        super().__init__()
        self.d = d
        self.hypernet = nn.Linear(t_dim, d * d, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = self.hypernet(t).view(-1, self.d, self.d)  # (B, out, in), nn.Linear's layout
        return torch.bmm(x[:, None], w.transpose(1, 2))[:, 0]  # x_i @ W_iᵀ


def build_decoder(name: str, d_eq: int, grid: int, target_size: int, steps: int, cfg) -> nn.Module:
    """The configured reconstruction decoder (cfg: ModelConfig). Sizes are checked by the caller."""
    patch_dim = (target_size // grid) ** 2 * 3
    if name == "conv":
        return ConvDecoder(d_eq, cfg.conv_width, grid, target_size, steps)
    if name == "xattn":
        return XAttnDecoder(
            d_eq, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, grid, patch_dim, cfg.mask_ratio
        )
    if name == "xattn-path":
        return XAttnPathDecoder(d_eq, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, grid, patch_dim, steps)
    raise ConfigError(f"unknown model.decoder {name!r}; choose from conv, xattn, xattn-path")


def check_decoder_config(name: str, cfg, grid: int, target_size: int) -> None:
    """One-line errors for decoder sizes that cannot work (cfg: ModelConfig)."""
    if target_size % grid:
        raise ConfigError(
            f"target size {target_size} is not divisible by the {grid}×{grid} token grid (data.target_size / "
            f"(data.img_size / model.patch_size) must be an integer)"
        )
    if name == "conv":
        ratio = target_size // grid
        if ratio & (ratio - 1):
            raise ConfigError(
                f"the conv decoder upsamples by x2 stages, but target size {target_size} / grid {grid} = {ratio} "
                f"is not a power of 2"
            )
        if cfg.conv_width <= 0:
            raise ConfigError(f"model.conv_width must be > 0, got {cfg.conv_width}")
        return
    if cfg.dec_depth < 1:
        raise ConfigError(
            f"model.dec_depth must be >= 1 (block 1 is the cross-attention), got {cfg.dec_depth}"
        )
    if cfg.dec_heads < 1 or cfg.dec_width % cfg.dec_heads:
        raise ConfigError(
            f"model.dec_width={cfg.dec_width} is not divisible by model.dec_heads={cfg.dec_heads}"
        )
    head_dim = cfg.dec_width // cfg.dec_heads
    if head_dim not in SUPPORTED_D:
        raise ConfigError(
            f"decoder head dim model.dec_width / model.dec_heads = {head_dim} is not one the attention kernel "
            f"takes ({', '.join(map(str, SUPPORTED_D))})"
        )
    if cfg.dec_width % 4:
        raise ConfigError(f"model.dec_width={cfg.dec_width} must be divisible by 4 (2D sin-cos positions)")
