"""Cross-attention head ablation on tiny Llama 3.2 Vision (mllama) and IDEFICS (v1) models: the text has
no image positions, the image reaches it only through cross-attention layers, and the heads headsteer
acts on are those layers' query heads (HeadSet ``L<i>`` = the i-th cross-attention layer)."""
import json

import pytest
import torch
import transformers as tf
from click.testing import CliRunner
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from headsteer import HeadsteerError, Knockout, Recorder, Spec, get_adapter, intervene
from headsteer.attribution import ablated_logits
from headsteer.attribution.engine import naive_logits
from headsteer.baseline import TensorBaseline, ZeroBaseline, make_baseline
from headsteer.cli import main
from headsteer.edit import EditManifest, apply_edit, export
from test_intervene import assert_restored, last_logits
from tiny_processors import image, make_tokenizer, template
from tiny_models import IDEFICS_KEYS, IMG, MLLAMA_KEYS, VOCAB, alone_row, idefics_image_mask, mllama_cross_mask, other_pixels, tiny

FAMILIES = FAMILIES_TESTED = ["mllama", "idefics"]
KEYS = {"mllama": MLLAMA_KEYS, "idefics": IDEFICS_KEYS}  # cross-attention keys per prompt
# hidden states (embeddings, then each decoder layer's output) that come before the second cross-attention
# layer: mllama's is decoder layer 3, IDEFICS's second gated block runs before decoder layer 2
BEFORE_L1 = {"mllama": 4, "idefics": 3}


def random_baseline(ad, seed=3):
    """Another image's K/V at every cross-attention key (exercises the replacement path)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(ad.num_layers, ad.num_kv_heads, KEYS[ad.model_type], ad.head_dim, generator=g)
    return TensorBaseline(k, torch.randn(k.shape, generator=g), "test")


def processor(family="mllama"):
    """The family's real processor built offline: a word-level tokenizer with the image placeholder at the
    tiny model's image token id and 16x16 images (mllama: tiles, at most 2 per image, and a small chat
    template; IDEFICS: ``<fake_token_around_image><image><fake_token_around_image>`` before the text)."""
    if family == "idefics":
        tok = make_tokenizer(specials=("<fake_token_around_image>", "<image>"), ids={"<image>": IMG})
        return tf.IdeficsProcessor(IdeficsImageProcessorPil(image_size=16), tok)
    tok = make_tokenizer({"image_token": "<|image|>"}, specials=("<|python_tag|>",), ids={"<|image|>": IMG})
    return tf.MllamaProcessor(MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2), tok,
                              chat_template=template("USER: ", " ", "ASSISTANT:", "<|image|>"))


def image_mask(family, ids):
    """The family's cross-attention mask input for ``ids``, as its processor makes it."""
    return {"cross_attention_mask": mllama_cross_mask(ids)} if family == "mllama" else {"image_attention_mask": idefics_image_mask(ids)}


