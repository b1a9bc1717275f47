"""Masks per second of head-ablation paths, measured in one run on one model:

- naive: a full forward (vision tower included) per mask — the reference path;
- peer: a batched full forward with the same ablation (what a generic intervention library does);
- plain suffix: transformers' own forward of the same suffix tokens, no prefix, no intervention
  (the speed of the model's own forward: the bound the fast path aims at);
- fast: headsteer's shared-prefix engine;
with the fast path's share of the FLOP bound and peak GPU memory on a GPU. ``--scorers`` instead times
the seconds per image to rank every head by each scorer of ``headsteer attribute --scorer`` (COAR at
256 and 1,000 masks, atp, atp*, grad-coar), the shared prefix included, with each one's peak memory.

    python scripts/bench_attribution.py                          # default model, CPU, fp32
    python scripts/bench_attribution.py --scorers                # seconds per image of each scorer
    python scripts/bench_attribution.py --scorers --llava7b-shape --layers 2 --device cpu --dtype fp32
    python scripts/bench_attribution.py --model /tmp/llava7b --device cuda --dtype bf16
    python scripts/bench_attribution.py --llava7b-shape          # in-memory random LLaVA-1.5-7B shape (GPU)
"""
from __future__ import annotations

import argparse
import os
import re
import threading
import time

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import numpy as np
import torch

