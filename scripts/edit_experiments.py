"""The editing experiments on the default model (issue 4's acceptance numbers), end to end:

1. attribution on easy-VQA shape questions -> top-k heads;
2. accuracy on clean and low-contrast test images for: unedited, top-k scaled x2, top-k image
   attention x(1+alpha), top-k scaled to 0, and random-k scaled to 0 (several seeds);
3. a head-only LoRA on the top-k heads trained on a shifted task, accuracy before/after, and a
   check that every other head's weights are bit-identical after merging.

    python scripts/edit_experiments.py --out runs/experiments
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import numpy as np
import torch

import headsteer
from headsteer import HeadSet
from headsteer.attribution.pipeline import attribute_dataset
from headsteer.attribution.run import Settings
from headsteer.data import load_easy_vqa
from headsteer.edit import EditManifest, apply_edit
from headsteer.edit.lora import train_head_lora
from headsteer.edit.tasks import shifted
from headsteer.eval import evaluate, summary


def acc(model, proc, ds, edit=None, qtypes=None):
    rows = evaluate(model, proc, ds, ("accuracy",), edit=edit, batch_size=64)
    s = summary(rows)["accuracy"]
    return {k: round(v["accuracy"], 4) for k, v in s.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/experiments")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.1, help="attribution: probability that a head is ablated in a mask")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--contrast", default="contrast:0.2")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--lora-task", default="rename:red=green,green=red,blue=yellow,yellow=blue")
    ap.add_argument("--lora-steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, proc = headsteer.load("default")
    ad = headsteer.get_adapter(model, proc)
    res = {"settings": vars(args)}
    t0 = time.time()

    ds_att = load_easy_vqa("test", limit=80, qtypes=("shape",))
    att = attribute_dataset(model, proc, ds_att, Settings(n_images=40, alpha=args.alpha, statistic="logit"), out / "attribution")
    top = HeadSet.parse(",".join(r["head"] for r in att["heads"][: args.top_k]))
    res["attribution"] = {"fit_correlation": att["fit_correlation"], "top_heads": str(top),
                          "heads_needed_80": (att.get("curves") or {}).get("headline")}
    print("attribution", res["attribution"], flush=True)

    # evaluation on test questions not used by the attribution (the attribution used shape questions 0-79)
    clean = load_easy_vqa("test", limit=args.n_test + 2000)
    clean = clean.select(range(2000, min(len(clean), 2000 + args.n_test)))
    degraded = shifted(clean, args.contrast)
    edits = {
        "unedited": None,
        f"scale x2 top{args.top_k}": EditManifest("scale", str(top), {"factor": 2.0}),
        f"attn alpha=1 top{args.top_k}": EditManifest("attn", str(top), {"alpha": 1.0}),
        f"attn alpha=3 top{args.top_k}": EditManifest("attn", str(top), {"alpha": 3.0}),
        f"scale 0 top{args.top_k}": EditManifest("scale", str(top), {"factor": 0.0}),
    }
    rng = np.random.default_rng(0)
    for s in range(args.random_seeds):
        idx = rng.choice(ad.num_layers * ad.num_heads, size=args.top_k, replace=False)
        rh = HeadSet((int(i // ad.num_heads), int(i % ad.num_heads)) for i in idx)
        edits[f"scale 0 random{args.top_k} #{s}"] = EditManifest("scale", str(rh), {"factor": 0.0})
    res["edits"] = {}
    for name, e in edits.items():
        res["edits"][name] = {"heads": e.heads if e else None, "clean": acc(model, proc, clean, e),
                              "degraded": acc(model, proc, degraded, e)}
        print(name, res["edits"][name], flush=True)

    # head-only LoRA on a shifted task
    task = args.lora_task
    train = shifted(load_easy_vqa("train", limit=6000), task)
    test_shift = shifted(clean, task)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    t1 = time.time()
    tensors, params = train_head_lora(model, proc, top, train, steps=args.lora_steps, targets=("q", "o"))
    lora = EditManifest("lora", str(top), params).with_tensors(tensors)
    res["lora"] = {"task": task, "heads": str(top), "train_seconds": round(time.time() - t1, 1), "params": params,
                   "shifted_before": acc(model, proc, test_shift), "shifted_after": acc(model, proc, test_shift, lora),
                   "clean_after": acc(model, proc, clean, lora)}
    with apply_edit(model, lora):
        d = ad.head_dim
        identical = True
        for l in range(ad.num_layers):
            q0 = before_state[f"model.language_model.layers.{l}.self_attn.q_proj.weight"]
            o0 = before_state[f"model.language_model.layers.{l}.self_attn.o_proj.weight"]
            for h in range(ad.num_heads):
                if (l, h) in top:
                    continue
                identical &= torch.equal(ad.attention[l].q_proj.weight[h * d:(h + 1) * d], q0[h * d:(h + 1) * d])
                identical &= torch.equal(ad.out_proj(l).weight[:, h * d:(h + 1) * d], o0[:, h * d:(h + 1) * d])
    res["lora"]["unselected_heads_bit_identical"] = bool(identical)
    print("lora", res["lora"], flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"wrote {out / 'results.json'} in {res['seconds']} s")


if __name__ == "__main__":
    main()