# -- what a head is -------------------------------------------------------------------------------
def test_every_cross_attention_family_has_a_tiny_model_and_is_not_refused():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

    from headsteer.families import FAMILIES, REFUSED, check_family
    from tiny_models import CROSS_BUILDERS

    cross = {t for t, f in FAMILIES.items() if f.cross is not None}
    assert cross == set(CROSS_BUILDERS) == set(FAMILIES_TESTED) and cross <= set(MAPPING)
    assert not cross & set(REFUSED)
    for family in cross:
        check_family(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_are_the_cross_attention_layers_query_heads(family):
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    assert ad.cross_attention and not ad.hybrid
    kv = 2 if family == "mllama" else 4  # IDEFICS has no GQA
    assert (ad.num_layers, ad.num_heads, ad.num_kv_heads, ad.head_dim) == (2, 4, kv, 8)
    # mllama: the decoder layer's index; IDEFICS: the index among its gated cross-attention blocks
    assert [ad.model_layer(i) for i in range(ad.num_layers)] == ([1, 3] if family == "mllama" else [0, 1])
    # L1 is the second cross-attention layer: ablating it leaves everything before it untouched
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
        with intervene(model, ablate="L1H*", baseline=ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
            out = model(**inputs, output_hidden_states=True)
    n = BEFORE_L1[family]
    for i in range(n):
        assert torch.equal(ref.hidden_states[i], out.hidden_states[i]), i
    assert not torch.equal(ref.hidden_states[n], out.hidden_states[n])
    assert (ref.logits - out.logits).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_noop_is_identical_and_model_restored(family, batch):
    model, inputs = tiny(family, batch=batch)
    ad = get_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nothing = torch.zeros(1, ad.num_layers, ad.num_heads, dtype=torch.bool)
    with torch.no_grad():
        ref = model(**inputs).logits
        with intervene(model, Spec()):
            empty = model(**inputs).logits
        with intervene(model, head_scale=torch.ones(ad.num_layers, ad.num_heads)):
            scaled = model(**inputs).logits
        if batch == 1:  # (an ablation counts a left-padded row's positions from its first token, as generate does)
            with intervene(model, ablate=nothing, baseline=random_baseline(ad)):
                assert torch.equal(ref, model(**inputs).logits)
    assert torch.equal(ref, empty) and torch.equal(ref, scaled)
    assert ad.text_config._attn_implementation == "sdpa"
    assert_restored(model, before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["zero", "tensor"])
def test_ablating_all_heads_removes_image_influence(family, kind):
    # every position, also the rows the cross-attention mask masks out (the text before the image):
    # Mllama gives those rows a uniform average over the image values, so the image reaches them too
    # (IDEFICS zeroes their cross-attention output)
    model, inputs = tiny(family)
    other = other_pixels(inputs)
    if family == "mllama":
        with torch.no_grad():
            assert (model(**inputs).logits - model(**other).logits)[:, :5].abs().max() > 1e-4  # masked-out rows read the image
    assert (last_logits(model, inputs) - last_logits(model, other)).abs().max() > 1e-4
    ad = get_adapter(model)
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim) if kind == "zero" else random_baseline(ad)
    with torch.no_grad(), intervene(model, ablate="*", baseline=base):
        torch.testing.assert_close(model(**inputs).logits, model(**other).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_with_the_images_own_kv_changes_nothing(family):
    """A baseline made of the prompt's own cross-attention K/V (captured as the mean baseline is)
    leaves the answer as it was: ablation replaces exactly the cross-attention keys/values."""
    model, inputs = tiny(family, batch=1)
    cap = {}
    with torch.no_grad(), intervene(model, capture=cap):
        ref = model(**inputs).logits
    own = TensorBaseline(torch.stack([cap[i][0][0] for i in range(2)]), torch.stack([cap[i][1][0] for i in range(2)]), "own")
    assert own.keys.shape == (2, get_adapter(model).num_kv_heads, KEYS[family], 8)
    with torch.no_grad(), intervene(model, ablate="*", baseline=own):
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=1e-5)


def test_gqa_ablation_is_per_query_head():
    model, inputs = tiny("mllama", batch=1)
    ad = get_adapter(model)
    assert ad.group_size() == 2  # H0 and H1 share KV head 0
    base = random_baseline(ad)
    got = {}
    hook = ad.out_proj(0).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].view(*a[0].shape[:2], 4, 8).clone()))
    try:
        with torch.no_grad():
            model(**inputs)
            ref = got["x"]
            with intervene(model, ablate="L0H0", baseline=base):
                one = last_logits(model, inputs)
                head0 = got["x"]
            with intervene(model, ablate="L0H0-1", baseline=base):
                group = last_logits(model, inputs)
    finally:
        hook.remove()
    # H1 still reads the real image through the shared KV head (headsteer's fp32 arithmetic vs SDPA: rounding only)
    torch.testing.assert_close(head0[:, :, 1:], ref[:, :, 1:], atol=1e-6, rtol=0)
    assert (head0[:, :, 0] - ref[:, :, 0]).abs().max() > 1e-4
    assert (one - group).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_row_equals_the_prompt_alone(family):
    model, inputs = tiny(family, batch=2)
    assert not inputs["attention_mask"].all()
    ad = get_adapter(model)
    masks = torch.rand(2, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(0)) < 0.5
    masks[:, 0, 0] = True
    base = random_baseline(ad)
    with intervene(model, ablate=masks, baseline=base):
        batched = last_logits(model, inputs)
    for b in range(2):
        with intervene(model, ablate=masks[b : b + 1], baseline=base):
            alone = last_logits(model, alone_row(family, inputs, b))
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("what", ["ablate", "steer"])
def test_interventions_hold_during_cached_generation(family, what):
    """A cached decoding step equals a full uncached forward (mllama reads the cross-attention K/V
    from the cache; IDEFICS recomputes them from the image features it keeps)."""
    model, inputs = tiny(family, batch=2)
    ad = get_adapter(model)
    if what == "ablate":
        spec = dict(ablate="L0H1,L1H0-2", baseline=random_baseline(ad))
    else:
        spec = dict(head_scale=torch.full((2, 4), 1.5), head_add=torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad(), intervene(model, **spec):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=list(range(80, VOCAB)), pad_token_id=0)
        seq = gen.sequences[:, :-1]
        new = seq.shape[1] - inputs["input_ids"].shape[1]
        full = dict(inputs, input_ids=seq, **image_mask(family, seq),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, new, dtype=torch.long)], 1))
        uncached = model(**full, use_cache=False).logits[:, -1]
    torch.testing.assert_close(gen.logits[-1], uncached, atol=1e-4, rtol=1e-4)
    plain = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=0)
    assert (plain.logits[0] - gen.logits[0]).abs().max() > 1e-4  # the intervention did something


