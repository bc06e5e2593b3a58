"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3, for rectified flow.

Reads top to bottom: embeddings, attention, conditioning, blocks, the model. Each architecture
ablation is one `ModelConfig` field, read in exactly one place below:
  sdpa_layout -> attention()         pos_emb -> Positions         time_cond -> make_conditioning()
  block       -> make_block()        qk_norm -> make_qk_norm()
and one memory switch that leaves the function alone: activation_checkpointing -> MMDiT.forward().
Shapes: B batch, C channels, N image tokens, L text tokens, S a sequence, W width, H heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ROTARY, ModelConfig

TIME_FEATURES = 256  # sinusoidal features of t before the timestep MLP (DiT, SD3)


# ---- embeddings ---------------------------------------------------------------------------------


TIME_SCALES = {"1000t": 1000.0, "t": 1.0}  # model.timestep_input: what the sinusoids see


def timestep_embedding(
    t: torch.Tensor, scale: float = 1000.0, dim: int = TIME_FEATURES, max_period: float = 10000.0
) -> torch.Tensor:
    """(B,) t in [0, 1] -> (B, dim) sinusoidal features of scale·t (SD3: 1000·t; at 1·t the fastest
    frequency turns by one radian over the whole of training's t range, so times are barely told apart)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(P,) positions -> (P, dim) fixed sin-cos features (Transformer, MAE, DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def grid_positions(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each of the grid × grid image tokens, row-major: 2 × (N,)."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return rows.flatten(), cols.flatten()


ROPE_BASE = 10000.0
TIME_AWARE_SWITCH = 0.5  # rope_scaling=time_aware: interpolated positions at t >= this (layout), NTK below


def axial_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = ROPE_BASE):
    """Rotation angles of axial 2-D RoPE at (row, col) positions: half of each head's channel pairs turn
    with the row, half with the column. Returns cos and sin, (P, 1, D/2) each (broadcast over heads)."""
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    angles = torch.cat([rows.double()[:, None] * freqs, cols.double()[:, None] * freqs], dim=1)  # (P, D/2)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # (B, P, H, D)
    """Each channel pair (2i, 2i+1) of each token turned by its angle: a rotation, so norms are kept."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, P, H, D/2) each
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Rotary:
    """The rotations of one forward pass: image tokens' queries and keys, and text tokens' (msrope only)."""

    def __init__(self, image=None, text=None):
        self.image_angles, self.text_angles = image, text

    def image(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, H, D)
        return x if self.image_angles is None else rotate_pairs(x, *self.image_angles)

    def text(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H, D)
        return x if self.text_angles is None else rotate_pairs(x, *self.text_angles)


