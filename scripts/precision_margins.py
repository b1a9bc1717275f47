"""How much of the precision contract's budget each path uses (tests/test_precision.py asserts it is
at most 1): the fast path with its fused kernel and without, and the naive path, in bf16 and fp16 on
the default model and in bf16 on tiny models of several families.

    python scripts/precision_margins.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import torch

import headsteer
from headsteer import get_adapter
from headsteer.ask import default_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_precision import check_contract  # noqa: E402  (the tests' own reference; tests/ is not a package)
from tiny_models import tiny  # noqa: E402

FAMILIES = ["llava", "qwen2_5_vl", "gemma3", "mistral3", "llama4", "qwen3_5", "lfm2_vl"]


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    model, proc = headsteer.load()
    inputs = get_adapter(model, proc).encode([default_image()], ["what shape is in the image?"])
    cases = [("default", torch.bfloat16, model, inputs), ("default", torch.float16, model, inputs)]
    cases += [(f, torch.bfloat16, *tiny(f, batch=1)) for f in FAMILIES]
    print(f"{'model':<12} {'dtype':<9} {'fast (fused)':>12} {'fast (unfused)':>14} {'naive':>7}   share of the budget 1.5 x ref + 1e-3")
    for name, dtype, m, i in cases:
        errs, _, budget = check_contract(m, i, dtype)
        print(f"{name:<12} {str(dtype)[6:]:<9} {errs['fast'] / budget:12.3f} {errs['fast, unfused'] / budget:14.3f} "
              f"{errs['naive'] / budget:7.3f}")


if __name__ == "__main__":
    main()