import headsteer
from headsteer import fastpath
from headsteer.adapters import get_adapter
from headsteer.ask import default_image
from headsteer.attribution.engine import AblationRunner, naive_logits
from headsteer.attribution.gradient import Readout, score_heads
from headsteer.attribution.regression import fit, sample_masks, statistic
from headsteer.baseline import ZeroBaseline, make_baseline
from headsteer.intervention import intervene

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def suffix_flops(model, ad, P, s) -> float:
    """FLOPs per mask of the suffix-only forward: projections, MLP, attention over P+s keys, and
    the LM head at the last position."""
    tc = model.config.get_text_config()
    d, I, V = tc.hidden_size, tc.intermediate_size, tc.vocab_size
    qo = 2 * d * ad.num_heads * ad.head_dim
    kv = 2 * d * ad.num_kv_heads * ad.head_dim
    attn = 2 * 2 * ad.num_heads * ad.head_dim * (P + s)
    per_tok = ad.num_layers * (2 * (qo + kv) + 2 * 3 * d * I + attn)
    return per_tok * s + 2 * d * V


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="'default' or a checkpoint directory")
    ap.add_argument("--llava7b-shape", action="store_true", help="in-memory random LLaVA-1.5-7B-shaped model instead of --model")
    ap.add_argument("--layers", type=int, default=32, help="text layers of --llava7b-shape")
    ap.add_argument("--masks", type=int, default=256)
    ap.add_argument("--naive-masks", type=int, default=32, help="masks timed on the naive path (its cost is linear in M)")
    ap.add_argument("--peer-batch", type=int, default=32, help="batch of the batched full forward (peer)")
    ap.add_argument("--chunk", type=int, default=None, help="fast-path masks per batch (default: from free memory)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--question", default="what shape is in the image?",
                    help="the prompt's question (a longer one gives a longer text suffix)")
    ap.add_argument("--profile", action="store_true", help="also print the top GPU kernels of one fast-path batch")
    ap.add_argument("--compile", action="store_true",
                    help="then also time the plain and the fast path with the language model's MLPs and norms compiled "
                         "(torch.compile; attention stays headsteer's)")
    ap.add_argument("--baseline", default=None, help="mean / blank / zero (default: mean for the default model, else zero)")
    ap.add_argument("--scorers", action="store_true", help="seconds per image of each attribute --scorer instead")
    ap.add_argument("--coar-masks", default="256,1000", help="--scorers: COAR's masks per image, comma-separated")
    ap.add_argument("--grad-masks", type=int, default=32, help="--scorers: grad-coar's gradient masks per image")
    ap.add_argument("--reps", type=int, default=5, help="--scorers: timed repetitions of each, round robin (after a warm-up)")
    args = ap.parse_args()
    dev = args.device
    dtype = DTYPES[args.dtype or ("bf16" if dev.startswith("cuda") else "fp32")]
    if not dev.startswith("cuda"):
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if args.llava7b_shape:
        model, inputs = llava7b_shaped(dev, dtype, args.layers)
        ad = get_adapter(model)
        name = f"random LLaVA-1.5-7B-shaped in memory ({args.layers} layers)"
        base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    else:
        model, proc = headsteer.load(args.model, device=dev, dtype=dtype)
        ad = get_adapter(model, proc)
        inputs = ad.encode([default_image()], [args.question])
        name = f"{args.model} ({ad.model_type})"
        kind = args.baseline or ("mean" if args.model == "default" else "zero")
        base = make_baseline(model, proc, kind) if kind != "zero" else ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    if args.scorers:
        return bench_scorers(model, ad, inputs, base, name, dev, dtype, args)
    masks = sample_masks(args.masks, ad.num_layers, ad.num_heads, 0.1, seed=0)
    T = inputs["input_ids"].shape[1]
    runner = AblationRunner(model, None, base, fast=True, chunk=args.chunk).prepare(inputs=inputs)
    P, s = runner.prefix_length, T - runner.prefix_length
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_naive = timed(lambda: naive_logits(model, None, inputs, masks[: args.naive_masks], base), dev) / args.naive_masks

    def peer():
        B = args.peer_batch
        batch = {k: (v.expand(B, *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1 else v) for k, v in inputs.items()}
        with torch.no_grad(), intervene(model, ablate=masks[:B], baseline=base):
            model(**batch, logits_to_keep=1)

    t_peer = timed(peer, dev) / args.peer_batch if "image_grid_thw" not in inputs else float("nan")

    def plain():
        with torch.no_grad():
            for i in range(0, args.masks, runner.batch_size):
                model(input_ids=runner.suffix_ids.expand(min(runner.batch_size, args.masks - i), -1), logits_to_keep=1)

    t_plain = timed(plain, dev) / args.masks
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_fast = timed(lambda: runner(masks), dev) / args.masks
    answer = int(inputs["input_ids"][0, -1])  # any token: the statistic's cost does not depend on it

    def stat(lg):
        return statistic(lg, answer, "margin", list(range(16)))

    t_stat = timed(lambda: runner(masks, stat), dev) / args.masks
    # the same engine with every attention block in headsteer's own fp32 arithmetic
    unfused = AblationRunner(model, None, base, fast=True, chunk=args.chunk, fused=False).prepare(inputs=inputs)
    t_unfused = timed(lambda: unfused(masks, stat), dev) / args.masks
    probe = torch.zeros(1, 1, ad.head_dim, device=dev, dtype=dtype)
    kernel = "flash attention" if fastpath.flash_ok(probe) else "none for this device/dtype: fp32 blocks"
    print(f"model: {name}; {ad.num_layers} layers x {ad.num_heads} heads ({ad.num_kv_heads} KV); device {dev}, {dtype}; "
          f"prompt {T} tokens = prefix {P} (up to the last image token) + suffix {s}")
    print(f"naive:        {1 / t_naive:10.1f} masks/s  (full forward per mask, {args.naive_masks} masks timed)")
    print(f"peer:         {1 / t_peer:10.1f} masks/s  (batched full forward with the same ablation, batch {args.peer_batch})")
    print(f"plain suffix: {1 / t_plain:10.1f} masks/s  (the model's own forward of the {s} suffix tokens, no prefix, batch {runner.batch_size})")
    print(f"fast:         {1 / t_fast:10.1f} masks/s  ({args.masks} masks, chunk {runner.batch_size}, prefix computed once; "
          f"every vocabulary logit to the host)")
    print(f"fast, as attribute runs it: {1 / t_stat:10.1f} masks/s  (the statistic computed on the device; "
          f"fused kernel for the prefix blocks: {kernel})")
    print(f"fast, no fused kernel:      {1 / t_unfused:10.1f} masks/s  (every attention block in fp32 matmuls and "
          f"softmax passes; fused is {t_unfused / t_stat:.2f}x of it)")
    print(f"fast / naive {t_naive / t_fast:.1f}x; fast / peer {t_peer / t_fast:.1f}x; fast / plain suffix {t_plain / t_fast:.2f} "
          f"({t_plain / t_stat:.2f} as attribute runs it)")
    if dev.startswith("cuda"):
        flops = suffix_flops(model, ad, P, s)
        peak = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
        print(f"FLOP bound: {flops / 1e9:.1f} GFLOP/mask -> {peak / flops:.0f} masks/s at {peak / 1e12:.0f} TFLOP/s nominal; "
              f"fast runs {flops / t_stat / 1e12:.1f} TFLOP/s ({(1 / t_stat) / (peak / flops):.1%} of the bound) as attribute runs it")
        print(f"peak GPU memory (fast path): {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB; "
              f"GPU: {torch.cuda.get_device_name()}")
    if args.profile:
        profile(runner, masks[: runner.batch_size], dev, stat)
    if args.compile:
        t0 = time.perf_counter()
        n = compile_dense(ad)
        plain()
        runner(masks[: runner.batch_size])
        sync(dev)
        t_compile = time.perf_counter() - t0
        t_plain_c = timed(plain, dev) / args.masks
        t_stat_c = timed(lambda: runner(masks, stat), dev) / args.masks
        print(f"compiled ({n} MLP/norm modules, {t_compile:.0f} s to compile): plain suffix {1 / t_plain_c:.1f} masks/s, "
              f"fast as attribute runs it {1 / t_stat_c:.1f} masks/s ({t_plain / t_stat_c:.2f} of the uncompiled plain "
              f"suffix forward, {t_plain_c / t_stat_c:.2f} of the compiled one)")


class PeakMemory:
    """Peak memory of a block beyond what was held when it started: on a GPU the allocator's peak; on the
    CPU the process's resident set, sampled every 2 ms by a thread (torch's CPU allocator keeps no peak)."""

    def __init__(self, dev):
        self.gpu = str(dev).startswith("cuda")
        self.peak = 0.0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.top = self.rss()
            self.running = True

            def sample():
                while self.running:
                    self.top = max(self.top, self.rss())
                    time.sleep(0.002)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.gpu:
            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.start) / 2 ** 30
        else:
            self.running = False
            self.thread.join()
            self.peak = (max(self.top, self.rss()) - self.start) / 2 ** 30
        return False


