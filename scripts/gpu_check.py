"""The GPU check: every command on a random LLaVA-1.5-7B-shaped checkpoint (and a Qwen2.5-VL-7B
shape where torchvision is installed) and on the default model, with --device cuda --dtype bf16;
wall time and peak GPU memory of each; the attribution benchmark; and the projected time of a
paper-scale attribution (1,000 images x 1,000 masks). Run through scripts/gpu_check.sh.

    python scripts/gpu_check.py --work /tmp/hs                  # on a GPU (about 8 minutes on an H100/H200)
    python scripts/gpu_check.py --work /tmp/hs --device cpu --small --dtype fp32   # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from headsteer.cli import main as cli  # noqa: E402

RESULTS = []


def step(name, args, cwd=None):
    """One CLI command in this process: wall time and peak GPU memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    r = CliRunner().invoke(cli, args, catch_exceptions=True)
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    ok = r.exit_code == 0
    tail = "" if ok else (r.output.strip().splitlines() or [repr(r.exception)])[-1]
    if not ok and r.exception is not None and not isinstance(r.exception, SystemExit):
        tail = f"{type(r.exception).__name__}: {r.exception}"
    RESULTS.append({"step": name, "ok": ok, "wall_s": round(wall, 1), "peak_gib": round(peak, 2), "error": tail})
    print(f"[{'ok' if ok else 'FAIL'}] {name:<42} {wall:7.1f} s  peak {peak:6.2f} GiB  {tail}", flush=True)
    return r


def shaped(shape, work, device, dtype, small):
    out = work / shape
    if not (out / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "make_shaped_checkpoint.py"), "--shape", shape, "--out", str(out),
               "--device", device, "--dtype", dtype] + (["--small"] if small else [])
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        print(f"[{'ok' if p.returncode == 0 else 'FAIL'}] make {shape:<37} {time.perf_counter() - t:7.1f} s  "
              f"{(p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() else ''}", flush=True)
        if p.returncode != 0:
            return None
    return out


def commands(model, work, dev, tag, n_images, masks, quick):
    """Every command on one model; returns the attribute and info wall times."""
    o = work / f"out-{tag}"
    step(f"{tag}: info (load only)", ["info", "--model", model, *dev])
    r = step(f"{tag}: attribute {n_images} img x {masks} masks", ["attribute", "--model", model, "--n-images", str(n_images),
             "--masks", str(masks), "--no-compare", "--out", str(o / "attr"), "--force", *dev])
    step(f"{tag}: attribute with comparisons", ["attribute", "--model", model, "--n-images", "2", "--masks", "256",
         "--n-eval", "2", "--out", str(o / "attr-cmp"), "--force", *dev])
    step(f"{tag}: flow", ["flow", "--model", model, "--n-images", "1" if quick else "2", "--out", str(o / "flow"), "--force",
         *dev])
    step(f"{tag}: eval (accuracy + transfer)", ["eval", "--model", model, "--limit", "32", "--batch-size", "8",
         "--out", str(o / "eval"), "--force", *dev])
    step(f"{tag}: edit scale", ["edit", "scale", "--model", model, "--heads", "L1H0-3", "--factor", "0",
         "--out", str(o / "scale.json"), *dev])
    step(f"{tag}: edit steer", ["edit", "steer", "--model", model, "--heads", "L1H0-3", "--n", "8",
         "--contrast", "classes:circle,rectangle",
         "--out", str(o / "steer.json"), *dev])
    step(f"{tag}: export (scale, baked)", ["export", "--model", model, "--edit", str(o / "scale.json"),
         "--out", str(o / "ckpt"), "--force", *dev])
    step(f"{tag}: compare (scale, steer)", ["compare", "--model", model, "--edits", str(o / "scale.json"), str(o / "steer.json"),
         "--limit", "16", "--batch-size", "8", "--out", str(o / "cmp"), "--force", *dev])
    step(f"{tag}: ask --edit", ["ask", "--model", model, "--edit", str(o / "scale.json"), *dev])
    return r


def project(tag, n_images, masks):
    """Projected wall time of 1,000 images x 1,000 masks from the measured attribute and load times."""
    load = next(r["wall_s"] for r in RESULTS if r["step"] == f"{tag}: info (load only)")
    att = next(r for r in RESULTS if r["step"].startswith(f"{tag}: attribute {n_images}"))
    if not att["ok"]:
        return None
    per_image = (att["wall_s"] - load) / n_images * (1000 / masks)
    total = load + 1000 * per_image
    print(f"{tag}: {per_image:.2f} s per image at 1,000 masks -> 1,000 images x 1,000 masks in {total / 60:.1f} min "
          f"on one GPU (model load {load:.0f} s included)")
    return {"model": tag, "per_image_s_at_1000_masks": round(per_image, 3), "projected_1000x1000_min": round(total / 60, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/headsteer-gpu-check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--small", action="store_true", help="tiny shaped models (smoke test of this script)")
    ap.add_argument("--n-images", type=int, default=20)
    ap.add_argument("--masks", type=int, default=1000)
    ap.add_argument("--skip-qwen", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = ["--device", args.device, "--dtype", args.dtype]
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    projections = []
    commands("default", work, dev, "default", 4, 256, quick=True)
    llava = shaped("llava-1.5-7b", work, args.device, args.dtype, args.small)
    if llava is not None:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_attribution.py"), "--model", str(llava), "--device",
                        args.device, "--dtype", args.dtype, "--masks", "1024", "--naive-masks", "16"], check=False)
        commands(str(llava), work, dev, "llava7b", args.n_images, args.masks, quick=False)
        projections.append(project("llava7b", args.n_images, args.masks))
    if not args.skip_qwen:
        qwen = shaped("qwen2.5-vl-7b", work, args.device, args.dtype, args.small)
        if qwen is not None:
            commands(str(qwen), work, dev, "qwen7b", max(2, args.n_images // 4), args.masks, quick=True)
            projections.append(project("qwen7b", max(2, args.n_images // 4), args.masks))
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device,
               "steps": RESULTS, "projections": [p for p in projections if p]}
    (work / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    failed = [r["step"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