# -- an independent reference: eager attention written here, not headsteer's ----------------------
_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    G = query.shape[1] // key.shape[1]

    def attend(k, v):
        k, v = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
        s = query.float() @ k.transpose(-1, -2) * scaling
        if attention_mask is not None:
            m = attention_mask[:, :, :, : k.shape[2]]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        return torch.softmax(s, -1) @ v

    out = attend(key, value)
    if any(module is m for m in _REF["cross"]):
        layer = next(i for i, m in enumerate(_REF["cross"]) if m is module)
        heads = _REF["mask"][layer]  # [H]: these query heads read the baseline at every key, every query
        bk, bv = _REF["base"].image_kv(layer, key.shape[2], key.dtype, key.device)
        out[:, heads] = attend(bk.expand_as(key), bv.expand_as(value))[:, heads]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_cross_reference", _reference_attention)
AttentionMaskInterface.register("test_cross_reference", eager_mask)


def reference_logits(model, inputs, masks, base):
    cfg = get_adapter(model).text_config
    saved = cfg._attn_implementation
    _REF["base"], _REF["cross"] = base, list(get_adapter(model).attention)
    try:
        cfg._attn_implementation_internal = "test_cross_reference"
        out = []
        with torch.no_grad():
            for m in masks:
                _REF["mask"] = m
                out.append(model(**inputs).logits[0, -1].float())
        return torch.stack(out)
    finally:
        cfg._attn_implementation_internal = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_an_independent_eager_reference(family):
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    masks = torch.rand(6, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(0)) < 0.5
    masks[0], masks[1] = False, True
    base = random_baseline(ad)
    ref = reference_logits(model, inputs, masks, base)
    torch.testing.assert_close(naive_logits(model, None, inputs, masks, base), ref, atol=1e-5, rtol=0)
    assert (ref[1] - ref[0]).abs().max() > 1e-3  # the masks matter


