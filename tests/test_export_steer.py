"""A steer edit exports as plain weights wherever the text backbone's attention takes an o_proj bias from
a config flag: the checkpoint loads in plain transformers (no headsteer code) and reproduces the edited
logits. Where no flag gives o_proj a bias, the export keeps the manifest route and the kind says why.
One family per text-backbone group."""
import pytest
import torch
from tiny_models import BUILDERS, CROSS_BUILDERS, tiny
from transformers import AutoModelForImageTextToText

from headsteer import get_adapter
from headsteer.edit import KINDS, EditManifest, apply_edit, export

GROUPS = ["llava", "gemma3", "aya_vision", "qwen3_vl", "llava_onevision1_5", "qwen3_5", "llama4", "lfm3_vl", "muse_glimmer",
          "deepseek_ocr2", "paligemma", "granite4_vision", "idefics3",
          # no flag gives their o_proj a bias
          "qwen2_vl", "mistral3", "mllama"]


@pytest.mark.parametrize("family", [f for f in GROUPS if f in BUILDERS or f in CROSS_BUILDERS])
def test_steer_export_reproduces_the_edit_in_plain_transformers(family, tmp_path):
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    edit = EditManifest("steer", "L0H0,L1H1-2", {"strength": 1.5}).with_tensors(
        {"vectors": torch.randn(ad.num_layers, ad.num_heads, ad.head_dim, generator=g)})
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        with apply_edit(model, edit):
            edited = model(**inputs).logits[:, -1]
    assert (edited - plain).abs().max() > 1e-4  # the edit does something
    why = KINDS["steer"].not_bakeable(ad)
    result = export(model, None, edit, tmp_path / "ckpt")
    assert result["baked"] == (why is None), why
    if why is not None:
        assert "bias" in why
        return
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt").eval()  # plain transformers
    with torch.no_grad():
        got = reloaded(**inputs).logits[:, -1]
    torch.testing.assert_close(got, edited, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits[:, -1], plain, atol=0, rtol=0)  # the model is as it was
