"""The GPU check: every command on a random LLaVA-1.5-7B-shaped checkpoint (and a Qwen2.5-VL-7B
shape where torchvision is installed) and on the default model, with --device cuda --dtype bf16;
wall time and peak GPU memory of each; the attribution benchmark; and the projected time of a
paper-scale attribution (1,000 images x 1,000 masks). Run through scripts/gpu_check.sh.

    python scripts/gpu_check.py --work /tmp/hs                  # on a GPU (about 8 minutes on an H100/H200)
    python scripts/gpu_check.py --work /tmp/hs --device cpu --small --dtype fp32   # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import torch
from click.testing import CliRunner

import headsteer
from headsteer.ask import default_image
from headsteer.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]

LONG_QUESTION = "what is the shape in this image and what is the colour of the shape there ?"
RESULTS = []
STATE = {"deadline": float("inf"), "json": None, "extra": {}, "skip": []}


def left() -> float:
    return STATE["deadline"] - time.perf_counter()


def save():
    """Written after every step, so a run cut off at its time limit still reports what it measured."""
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "steps": RESULTS, **STATE["extra"]}
    for path in STATE["json"]:
        path.write_text(json.dumps(summary, indent=2))


def skipped(name, need):
    """Steps run in order of importance; one that would not finish in the time left, or that --skip
    names, is recorded as skipped."""
    if any(pat in name for pat in STATE["skip"]):
        RESULTS.append({"step": name, "ok": None, "wall_s": 0, "peak_gib": 0, "error": "skipped: --skip"})
        return True
    if left() >= need:
        return False
    RESULTS.append({"step": name, "ok": None, "wall_s": 0, "peak_gib": 0, "error": f"skipped: {left():.0f} s left"})
    print(f"[skip] {name:<42} ({left():.0f} s left, needs about {need} s)", flush=True)
    save()
    return True



def step(name, args, need=20):
    """One CLI command in this process: wall time and peak GPU memory."""
    if skipped(name, need):
        return None
    gc.collect()
    held = 0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()  # what earlier steps still hold does not count
    t = time.perf_counter()
    r = CliRunner().invoke(cli, args, catch_exceptions=True)
    wall = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - held) / 2 ** 30 if torch.cuda.is_available() else float("nan")
    ok = r.exit_code == 0
    tail = "" if ok else (r.output.strip().splitlines() or [repr(r.exception)])[-1]
    if not ok and r.exception is not None and not isinstance(r.exception, SystemExit):
        tail = f"{type(r.exception).__name__}: {r.exception}"
    RESULTS.append({"step": name, "ok": ok, "wall_s": round(wall, 1), "peak_gib": round(peak, 2), "error": tail})
    print(f"[{'ok' if ok else 'FAIL'}] {name:<42} {wall:7.1f} s  peak {peak:6.2f} GiB  {tail}", flush=True)
    save()
    return r


def script(name, cmd, need, timeout=None):
    """A subprocess (benchmark, tests): its output is printed and kept in the JSON."""
    if skipped(name, need):
        return None
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or max(30, left()))
        out, ok = p.stdout + p.stderr, p.returncode == 0
    except subprocess.TimeoutExpired as e:
        out, ok = f"{e.stdout or ''}{e.stderr or ''}\ntimed out", False
    out = out if isinstance(out, str) else out.decode(errors="replace")
    wall = time.perf_counter() - t
    print(out.rstrip(), flush=True)
    tail = "" if ok else (out.strip().splitlines() or [""])[-1]
    RESULTS.append({"step": name, "ok": ok, "wall_s": round(wall, 1), "peak_gib": None, "error": tail, "output": out[-6000:]})
    print(f"[{'ok' if ok else 'FAIL'}] {name:<42} {wall:7.1f} s  {tail}", flush=True)
    save()
    return out


def shaped(shape, work, device, dtype, small):
    out = work / shape
    if not (out / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "make_shaped_checkpoint.py"), "--shape", shape, "--out", str(out),
               "--device", device, "--dtype", dtype] + (["--small"] if small else [])
        if script(f"make {shape}", cmd, need=90) is None or not RESULTS[-1]["ok"]:
            return None
    return out


def precision_at_shape(model_dir, device, dtypes=("bf16", "fp16")):
    """The precision contract (tests/test_precision.py) on a shaped checkpoint: the fast and naive
    paths' error against an fp32 run of the same weights, next to the eager fp32-attention reference's."""
    name = f"precision contract at {Path(model_dir).name}"
    if skipped(name, 90):
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from test_precision import check_contract  # the tests' own reference; tests/ is not a package

    t = time.perf_counter()
    rec = {"step": name, "ok": True, "wall_s": 0, "peak_gib": None, "error": ""}
    try:
        model, proc = headsteer.load(str(model_dir), device=device, dtype="fp32")
        ad = headsteer.get_adapter(model, proc)
        inputs = ad.encode([default_image()], ["what shape is in the image?"])
        for dt in dtypes:
            try:  # the fast path with its fused kernel (the default) and without, the naive path
                errs, ref, budget = check_contract(model, inputs, {"bf16": torch.bfloat16, "fp16": torch.float16}[dt], n_masks=4)
                rec[dt] = {"errors": errs, "reference_err": ref, "budget": budget}
            except AssertionError as e:  # the contract's own assertion: keep its numbers
                rec["ok"], rec["error"] = False, f"{dt}: {str(e)[:300]}"
        del model, ad
    except Exception as e:  # noqa: BLE001 - the check reports every failure and goes on
        rec["ok"], rec["error"] = False, f"{type(e).__name__}: {str(e)[:300]}"
    rec["wall_s"] = round(time.perf_counter() - t, 1)
    RESULTS.append(rec)
    print(f"[{'ok' if rec['ok'] else 'FAIL'}] {name:<42} {rec['wall_s']:7.1f} s  "
          f"{ {k: v for k, v in rec.items() if k in dtypes} } {rec['error']}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    save()


def load_and_attribute(model, work, dev, tag, n_images, masks):
    o = work / f"out-{tag}"
    step(f"{tag}: info (load only)", ["info", "--model", model, *dev], need=30)
    r = step(f"{tag}: attribute {n_images} img x {masks} masks", ["attribute", "--model", model, "--n-images",
             str(n_images), "--masks", str(masks), "--no-compare", "--out", str(o / "attr"), "--force", *dev],
             need=40 + 3 * n_images)
    got = re.search(r"model loaded in ([\d.]+) s; (\d+) images attributed in ([\d.]+) s", r.output if r else "")
    if got:  # attribute times its own load and run
        STATE["extra"].setdefault("attribute_timing", {})[tag] = {
            "load_s": float(got[1]), "images": int(got[2]), "run_s": float(got[3]), "masks": masks}


def other_commands(model, work, dev, tag, quick, heavy_export):
    """The other commands on one model, most telling first."""
    o = work / f"out-{tag}"
    step(f"{tag}: eval (accuracy + transfer)", ["eval", "--model", model, "--limit", "32", "--batch-size", "8",
         "--out", str(o / "eval"), "--force", *dev], need=40)
    step(f"{tag}: flow", ["flow", "--model", model, "--n-images", "1" if quick else "2", "--out", str(o / "flow"), "--force",
         *dev], need=30)
    step(f"{tag}: attribute with comparisons", ["attribute", "--model", model, "--n-images", "2", "--masks", "256",
         "--n-eval", "2", "--out", str(o / "attr-cmp"), "--force", *dev], need=45)
    step(f"{tag}: edit scale", ["edit", "scale", "--model", model, "--heads", "L1H0-3", "--factor", "0",
         "--out", str(o / "scale.json"), "--force", *dev], need=15)
    step(f"{tag}: edit steer", ["edit", "steer", "--model", model, "--heads", "L1H0-3", "--n", "8",
         "--contrast", "classes:circle,rectangle", "--data", "easy-vqa:test", "--out", str(o / "steer.json"), "--force", *dev], need=25)
    step(f"{tag}: compare (scale, steer)", ["compare", "--model", model, "--edits", str(o / "scale.json"), str(o / "steer.json"),
         "--limit", "16", "--batch-size", "8", "--out", str(o / "cmp"), "--force", *dev], need=40)
    step(f"{tag}: ask --edit", ["ask", "--model", model, "--edit", str(o / "scale.json"), *dev], need=20)
    step(f"{tag}: export (scale, baked)", ["export", "--model", model, "--edit", str(o / "scale.json"),
         "--out", str(o / "ckpt"), "--force", *dev], need=90 if heavy_export else 15)
    shutil.rmtree(o / "ckpt", ignore_errors=True)  # written by this script; a 7B copy would fill the disk


def project(tag, n_images, masks):
    """Projected wall time of 1,000 images x 1,000 masks from attribute's own timing of its load and
    of its per-image work (the per-image cost is linear in the masks)."""
    t = STATE["extra"].get("attribute_timing", {}).get(tag)
    if t is None:
        return None
    per_image = t["run_s"] / t["images"] * (1000 / masks)
    total = t["load_s"] + 1000 * per_image
    print(f"{tag}: {per_image:.2f} s per image at 1,000 masks -> 1,000 images x 1,000 masks in {total / 60:.1f} min "
          f"on one GPU (model load {t['load_s']:.0f} s included)", flush=True)
    p = {"model": tag, "measured": f"{t['images']} images x {masks} masks in {t['run_s']} s after a {t['load_s']} s load",
         "per_image_s_at_1000_masks": round(per_image, 3), "projected_1000x1000_min": round(total / 60, 1)}
    STATE["extra"].setdefault("projections", []).append(p)
    save()
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/headsteer-gpu-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--small", action="store_true", help="tiny shaped models (smoke test of this script)")
    ap.add_argument("--n-images", type=int, default=20)
    ap.add_argument("--masks", type=int, default=1000)
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts of step names to skip (e.g. 'default:,llava7b: edit')")
    ap.add_argument("--budget-s", type=float, default=480, help="steps that would not finish in this time are skipped")
    args = ap.parse_args()
    STATE["deadline"] = time.perf_counter() + args.budget_s
    STATE["skip"] = [p for p in args.skip.split(",") if p]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    STATE["json"] = [work / "gpu_check.json"] + ([Path(os.environ["OUT"]) / "gpu_check.json"] if os.environ.get("OUT") else [])
    dev = ["--device", args.device, "--dtype", args.dtype]
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    py = sys.executable
    # In order of importance, so that a short lease still measures the targets.
    llava = shaped("llava-1.5-7b", work, args.device, args.dtype, args.small)
    if llava is not None:
        bench = script("bench: llava-1.5-7b shape", [py, str(ROOT / "scripts" / "bench_attribution.py"), "--model", str(llava),
                       "--device", args.device, "--dtype", args.dtype, "--masks", "1024", "--naive-masks", "16", "--profile"],
                       need=60, timeout=240)
        STATE["extra"]["bench_llava7b"] = bench
        # the reference prompt had a 19-token suffix; this tokenizer gives 9 for the default question
        bench19 = script("bench: llava-1.5-7b shape, 19-token suffix",
                         [py, str(ROOT / "scripts" / "bench_attribution.py"), "--model", str(llava), "--device", args.device,
                          "--dtype", args.dtype, "--masks", "1024", "--naive-masks", "4", "--question", LONG_QUESTION,
                          "--compile"], need=90, timeout=300)
        STATE["extra"]["bench_llava7b_suffix19"] = bench19
        # seconds per image of every --scorer (COAR at 256 and 1,000 masks, atp, atp*, grad-coar), peak memory
        scorers = script("bench: scorers, llava-1.5-7b shape", [py, str(ROOT / "scripts" / "bench_attribution.py"), "--model",
                         str(llava), "--device", args.device, "--dtype", args.dtype, "--scorers"], need=90, timeout=300)
        STATE["extra"]["bench_scorers_llava7b"] = scorers
        load_and_attribute(str(llava), work, dev, "llava7b", args.n_images, args.masks)
        step("llava7b: attribute --scorer atp*", ["attribute", "--model", str(llava), "--scorer", "atp*", "--n-images",
             str(args.n_images), "--no-compare", "--out", str(work / "out-llava7b" / "attr-atp"), "--force", *dev], need=40)
        project("llava7b", args.n_images, args.masks)
        precision_at_shape(llava, args.device)
    script("tests: test_gpu.py, test_precision.py", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_gpu.py"), str(ROOT / "tests" / "test_precision.py")], need=60, timeout=180)
    load_and_attribute("default", work, dev, "default", 4, 256)
    other_commands("default", work, dev, "default", quick=True, heavy_export=False)
    if llava is not None:
        other_commands(str(llava), work, dev, "llava7b", quick=False, heavy_export=True)
    if not args.skip_qwen:
        qwen = shaped("qwen2.5-vl-7b", work, args.device, args.dtype, args.small)
        if qwen is not None:
            n = max(2, args.n_images // 4)
            load_and_attribute(str(qwen), work, dev, "qwen7b", n, args.masks)
            project("qwen7b", n, args.masks)
            other_commands(str(qwen), work, dev, "qwen7b", quick=True, heavy_export=True)
    save()
    failed = [r["step"] for r in RESULTS if r["ok"] is False]
    skipped_ = [r["step"] for r in RESULTS if r["ok"] is None]
    print(f"{len(RESULTS) - len(failed) - len(skipped_)} passed, {len(failed)} failed, {len(skipped_)} skipped"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