@pytest.mark.parametrize("family", FAMILIES)
def test_ablated_logits_takes_the_naive_path_with_a_real_processor(family):
    model, _ = tiny(family, batch=1)
    proc = processor(family)
    ad = get_adapter(model, proc)
    masks = torch.zeros(3, ad.num_layers, ad.num_heads, dtype=torch.bool)
    masks[1, 0, 2], masks[2] = True, True
    q = "what colour is the shape ?"
    out = {s: ablated_logits(model, proc, image(s), q, masks, baseline="zero") for s in (0, 1)}
    assert out[0].shape == (3, VOCAB) and out[0].dtype == torch.float32 and out[0].device.type == "cpu"
    torch.testing.assert_close(out[0][0], last_logits(model, ad.encode([image(0)], [q]))[0], atol=1e-5, rtol=0)
    assert (out[0][1] - out[0][0]).abs().max() > 1e-4
    torch.testing.assert_close(out[0][2], out[1][2], atol=1e-5, rtol=0)  # every head ablated: the image is gone
    assert (out[0][0] - out[1][0]).abs().max() > 1e-4
    ref = reference_logits(model, ad.encode([image(0)], [q]), masks, ZeroBaseline(ad.num_kv_heads, ad.head_dim))
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_and_blank_baselines_capture_the_cross_attention_kv(family, tmp_path):
    model, _ = tiny(family, batch=1)
    proc = processor(family)
    ad = get_adapter(model, proc)
    refs = [image(s) for s in (0, 1, 2)]
    mean = make_baseline(model, proc, "mean", reference=refs, cache_dir=tmp_path)
    assert mean.keys.shape == (2, ad.num_kv_heads, KEYS[family], 8)
    caps = []
    for im in refs:
        cap = {}
        with torch.no_grad(), intervene(model, capture=cap):
            model(**ad.encode([im], ["what is in the image?"]))
        caps.append(torch.stack([cap[i][0][0] for i in range(2)]))
    torch.testing.assert_close(mean.keys, torch.stack(caps).mean(0), atol=1e-6, rtol=0)
    assert make_baseline(model, proc, "blank").keys.shape == mean.keys.shape


