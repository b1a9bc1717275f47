"""Every main path on a GPU in bf16 (skipped without CUDA), the same paths in bf16 on the CPU, and the
one-line errors for devices and dtypes this machine cannot use."""
import json

import pytest
import torch
from click.testing import CliRunner

from headsteer.cli import main

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def run(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def main_paths(tmp_path, device, dtype):
    """attribute, flow, eval with transfer metrics, edit + export, compare, ask — on one device/dtype."""
    dev = ["--device", device, "--dtype", dtype]
    att = tmp_path / "att"
    run(["attribute", "--n-images", "2", "--masks", "24", "--n-eval", "2", "--k-max", "3", "--out", str(att), *dev])
    assert json.loads((att / "heads.json").read_text())
    run(["flow", "--n-images", "1", "--out", str(tmp_path / "flow"), *dev])
    run(["eval", "--limit", "8", "--batch-size", "4", "--out", str(tmp_path / "ev"), *dev])
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["accuracy"]["all"]["accuracy"] > 0.5 and s["image_reliance"] == s["image_reliance"]
    edit = tmp_path / "scale.json"
    run(["edit", "scale", "--heads", "L3H0-3", "--factor", "0", "--out", str(edit), *dev])
    run(["export", "--edit", str(edit), "--out", str(tmp_path / "ckpt"), *dev])
    run(["compare", "--edits", str(edit), "--limit", "8", "--batch-size", "4", "--out", str(tmp_path / "cmp"), *dev])
    out = run(["ask", "--edit", str(edit), *dev])
    assert "edited" in out


@cuda
def test_main_paths_on_cuda_bf16(tmp_path):
    main_paths(tmp_path, "cuda", "bf16")



@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_prefix_kernel_on_cuda_equals_the_fp32_blocks(dtype):
    """The CUDA flash kernel behind the fast path's prefix block: its output and log-sum-exp (rows
    and keys not multiples of the kernel's tiles) against headsteer's own fp32 block."""
    from headsteer import fastpath

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 128, generator=g).to("cuda", dtype) for n in (1000, 587, 587))
    if torch.cuda.get_device_capability() < (8, 0):
        assert not fastpath.flash_ok(q, k, v)
        return
    assert fastpath.flash_ok(q, k, v)
    out, lse = fastpath.attend_block(q, k, v, 128 ** -0.5)
    ref, ref_lse = fastpath.attend_block(q, k, v, 128 ** -0.5, fused=False)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape == (4, 1000, 1)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)


@cuda
def test_precision_contract_on_cuda(default_model):
    from headsteer import get_adapter
    from headsteer.ask import default_image
    from test_precision import check_contract

    model, proc = default_model
    inputs = get_adapter(model, proc).encode([default_image()], ["what shape is in the image?"])
    import copy

    m = copy.deepcopy(model).cuda()  # a model of its own: its adapter is made anew
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    for dtype in (torch.bfloat16, torch.float16):
        check_contract(m, inputs, dtype)


def test_main_paths_on_cpu_bf16(tmp_path):
    main_paths(tmp_path, "cpu", "bf16")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("args", [
    ["attribute", "--device", "cuda"],
    ["eval", "--device", "cuda:1"],
    ["flow", "--device", "tpu9"],
    ["ask", "--device", "cuda"],
    ["edit", "scale", "--heads", "L0H0", "--factor", "2", "--out", "x.json", "--device", "cuda"],
])
def test_unusable_device_is_one_line(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "device" in r.output, r.output
    assert "Traceback" not in r.output
    assert not list(tmp_path.iterdir())  # nothing written
