"""LoRA on the selected heads only.

PEFT has no per-head LoRA (its issue #2293), so the update is restricted by masking: for
``q_proj`` (and ``k_proj``/``v_proj``) the rows of ``lora_B`` outside the heads' output slices,
for ``o_proj`` the columns of ``lora_A`` outside the heads' input slices, are zero and get zero
gradient. Then ``B @ A`` is exactly zero there and every other head's weights are bit-identical
after merging. ``k_proj``/``v_proj`` rows belong to KV heads, which grouped-query attention shares
between query heads: targeting them touches every query head of a selected head's group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.heads import HeadSet

from .apply import head_slices

TARGETS = ("q", "k", "v", "o")


def check_rank(ad, heads, targets, rank: int):
    """A LoRA's rank is at most the width of the slice it may change (the selected heads' rows or
    columns of a projection, in the layer with the fewest): a larger rank adds nothing the update
    can hold, only parameters (rank 100000 on a 16-wide head wrote 410 MB)."""
    widths = {}
    for layer in heads.layers():
        n_q = len(heads.heads_in(layer))
        n_kv = len({h // ad.group_size() for h in heads.heads_in(layer)})
        for t in targets:
            widths[(layer, t)] = (n_q if t in ("q", "o") else n_kv) * ad.head_dim
    if widths:
        (layer, t), w = min(widths.items(), key=lambda x: x[1])
        if rank > w:
            raise HeadsteerError(f"--rank {rank} is more than the {w} {'columns' if t == 'o' else 'rows'} of {t}_proj that the "
                                 f"LoRA may change in layer {layer} (its selected heads x head_dim {ad.head_dim}): use "
                                 f"--rank {w} or less")


def train_head_lora(model, processor, heads: HeadSet, dataset, steps: int = 300, targets=("q", "o"), rank: int = 4,
                    lr: float = 2e-3, batch_size: int = 16, seed: int = 0, adapter_dir=None, progress=None):
    """Train LoRA restricted to ``heads`` on ``dataset`` (loss on the answer's first token).
    Returns (tensors, params) for an ``EditManifest(kind="lora")``; the model is left unchanged."""
    ad = get_adapter(model, processor)
    heads = heads.resolve(ad.num_layers, ad.num_heads)
    bad = set(targets) - set(TARGETS)
    if bad or not targets:
        raise HeadsteerError(f"LoRA targets must be among {', '.join(TARGETS)}; got {sorted(bad) or 'none'}")
    check_rank(ad, heads, targets, rank)
    names = {id(m): n for n, m in model.named_modules()}
    modules = {}
    for l in heads.layers():
        for t in targets:
            lin = getattr(ad.attention[l], f"{t}_proj", None)
            if lin is None:
                raise HeadsteerError(f"layer {l} has no {t}_proj to adapt")
            modules[names[id(lin)]] = (l, t)
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(modules), bias="none")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    pm = dict(peft_model.named_modules())
    masks = []
    for n, (l, t) in modules.items():
        mod = pm[f"base_model.model.{n}"]
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        if t == "o":
            keep = head_slices(ad, heads, l, "o", A.shape[1])
            param, m = A, keep[None, :].to(A.dtype)
        else:
            keep = head_slices(ad, heads, l, t, B.shape[0])
            param, m = B, keep[:, None].to(B.dtype)
        with torch.no_grad():
            param.mul_(m)
        param.register_hook(lambda g, m=m: g * m)
        masks.append((n, mod))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    answer_ids = {}
    peft_model.train()
    losses = []
    try:
        for step in range(steps):
            idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
            rows = [dataset[i] for i in idx]
            inputs = ad.encode([r["image"] for r in rows], [r["question"] for r in rows])
            tgt = torch.tensor([answer_ids.setdefault(r["answer"], ad.answer_token_id(r["answer"], r["question"])) for r in rows])
            logits = peft_model(**inputs, logits_to_keep=1).logits[:, -1].float()
            loss = F.cross_entropy(logits, tgt.to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if progress is not None:
                progress(1)
        if adapter_dir is not None:
            peft_model.save_pretrained(str(adapter_dir))
        tensors = {}
        scaling = None
        for n, mod in masks:
            tensors[f"{n}.lora_A"] = mod.lora_A["default"].weight.detach().cpu().clone()
            tensors[f"{n}.lora_B"] = mod.lora_B["default"].weight.detach().cpu().clone()
            scaling = float(mod.scaling["default"])
    finally:
        peft_model.unload()  # takes the LoRA layers out again; base weights were never touched
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        model.train(was_training)
    params_out = {"rank": rank, "targets": list(targets), "steps": steps, "lr": lr, "batch_size": batch_size,
                  "scaling": scaling, "seed": seed, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    if adapter_dir is not None:
        params_out["adapter_dir"] = str(adapter_dir)
    return tensors, params_out