# -- scaling, steering, export, recording, refusals -----------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_scale_and_export_reproduce_the_edited_logits(family, tmp_path):
    model, _ = tiny(family, batch=1)
    proc = processor(family)
    ad = get_adapter(model, proc)
    inputs = ad.encode([image(0)], ["what colour is the shape ?"])
    ref = last_logits(model, inputs)
    edit = EditManifest("scale", "L0H1,L1H2-3", {"factor": 0.0})
    with apply_edit(model, edit):
        edited = last_logits(model, inputs)
    assert (edited - ref).abs().max() > 1e-4
    w = ad.out_proj(1).weight  # scale 0 == those heads' o_proj columns zeroed
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, 16:32] = 0
        ad.out_proj(0).weight[:, 8:16] = 0
        zeroed = last_logits(model, inputs)
        w.copy_(saved)
    torch.testing.assert_close(edited, zeroed, atol=1e-6, rtol=0)
    model, _ = tiny(family, batch=1)  # the weights untouched by the column test
    export(model, proc, edit, tmp_path / "ck")
    plain = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "ck").eval()
    torch.testing.assert_close(last_logits(plain, inputs), edited, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_recorder_records_what_each_cross_head_writes(family):
    """Attention mass is 1 by construction in a cross-attention layer; the recorder takes the norm of
    tanh(gate) * W_O[:, head] @ head output instead: 0 for a head whose o_proj columns are zero, and
    proportional to tanh(gate) (one gate in mllama, one per residual channel in the tiny IDEFICS)."""
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)

    def record():
        rec = Recorder(ad.num_layers, ad.num_heads)
        with torch.no_grad(), intervene(model, recorder=rec):
            model(**inputs)
        return rec

    ref = record().mean("last")
    assert (ref > 0).all()
    assert torch.equal(ad.gates[1], torch.ones_like(ad.gates[1]))
    with torch.no_grad():  # in the last cross-attention layer: nothing downstream is recorded
        ad.out_proj(1).weight[:, 16:24] = 0  # L1H2 writes nothing
        ad.gates[1].fill_(-0.5)
    rec = record()
    got = rec.mean("last")
    assert torch.equal(got[0], ref[0]) and got[1, 2] == 0
    others = [0, 1, 3]
    torch.testing.assert_close(got[1, others], ref[1, others] * (torch.tanh(torch.tensor(0.5)) / torch.tanh(torch.tensor(1.0))).double(),
                               rtol=1e-5, atol=0)
    assert rec.per_example().shape == (1, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_and_image_attention_scaling_are_refused_in_one_line(family):
    model, inputs = tiny(family, batch=1)
    for kw in (dict(knockouts=[Knockout("image", "last")]), dict(image_attn=torch.ones(2, 4))):
        with pytest.raises(HeadsteerError, match="cross-attention layers") as e:
            with intervene(model, **kw):
                pass
        assert "\n" not in str(e.value)
    if family != "mllama":  # IDEFICS's own forward needs its image_attention_mask
        return
    no_mask = {k: v for k, v in inputs.items() if k != "cross_attention_mask"}
    with pytest.raises(HeadsteerError, match="cross_attention_mask"):
        with intervene(model, ablate="L0H0", baseline=ZeroBaseline(2, 8)):
            model(**no_mask)


# -- the command line -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_attribute_on_a_saved_tiny_model(family, tmp_path):
    model, _ = tiny(family, batch=1)
    model.save_pretrained(tmp_path / "ck")
    processor(family).save_pretrained(tmp_path / "ck")
    rows = []
    for i in range(4):
        image(i, (16, 16)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what colour is the shape ?", "answer": ["one", "here"][i % 2]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "att"
    r = CliRunner().invoke(main, ["attribute", "--model", str(tmp_path / "ck"), "--data", str(tmp_path / "data.jsonl"),
                                  "--n-images", "2", "--n-eval", "2", "--masks", "16", "--k-max", "2", "--n-random", "1",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "heads.json").read_text())
    assert len(data["heads"]) == 8 and {h["head"] for h in data["heads"]} == {f"L{l}H{h}" for l in range(2) for h in range(4)}
    assert data["baseline"]["kind"] == "mean" and data["baseline"]["reference"].startswith("user(4)")
    assert set(data["curves"]["rankings"]) >= {"single-head", "attention"}
    r = CliRunner().invoke(main, ["info", "--model", str(tmp_path / "ck")])
    assert r.exit_code == 0 and "2 (cross-attention layers)" in r.output, r.output
    # attention scaling is refused when the edit is made, in one line, with nothing written
    r = CliRunner().invoke(main, ["edit", "attn", "--model", str(tmp_path / "ck"), "--heads", "L0H0", "--alpha", "1",
                                  "--out", str(tmp_path / "attn.json")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "edit scale" in r.output, r.output
    assert not (tmp_path / "attn.json").exists()
    # eval with transfer metrics, before and after a scale edit of the cross-attention heads
    edit = tmp_path / "scale.json"
    r = CliRunner().invoke(main, ["edit", "scale", "--model", str(tmp_path / "ck"), "--heads", "L0H0-3,L1H0-3",
                                  "--factor", "0", "--out", str(edit)])
    assert r.exit_code == 0, r.output
    for name, extra in (("ev", []), ("ev_edit", ["--edit", str(edit)])):
        r = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "ck"), "--data", str(tmp_path / "data.jsonl"),
                                      "--limit", "4", "--batch-size", "2", "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
    before, after = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("ev", "ev_edit"))
    assert abs(before["image_reliance"]) > 1e-4  # the image matters through the cross-attention heads...
    assert abs(after["image_reliance"]) < 1e-6  # ...and not at all once every one of them is zeroed
