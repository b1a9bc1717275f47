"""Masks per second of the naive path (a full forward per mask) and the fast path (shared prefix,
batch of masks over the text suffix), measured in one run, and their ratio.

    python scripts/bench_attribution.py                 # default model, CPU
    python scripts/bench_attribution.py --llava7b-shape # random LLaVA-1.5-7B-shaped model (GPU, bf16)
"""
from __future__ import annotations

import argparse
import time

import torch

import headsteer
from headsteer.adapters import get_adapter
from headsteer.attribution.engine import SuffixRunner, naive_logits
from headsteer.attribution.regression import sample_masks
from headsteer.baseline import ZeroBaseline, make_baseline


def sync(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, dev, reps=1):
    fn()  # warm-up
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def llava7b_shaped(device, dtype, layers):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    ids = torch.cat([torch.tensor([1, 3148, 1001, 29901]), torch.full((576,), 32000),
                     torch.randint(100, 30000, (14,)), torch.tensor([319, 1799, 9047, 13566, 29901])])[None].to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 336, 336, device=device, dtype=dtype)}
    return model, inputs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", type=int, default=256)
    ap.add_argument("--naive-masks", type=int, default=32, help="masks timed on the naive path (its cost is linear in M)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--llava7b-shape", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device
    if args.llava7b_shape:
        model, inputs = llava7b_shaped(dev, torch.bfloat16, args.layers)
        ad = get_adapter(model)
        base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
        name = f"random LLaVA-1.5-7B-shaped ({args.layers} layers x 32 heads, 576 image tokens, bf16)"
    else:
        torch.set_num_threads(2)
        model, proc = headsteer.load("default", device=dev)
        ad = get_adapter(model, proc)
        from headsteer.ask import default_image

        inputs = ad.encode([default_image()], ["what shape is in the image?"])
        base = make_baseline(model, proc, "mean")
        name = "default model (easy-VQA LLaVA, 4 layers x 8 heads, 64 image tokens, fp32)"
    masks = sample_masks(args.masks, ad.num_layers, ad.num_heads, 0.1, seed=0).to(dev)
    T = inputs["input_ids"].shape[1]
    runner = SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=args.chunk)
    s = T - runner.P
    t_naive = timed(lambda: naive_logits(model, None, inputs, masks[: args.naive_masks], base), dev) / args.naive_masks
    t_fast = timed(lambda: SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=args.chunk)(masks), dev) / args.masks
    print(f"model: {name}; device {dev}; prompt {T} tokens, suffix {s} tokens")
    print(f"naive: {1 / t_naive:10.1f} masks/s  (full forward per mask, {args.naive_masks} masks timed)")
    print(f"fast:  {1 / t_fast:10.1f} masks/s  ({args.masks} masks, chunk {args.chunk}, prefix computed once per prompt)")
    print(f"ratio: {t_naive / t_fast:10.1f}x")
    if dev.startswith("cuda"):
        tc = model.config.get_text_config()
        d, L, V, I = tc.hidden_size, tc.num_hidden_layers, tc.vocab_size, tc.intermediate_size
        P = runner.P
        per_tok = L * (2 * (4 * d * d + 3 * d * I) + 4 * d * (P + s)) + 2 * d * V / s
        flops = per_tok * s  # per mask
        peak = float(__import__("os").environ.get("PEAK_TFLOPS", "989")) * 1e12
        print(f"FLOP bound of the suffix-only forward: {flops / 1e9:.1f} GFLOP/mask -> {peak / flops:.0f} masks/s at "
              f"{peak / 1e12:.0f} TFLOP/s; measured {flops / t_fast / 1e12:.1f} TFLOP/s ({(1 / t_fast) / (peak / flops):.1%} of bound)")


if __name__ == "__main__":
    main()