class Positions(nn.Module):
    """`model.pos_emb`: where tokens learn their place, on the grid the input has (the trained one, or
    another at sampling time).

    learned: a trained table added to the image tokens (the write-up's fix; resized bicubically for
    another grid); sincos: a fixed 2-D table; rope2d: no table, image queries and keys rotate by
    (row, column) in every attention (from the corner, or the centre with model.rope_origin); msrope
    (Qwen-Image's MSRoPE): image tokens rotate by (row, column) measured from the image centre, and text
    tokens too, on the diagonal just past the image (token i at (g/2 + i, g/2 + i)), so text positions
    act as 1-D RoPE and never coincide with image ones; none: no position at all.

    On another grid than the trained one, `scaling` (sample.rope_scaling, set by the evaluator) says what
    the rotations do there: `none` extrapolates; `interpolate` shrinks positions by g/G into the trained
    range (position interpolation); `ntk` keeps positions and raises the base by s^(q/(q-1)), s = G/g,
    q frequencies per axis, so the slowest rotation is interpolated and the fastest kept (NTK-aware);
    `time_aware` interpolates at high noise and switches to NTK nearer the data (Lumina-Next).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.width, self.head_dim, self.origin = cfg.pos_emb, cfg.width, cfg.head_dim, cfg.rope_origin
        self.grid = cfg.input_size // cfg.patch_size  # the trained grid
        self.scaling = "none"
        self.cache: dict[tuple, object] = {}  # fixed tables and rotations, per grid, text length and device
        if cfg.pos_emb == "learned":
            self.table = nn.Parameter(torch.randn(1, self.grid**2, cfg.width) * cfg.pos_emb_init_std)

    def add(self, x: torch.Tensor, grid: int) -> torch.Tensor:  # (B, N, W)
        if self.kind == "learned":
            table = self.table
            if grid != self.grid:
                square = table.transpose(1, 2).unflatten(-1, (self.grid, self.grid))  # (1, W, g, g)
                table = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
                table = table.flatten(2).transpose(1, 2)
            return x + table
        if self.kind == "sincos":
            key = ("sincos", grid, x.device, x.dtype)
            if key not in self.cache:
                rows, cols = grid_positions(grid)
                table = torch.cat([sincos_1d(rows, self.width // 2), sincos_1d(cols, self.width // 2)], dim=1)
                self.cache[key] = table.to(x)[None]  # (1, N, W)
            return x + self.cache[key]
        return x

    def rotary(self, grid: int, text_tokens: int, t: torch.Tensor) -> Rotary:
        scaling = self.scaling_at(grid, t)
        key = ("rotary", grid, text_tokens if self.kind == "msrope" else 0, t.device, scaling)
        if key not in self.cache:
            self.cache[key] = self._rotary(grid, text_tokens, t.device, scaling)
        return self.cache[key]

    def scaling_at(self, grid: int, t: torch.Tensor) -> str:
        """The rotary scaling this forward pass uses: `none` on the trained grid; time_aware resolved by t
        (every row of a sampling batch shares it)."""
        if grid == self.grid or self.kind not in ROTARY:
            return "none"
        if self.scaling == "time_aware":
            return "interpolate" if t[0].item() >= TIME_AWARE_SWITCH else "ntk"
        return self.scaling

    def _rotary(self, grid: int, text_tokens: int, device: torch.device, scaling: str) -> Rotary:
        stretch = self.grid / grid if scaling == "interpolate" else 1.0
        quarter = self.head_dim // 4
        base = ROPE_BASE * (grid / self.grid) ** (quarter / max(quarter - 1, 1)) if scaling == "ntk" else ROPE_BASE
        rows, cols = (index.double() for index in grid_positions(grid))
        if self.kind == "rope2d":
            offset = grid // 2 if self.origin == "centre" else 0
            return Rotary(image=self._angles((rows - offset) * stretch, (cols - offset) * stretch, base, device))
        if self.kind == "msrope":
            centre = (grid - 1) / 2
            diagonal = grid / 2 * stretch + torch.arange(text_tokens, dtype=torch.float64)  # just past the image
            return Rotary(
                image=self._angles((rows - centre) * stretch, (cols - centre) * stretch, base, device),
                text=self._angles(diagonal, diagonal, base, device),
            )
        return Rotary()

    def _angles(self, rows: torch.Tensor, cols: torch.Tensor, base: float, device: torch.device):
        return tuple(a.to(device) for a in axial_angles(rows, cols, self.head_dim, base))


# ---- attention ----------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head attention. q (B, Sq, H, D), k and v (B, Sk, H, D), key_mask (B, Sk) True = attend.

    Returns (B, Sq, H·D). `model.sdpa_layout` is read here and nowhere else.
    """
    B, Sq, H, D = q.shape
    if layout == "seq_first":
        # The head-axis bug, reproduced exactly: the (B, S, H, D) view goes to SDPA untransposed. SDPA
        # reads it as (batch, heads, seq, dim), so each token attends across its own heads and never
        # sees another token; with no other token in view, a key mask has nothing to hide.
        return F.scaled_dot_product_attention(q, k, v).reshape(B, Sq, H * D)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Sk)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Sq, D)
    return out.transpose(1, 2).reshape(B, Sq, H * D)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module:
    """`model.qk_norm`: per-head normalisation of queries and keys (SD3.5, Flux) or none."""
    if kind == "layernorm":
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(head_dim, eps=1e-6)
    return nn.Identity()


class QKV(nn.Module):
    """One stream's fused Q/K/V projection, split into heads, queries and keys optionally normalised."""

    def __init__(self, cfg: ModelConfig, outputs: str = "qkv"):
        super().__init__()
        self.num_heads, self.outputs = cfg.num_heads, outputs
        self.proj = nn.Linear(cfg.width, len(outputs) * cfg.width)
        self.norms = nn.ModuleDict({name: make_qk_norm(cfg.qk_norm, cfg.head_dim) for name in outputs if name != "v"})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, S, W) -> each (B, S, H, D)
        parts = self.proj(x).unflatten(-1, (len(self.outputs), self.num_heads, -1)).unbind(2)
        return [self.norms[name](p) if name in self.norms else p for name, p in zip(self.outputs, parts)]


# ---- conditioning -------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift, scale) -> torch.Tensor:
    return x * (1 + scale) + shift


