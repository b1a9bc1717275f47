"""What the engine's self-check (headsteer/selfcheck.py) costs, measured in one run:

- on the default model: the default ``headsteer attribute`` run (40 images + 40 held out, 256 masks)
  with its self-check, the check's seconds (run.json) and its share of the run;
- on the LLaVA-1.5-7B shape (random weights, ``--layers`` text layers, in memory): the check alone
  (identity, fast == naive on 4 masks), and the forwards it is made of, so it can be projected to
  the full depth and to a GPU from the benchmark's rates.

    python scripts/bench_selfcheck.py                         # default model, then the 7B shape at 2 layers (CPU)
    python scripts/bench_selfcheck.py --skip-default --device cuda --dtype bf16 --layers 32
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import torch
from bench_attribution import DTYPES, llava7b_shaped

import headsteer
from headsteer.attribution.engine import AblationRunner
from headsteer.attribution.pipeline import attribute_dataset
from headsteer.attribution.run import Settings
from headsteer.baseline import ZeroBaseline
from headsteer.data import load_data
from headsteer.selfcheck import run_checks


def default_run():
    model, proc = headsteer.load("default")
    ds = load_data("easy-vqa", limit=80, qtypes=("shape",))
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        attribute_dataset(model, proc, ds, Settings(), out)
        total = time.perf_counter() - t
        check = json.loads(open(os.path.join(out, "run.json")).read())["self_check"]
    print(f"default model, default attribute run: {total:.1f} s in all; self-check {check['seconds']:.3f} s "
          f"({100 * check['seconds'] / total:.2f}% of the run; identity {check['identity']['seconds']:.3f} s, "
          f"fast == naive {check['fast_vs_naive']['seconds']:.3f} s)")


def shaped_run(device, dtype, layers):
    model, inputs = llava7b_shaped(device, dtype, layers)
    ad = headsteer.get_adapter(model)
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)  # warm-up
        t = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        forward = time.perf_counter() - t
    t = time.perf_counter()  # the prefix the fast check runs on is part of its cost
    runner = AblationRunner(model, None, base).prepare(inputs=inputs)
    check = run_checks(model, None, inputs, fast_check=runner.check_fast_path)
    total = time.perf_counter() - t
    print(f"LLaVA-1.5-7B shape, {layers} text layers, {device} {str(dtype).replace('torch.', '')}: self-check {total:.2f} s "
          f"(identity {check['identity']['seconds']:.2f} s, fast == naive {check['fast_vs_naive']['seconds']:.2f} s, "
          f"passed {check['identity']['passed'] and check['fast_vs_naive']['passed']}); one full forward "
          f"{forward:.2f} s, so the check costs {total / forward:.1f} full forwards")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--layers", type=int, default=2, help="text layers of the 7B shape (0: skip it)")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) before")
    if not args.skip_default:
        default_run()
    if args.layers:
        shaped_run(args.device, DTYPES[args.dtype], args.layers)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) after")


if __name__ == "__main__":
    main()
