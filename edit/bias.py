"""Steering as plain weights: a vector added to a head's output before ``o_proj`` is ``o_proj(x + a) =
W x + W a``, an ``o_proj`` bias (ITI baked its steering this way). A text backbone takes that bias only
where a config flag gives its attention an ``o_proj`` bias; the flag usually gives q/k/v biases too,
which are then zero. Whether a model's attention class does is found by building one of its attention
layers from the flagged config (on the meta device: no memory), not from a list of families."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

FLAGS = ("attention_bias",)  # config flags that give an attention layer's projections biases


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_children() if isinstance(m, nn.Linear)}


def o_proj_bias_flag(ad) -> tuple[str, list[str]] | None:
    """(flag, the projections that gain a bias with it) where setting ``flag`` on the text config gives
    this model's attention layers an output-projection bias; None where no flag does."""
    attn = ad.attention[0]
    out_name = next(n for n, m in _linears(attn).items() if m is ad.out_proj(0))
    cfg = ad.text_config
    for flag in FLAGS:
        if not hasattr(cfg, flag):
            continue
        flagged = copy.deepcopy(cfg)
        setattr(flagged, flag, True)
        try:
            with torch.device("meta"):
                probe = type(attn)(flagged, getattr(attn, "layer_idx", 0))
        except Exception:  # an attention class built otherwise: no bias through this flag
            continue
        now, then = _linears(attn), _linears(probe)
        if out_name in then and then[out_name].bias is not None:
            gained = [n for n, lin in then.items() if lin.bias is not None and n in now and now[n].bias is None]
            if set(then) == set(now):
                return flag, gained
    return None


@contextlib.contextmanager
def steering_bias(ad, add: torch.Tensor):
    """The model's weights with ``add`` ([L, H, head_dim], what each head's output gains) as its
    attention layers' o_proj biases and the flag set in the text config, so that ``save_pretrained``
    writes a checkpoint plain transformers loads with the steering in it. Restored on exit."""
    flag, gained = o_proj_bias_flag(ad)
    cfg = ad.text_config
    old = getattr(cfg, flag)
    created, saved = [], []
    try:
        setattr(cfg, flag, True)
        with torch.no_grad():
            for l, attn in enumerate(ad.attention):
                lins = _linears(attn)
                for name in gained:
                    lin = lins[name]
                    if lin.bias is None:
                        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
                        created.append(lin)
                o = ad.out_proj(l)
                if o not in created:  # a bias the model already had: put back on exit
                    saved.append((o, o.bias.detach().clone()))
                o.bias.add_((o.weight.float() @ add[l].reshape(-1).to(o.weight.device)).to(o.bias.dtype))
        yield
    finally:
        setattr(cfg, flag, old)
        with torch.no_grad():
            for o, b in saved:
                o.bias.copy_(b)
        for lin in created:
            lin.bias = None