class AdaLNZero(nn.Module):
    """c -> (shift, scale, gate) per site; zero-initialised, so every gated branch starts closed (DiT)."""

    def __init__(self, width: int, sites: int):
        super().__init__()
        self.sites = sites
        self.proj = nn.Linear(width, 3 * sites * width)

    def forward(self, x: torch.Tensor, c: torch.Tensor):  # x (B, S, W), c (B, W)
        chunks = self.proj(F.silu(c))[:, None].chunk(3 * self.sites, dim=-1)  # each (B, 1, W)
        return x, [chunks[3 * i : 3 * i + 3] for i in range(self.sites)]


class AdditiveTime(nn.Module):
    """The write-up's variant: c is added to every token before the block; nothing is modulated or gated."""

    def __init__(self, width: int, sites: int):
        super().__init__()
        self.sites = sites

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        return x + c[:, None], [(0.0, 0.0, 1.0)] * self.sites


def make_conditioning(kind: str, width: int, sites: int) -> nn.Module:
    """`model.time_cond`: how the conditioning vector c (timestep + pooled text) enters a layer."""
    return AdaLNZero(width, sites) if kind == "adaln_zero" else AdditiveTime(width, sites)


# ---- blocks -------------------------------------------------------------------------------------

ATTN, MLP, CROSS = 0, 1, 2  # conditioning sites of a stream


def layer_norm(width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class Stream(nn.Module):
    """One token stream of a block: conditioning, pre-norm and Q/K/V; with `output`, the attention
    output projection and the MLP, each a gated residual branch."""

    def __init__(self, cfg: ModelConfig, sites: int, output: bool = True):
        super().__init__()
        self.cond = make_conditioning(cfg.time_cond, cfg.width, sites)
        self.norm1 = layer_norm(cfg.width)
        self.qkv = QKV(cfg)
        if output:
            hidden = int(cfg.width * cfg.mlp_ratio)
            self.out = nn.Linear(cfg.width, cfg.width)
            self.norm2 = layer_norm(cfg.width)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.width)
            )

    def attention_inputs(self, x: torch.Tensor, c: torch.Tensor):
        x, mods = self.cond(x, c)
        shift, scale, _ = mods[ATTN]
        return x, mods, self.qkv(modulate(self.norm1(x), shift, scale))

    def add_attention(self, x: torch.Tensor, mods, attn: torch.Tensor) -> torch.Tensor:
        return x + mods[ATTN][2] * self.out(attn)

    def add_mlp(self, x: torch.Tensor, mods) -> torch.Tensor:
        shift, scale, gate = mods[MLP]
        return x + gate * self.mlp(modulate(self.norm2(x), shift, scale))


class JointBlock(nn.Module):
    """SD3's joint block: each stream pre-normalises and projects its own Q/K/V, one attention runs over
    the concatenated [image, text] sequence, and each stream takes its slice back for its own residual
    and MLP. The last block's text stream only feeds attention (SD3's context_pre_only)."""

    uses_text_tokens = True

    def __init__(self, cfg: ModelConfig, last: bool):
        super().__init__()
        self.layout = cfg.sdpa_layout
        self.image = Stream(cfg, sites=2)
        self.text = Stream(cfg, sites=1 if last else 2, output=not last)
        self.last = last

    def forward(self, img, ctx, c, text_mask, rotary):  # img (B, N, W), ctx (B, L, W), c (B, W)
        N = img.shape[1]
        img, img_mods, (qi, ki, vi) = self.image.attention_inputs(img, c)
        ctx, ctx_mods, (qt, kt, vt) = self.text.attention_inputs(ctx, c)
        q = torch.cat([rotary.image(qi), rotary.text(qt)], dim=1)  # (B, N + L, H, D)
        k = torch.cat([rotary.image(ki), rotary.text(kt)], dim=1)
        v = torch.cat([vi, vt], dim=1)
        key_mask = torch.cat([text_mask.new_ones(text_mask.shape[0], N), text_mask], dim=1)  # (B, N + L)
        out = attention(q, k, v, self.layout, key_mask)  # (B, N + L, W)
        img = self.image.add_mlp(self.image.add_attention(img, img_mods, out[:, :N]), img_mods)
        if not self.last:
            ctx = self.text.add_mlp(self.text.add_attention(ctx, ctx_mods, out[:, N:]), ctx_mods)
        return img, ctx


