"""Rotary position embedding for MLA's decoupled key/query part, with YaRN context extension.

Layout as in DeepSeek-V3: consecutive pairs (x[2i], x[2i+1]) of the rope slice rotate by the angle
position * inv_freq[i].
"""

from __future__ import annotations

import math

import torch

from .args import MLAModelArgs


def yarn_correction_dim(
    num_rotations: float, dim: int, base: float, original_seq_len: int
) -> float:
    """The frequency index whose wavelength fits ``num_rotations`` times in the original context."""
    return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(args: MLAModelArgs) -> torch.Tensor:
    """Inverse frequencies (rope_head_dim // 2,) in float32; YaRN-interpolated when rope_factor > 1.

    YaRN keeps high frequencies (more than beta_fast rotations over the original context) as they are,
    divides low frequencies (fewer than beta_slow rotations) by rope_factor, and ramps linearly between.
    """
    dim, base = args.rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if args.yarn_enabled:
        low = max(
            math.floor(yarn_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0
        )
        high = min(
            math.ceil(yarn_correction_dim(args.beta_slow, dim, base, args.original_seq_len)),
            dim - 1,
        )
        ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
        keep = 1.0 - ramp.clamp(0.0, 1.0)  # 1 = unchanged (fast), 0 = fully interpolated (slow)
        inv_freq = inv_freq / args.rope_factor * (1.0 - keep) + inv_freq * keep
    return inv_freq.float()


def rope_cos_sin(args: MLAModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """(max_seq_len, rope_head_dim) float32 table: cos of every angle, then sin."""
    inv_freq = rope_inv_freq(args).to(device)
    angles = torch.outer(
        torch.arange(args.max_seq_len, device=device, dtype=torch.float32), inv_freq
    )
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rope(
    x: torch.Tensor, rope_cache: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate x (batch, seq, heads, rope_dim) by the angles of ``positions`` (seq,) or (batch, seq);
    positions 0..seq-1 when None. Computed in float32, returned in x's dtype."""
    seq_len = x.shape[1]
    table = rope_cache[:seq_len] if positions is None else rope_cache[positions]
    if table.dim() == 2:
        table = table.unsqueeze(0)
    cos, sin = table.unsqueeze(2).chunk(2, dim=-1)  # (batch|1, seq, 1, rope_dim // 2) each
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
