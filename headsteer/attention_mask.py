"""The model's attention mask as one additive fp32 form, shared by every headsteer attention path."""
from __future__ import annotations

import torch

NEG = -1e30  # finite, so a row whose every key is knocked out gives a uniform row instead of NaN


def additive_mask(module, attention_mask, q_len, k_len, device):
    """The model's mask as an additive fp32 [B|1, 1, q, k] (causal when the model skipped it), or
    None when nothing is masked."""
    if attention_mask is None:
        if getattr(module, "is_causal", True) and q_len > 1:
            qi = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            ki = torch.arange(k_len, device=device)[None, :]
            return torch.where(ki <= qi, 0.0, NEG)[None, None]
        return None
    m = attention_mask[:, :, :, :k_len]
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, NEG)
    return m.float().clamp(min=NEG)