class ImageBlock(nn.Module):
    """A DiT block on the image tokens: self-attention and MLP. With `cross`, a gated cross-attention to
    the (fixed) text tokens sits between them (PixArt-α); without it, text reaches the model only
    through the pooled vector in c (DiT's class conditioning)."""

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.layout = cfg.sdpa_layout
        self.uses_text_tokens = cross
        self.image = Stream(cfg, sites=3 if cross else 2)
        if cross:
            self.cross_norm = layer_norm(cfg.width)
            self.cross_q = QKV(cfg, outputs="q")
            self.cross_kv = QKV(cfg, outputs="kv")
            self.cross_out = nn.Linear(cfg.width, cfg.width)

    def forward(self, img, ctx, c, text_mask, rotary):
        img, mods, (q, k, v) = self.image.attention_inputs(img, c)
        img = self.image.add_attention(img, mods, attention(rotary.image(q), rotary.image(k), v, self.layout))
        if self.uses_text_tokens:
            shift, scale, gate = mods[CROSS]
            (q,) = self.cross_q(modulate(self.cross_norm(img), shift, scale))
            k, v = self.cross_kv(ctx)
            img = img + gate * self.cross_out(attention(q, k, v, self.layout, text_mask))
        return self.image.add_mlp(img, mods), ctx


def make_block(cfg: ModelConfig, last: bool) -> nn.Module:
    """`model.block`: joint (SD3 MMDiT), cross (self- then cross-attention, PixArt-α) or adaln_only (DiT)."""
    if cfg.block == "joint":
        return JointBlock(cfg, last)
    return ImageBlock(cfg, cross=cfg.block == "cross")


class FinalLayer(nn.Module):
    """Conditioned norm and a zero-initialised linear map from each token to its patch of the output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cond = make_conditioning(cfg.time_cond, cfg.width, sites=1)
        self.norm = layer_norm(cfg.width)
        self.linear = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, N, p·p·C)
        x, [(shift, scale, _)] = self.cond(x, c)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---- the model ----------------------------------------------------------------------------------


@torch.compiler.disable  # a data-dependent length: a compiled forward breaks its graph here, on purpose
def text_length(text_mask: torch.Tensor) -> int:
    """(B, L) -> tokens up to the last real token of any row (at least 1)."""
    return int(text_mask.any(0).nonzero().max()) + 1 if text_mask.any() else 1


class MMDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, W, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.positions = Positions(cfg)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FEATURES, W), nn.SiLU(), nn.Linear(W, W))
        self.pooled_embed = nn.Sequential(nn.Linear(cfg.text_dim, W), nn.SiLU(), nn.Linear(W, W))
        self.blocks = nn.ModuleList(make_block(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.context_embed = nn.Linear(cfg.text_dim, W) if self.blocks[0].uses_text_tokens else None
        self.final = FinalLayer(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier linears and patch embedding (DiT); adaLN projections and the output layer start at zero,
        so each block starts as the identity and the model's first prediction is 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for module in self.modules():
            if isinstance(module, AdaLNZero):
                nn.init.zeros_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def unpatchify(self, x: torch.Tensor, g: int) -> torch.Tensor:  # (B, g·g, p·p·C) -> (B, C, g·p, g·p)
        B, p, C = x.shape[0], self.cfg.patch_size, self.cfg.in_channels
        x = x.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(B, C, g * p, g * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) noisy latents at time t (B,) in [0, 1] (0 data, 1 noise), H = W any multiple of
        the patch size (the trained input_size, or another at sampling time); text (B, L, D_text);
        text_mask (B, L) True for real tokens; pooled (B, D_text), the masked mean of text if None."""
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if pooled is None:
            weights = text_mask.to(text.dtype)[..., None]  # (B, L, 1)
            pooled = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D_text)
        if self.cfg.text_padding == "attended":  # the bug: every padding token a key, up to text.max_length
            text_mask = torch.ones_like(text_mask)
        length = text_length(text_mask)
        text, text_mask = text[:, :length], text_mask[:, :length]  # padding no row attends to: drop it
        c = self.time_embed(timestep_embedding(t, TIME_SCALES[self.cfg.timestep_input])) + self.pooled_embed(pooled)
        grid = x.shape[-1] // self.cfg.patch_size
        img = self.positions.add(self.patch_embed(x).flatten(2).transpose(1, 2), grid)  # (B, N, W)
        ctx = self.context_embed(text) if self.context_embed is not None else None  # (B, L, W)
        rotary = self.positions.rotary(grid, length, t)
        recompute = self.cfg.activation_checkpointing == "blocks" and torch.is_grad_enabled()
        for block in self.blocks:
            args = (img, ctx, c, text_mask, rotary)
            img, ctx = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        return self.unpatchify(self.final(img, c), grid)