def bench_scorers(model, ad, inputs, base, name, dev, dtype, args):
    """Seconds per image to rank every head, by scorer, the shared prefix (vision tower included) counted
    in each: what `headsteer attribute --scorer X --no-compare` spends per image."""
    L, H = ad.num_layers, ad.num_heads
    # any answer token and 16 candidate answers, as in the masks/s figures: the cost does not depend on them
    stat = Readout(int(inputs["input_ids"][0, -1]), "margin", range(16))

    def coar(m):
        def run():
            runner = AblationRunner(model, None, base).prepare(inputs=inputs)
            masks = sample_masks(m, L, H, 0.1, seed=0)
            fit(masks, runner(masks, stat))
        return run

    def grad(scorer):
        def run():
            runner = AblationRunner(model, None, base).prepare(inputs=inputs)
            score_heads(runner, scorer, stat, 0.1, args.grad_masks)
        return run

    prep = AblationRunner(model, None, base).prepare(inputs=inputs)
    jobs = [("prefix only (prepare)", lambda: AblationRunner(model, None, base).prepare(inputs=inputs))]
    jobs += [(f"coar, {m} masks", coar(m)) for m in (int(x) for x in args.coar_masks.split(","))]
    jobs += [("atp (1 forward + backward)", grad("atp")),
             (f"atp* ({len(ad.language_model.layers) + 1} rows: QK fix + GradDrop)", grad("atp*")),
             (f"grad-coar, {args.grad_masks} masks", grad("grad-coar"))]
    T = inputs["input_ids"].shape[1]
    print(f"model: {name}; {L} layers x {H} heads ({ad.num_kv_heads} KV); device {dev}, {dtype}; prompt {T} tokens = "
          f"prefix {prep.prefix_length} + suffix {T - prep.prefix_length}; path {prep.path}")
    del prep
    times, peaks = {label: [] for label, _ in jobs}, {}
    for label, fn in jobs:  # warm-up, and each one's peak memory on its own
        with PeakMemory(dev) as mem:
            fn()
            sync(dev)
        peaks[label] = mem
    for _ in range(args.reps):  # round robin, so that a shared machine's load changes hit every scorer alike
        for label, fn in jobs:
            t = time.perf_counter()
            fn()
            sync(dev)
            times[label].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for label, _ in jobs:
        mem = peaks[label]
        print(f"{label:<42} {med[label]:9.3f} s per image (median of {args.reps}; min {min(times[label]):.3f})   "
              f"peak {'GPU' if mem.gpu else 'RSS'} +{mem.peak:.3f} GiB", flush=True)
    ref = [k for k in med if k.startswith("coar")]
    for k in med:
        if not k.startswith(("coar", "prefix")):
            print(f"{k.split(' (')[0]:<12} is " + ", ".join(f"{med[r] / med[k]:.1f}x faster than {r}" for r in ref))


def compile_dense(ad) -> int:
    """Compiles, in place, the language model's modules that headsteer never intervenes in and that
    are mostly elementwise passes in eager mode — MLPs and norms outside attention — so that each
    becomes a few fused kernels. Experimental: timed here only."""
    skip = [name + "." for name, m in ad.language_model.named_modules() if any(m is a for a in ad.attention)]
    done = []
    for name, m in ad.language_model.named_modules():
        if re.search(r"(MLP|RMSNorm|LayerNorm)$", type(m).__name__) and not any(name.startswith(p) for p in skip + done):
            m.compile(dynamic=True)
            done.append(name + ".")
    return len(done)


def profile(runner, masks, dev, reduce):
    """Where one fast-path batch spends its device time, by kernel (the first thing to read when the
    fast path falls short of the plain forward)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    runner(masks, reduce)
    sync(dev)
    with torch.profiler.profile(activities=acts) as prof:
        runner(masks, reduce)
        sync(dev)
    key = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
    print(f"profile of one fast-path batch of {len(masks)} masks:")
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
