"""Logits of one (image, question) under many head-ablation masks — one runner, ``AblationRunner``,
with two paths: the naive reference (a full forward per mask, vision tower included:
``naive_logits``) and the fast path (the prompt's prefix, up to the last image token, run once; a batch
of masks over the text suffix only, reading the shared prefix; headsteer/fastpath.py). The path is
decided once per prompt, from the family's record, the prompt's layout and the run's self-check.
Results are CPU float32 tensors: this is where they cross from the model's device to the host.

    >>> import torch, headsteer
    >>> from headsteer.ask import default_image
    >>> model, processor = headsteer.load("default")
    >>> runner = AblationRunner(model, processor, "zero").prepare(default_image(), "what shape is in the image?")
    >>> runner.path
    'fast'
    >>> runner(torch.zeros(2, 4, 8, dtype=torch.bool)).shape[0]       # masks bool [M, layers, heads]
    2
"""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import DynamicCache

from headsteer.adapters import get_adapter
from headsteer.baseline import Baseline, as_baseline
from headsteer.errors import HeadsteerError
from headsteer.fastpath import Prefix, PrefixCache, tf32_for
from headsteer.hybrid_prefix import HybridPrefixCache, filling_cache
from headsteer.intervention import Recorder, Spec, intervene
from headsteer.selfcheck import compare

__all__ = ["AblationRunner", "ablated_logits", "check_masks", "fast_path_refusal", "naive_logits"]

GRAD_ROWS = 32  # rows per forward and backward of ``AblationRunner.gradients`` on the fast path
_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
_SPLIT = ("text tokens between image tokens (tile markers, or several images), or a marker opening a bidirectional "
          "image block, read the image inside the prefix, so ablation changes the prefix and it cannot be shared")


def fast_path_refusal(ad, input_ids=None) -> str | None:
    """Why this model (``Family.no_fast_path``) or this prompt's layout (``input_ids`` [1, T], when given)
    has no fast path (None: it has one)."""
    if ad.family.no_fast_path is not None:
        return ad.family.no_fast_path
    if input_ids is not None:
        groups = ad.token_groups(input_ids)
        img = groups["image"][0]
        if bool(img.any()):
            end = int(img.nonzero().max()) + 1
            if bool(groups["sees_image"][0, :end].any()):
                return _SPLIT
    return None


def check_masks(masks, ad) -> torch.Tensor:
    """bool [M, L, H] on the host (True = ablated)."""
    masks = torch.as_tensor(masks)
    if masks.numel() == 0:
        raise HeadsteerError("masks holds no mask (M = 0): give at least one, bool [M, layers, heads]")
    if masks.is_floating_point():
        raise HeadsteerError("masks must be bool (True = ablated); got floats — threshold them, e.g. masks > 0.5")
    masks = masks.bool().cpu()
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (ad.num_layers, ad.num_heads):
        raise HeadsteerError(f"masks must be bool [M, {ad.num_layers}, {ad.num_heads}] (True = ablated); got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise HeadsteerError("masks holds no mask (M = 0): give at least one, bool [M, layers, heads]")
    return masks


def _model_device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def auto_chunk(model, prefix_len: int, suffix_len: int, ad, state_bytes: int = 0) -> int:
    """Masks per batch: 256 on the CPU; on a GPU as many as about half the free memory holds
    (fp32 attention scores of the suffix over the prefix, twice, as the fp32 blocks need where no fused
    kernel serves — an over-estimate where one does — plus the suffix activations, plus
    ``state_bytes``: one mask's recurrent state in the largest recurrent layer of a hybrid stack, which
    each mask reads as its own copy and updates for itself), at most 1,024: a 7B model's forward is
    already compute-bound at 256, and larger batches only raise the peak memory."""
    device, dtype = _model_device_dtype(model)
    if device.type != "cuda":
        return 256
    free, _ = torch.cuda.mem_get_info(device)
    tc = model.config.get_text_config()
    width = getattr(tc, "hidden_size", ad.num_heads * ad.head_dim)
    inter = getattr(tc, "intermediate_size", 4 * width) or 4 * width
    per_mask = (2 * 4 * ad.num_heads * suffix_len * (prefix_len + suffix_len)  # scores, fp32
                + suffix_len * (8 * width + 3 * inter) * dtype.itemsize  # activations
                + 4 * getattr(tc, "vocab_size", 32000)  # last-position logits, fp32
                + 4 * state_bytes)  # the prefix state's per-batch copy, the updated state, the kernels' temporaries
    return int(max(8, min(1024, (free // 2) // per_mask // 8 * 8)))


class _SharedPrefix:
    """The fast path's work for one prompt, done once: the prefix's K/V (and recurrent states), the
    suffix tokens (or embeddings), the positions the model gives them."""

    def __init__(self, model, ad, inputs, fused: bool):
        ids = inputs["input_ids"]
        img = ad.image_mask(ids)[0]
        if not bool(img.any()):
            raise HeadsteerError("the prompt has no image tokens: give an image")
        self.P = int(img.nonzero().max()) + 1
        if self.P >= ids.shape[1]:
            raise HeadsteerError("the prompt ends with the image: there is no text after it to ablate")
        device, dtype = _model_device_dtype(model)
        self.positions = None
        # A plain DynamicCache keeps every prefix position, also for sliding-window layers; the
        # prefix runs under the same attention arithmetic as every ablated forward.
        with torch.no_grad(), tf32_for(dtype, device), intervene(model, fp32_attention=True):
            if ad.own_positions and not ad.hybrid:
                # Positions come from the whole prompt's layout (3D RoPE: the image grid, the markers
                # after it): run the whole prompt once, keep the positions the model gave its language
                # model and the prefix part of the cache (the prefix is causal, so it is the same).
                filled = DynamicCache()  # filled in place (not every family returns it as out.cache)
                pos = _with_positions(model, ad, dict(inputs, cache=filled, use_cache=True, logits_to_keep=1))
                self.positions = pos[..., self.P :]
                cache = PrefixCache(filled, self.P)
            else:
                pre = {k: (v[:, : self.P] if k in _SEQ_KEYS and torch.is_tensor(v) else v) for k, v in inputs.items()}
                if ad.own_positions:
                    # A recurrent state cannot be cut back to the prefix as K/V can: the positions come
                    # from the whole prompt, the cache from a forward of the prefix alone.
                    pos = _with_positions(model, ad, dict(inputs, use_cache=False, logits_to_keep=1))
                    self.positions, pre["position_ids"] = pos[..., self.P :], pos[..., : self.P]
                filled = filling_cache(model) if ad.hybrid else DynamicCache()
                model(**pre, cache=filled, use_cache=True, logits_to_keep=1)
                cache = HybridPrefixCache(filled) if ad.hybrid else PrefixCache(filled)
            self.suffix_embeds = None
            if ad.family.suffix_embeds:
                got = _language_model_inputs(model, ad, dict(inputs, use_cache=False, logits_to_keep=1))
                self.suffix_embeds = got["inputs_embeds"][:, self.P :]
        self.prefix = Prefix(cache, img[: self.P], fused=fused)
        self.suffix = ids[:, self.P :]
        self.state_bytes = _state_bytes(cache)

    def batch_inputs(self, m: int) -> dict:
        """The model's keyword arguments for a batch of ``m`` masks over the suffix."""
        if self.suffix_embeds is None:
            kw = {"input_ids": self.suffix.expand(m, -1)}
        else:
            kw = {"inputs_embeds": self.suffix_embeds.expand(m, -1, -1)}
        if self.positions is not None:
            kw["position_ids"] = self.positions.expand(*self.positions.shape[:-2], m, -1)
        cache = self.prefix.cache
        # recurrent states are viewed at this batch's size
        kw["cache"] = cache.at_batch(m) if isinstance(cache, HybridPrefixCache) else cache
        return kw


class AblationRunner:
    """Logits of one prompt under many head-ablation masks (True = ablated), by the fast path where the
    family and the prompt's layout allow it and by the naive reference path elsewhere.

    The constructor does no work; ``prepare(image, question)`` (or ``prepare(inputs=...)``) encodes the
    prompt and, on the fast path, runs its prefix once; ``runner(masks)`` then gives last-position
    logits [M, vocab] (CPU float32), or what ``reduce`` makes of each batch's logits on the device.

    ``baseline``: "mean", "blank", "zero" or a ``Baseline``; ``fast``: None (wherever it can), False
    (always the naive path: the reference, or a run whose self-check found the fast path wrong), True
    (the fast path or a one-line refusal); ``chunk``: masks per batch (None: from free GPU memory);
    ``fused``: let a fused flash kernel serve the prefix block where one does (False: every block in
    headsteer's own fp32 arithmetic, e.g. to compare the two)."""

    def __init__(self, model, processor=None, baseline="mean", *, fast: bool | None = None, chunk: int | None = None,
                 fused: bool = True, dataset=None):
        self.model, self.processor = model, processor
        self.ad = get_adapter(model, processor)
        self._baseline, self._dataset = baseline, dataset
        self.fast, self.chunk, self.fused = fast, chunk, fused
        self.inputs = None
        self._shared: _SharedPrefix | None = None

    @property
    def baseline(self) -> Baseline:
        """The baseline, made on first use (a mean baseline runs the model over its reference images)."""
        if not isinstance(self._baseline, Baseline):
            self._baseline = as_baseline(self.model, self.processor, self._baseline, self._dataset)
        return self._baseline

    @property
    def path(self) -> str:
        """"fast" or "naive": the path ``__call__`` takes for the prepared prompt."""
        if self.inputs is None:
            raise HeadsteerError("call prepare(image, question) first")
        return "fast" if self._shared is not None else "naive"

    @property
    def prefix(self) -> Prefix | None:
        """The fast path's shared prefix of the prepared prompt (None on the naive path)."""
        return self._shared.prefix if self._shared is not None else None

    def prepare(self, image=None, question=None, *, inputs=None) -> "AblationRunner":
        """Encode one prompt (or take the processor's ``inputs`` of one) and, on the fast path, run its
        prefix. Returns the runner."""
        self.inputs = inputs if inputs is not None else self.ad.encode([image], [question])
        ids = self.inputs["input_ids"]
        if ids.shape[0] != 1:
            raise HeadsteerError("a runner takes one prompt at a time")
        self._shared = None
        if self.fast is False:
            return self
        reason = fast_path_refusal(self.ad, ids)
        if reason is not None:
            if self.fast:
                raise HeadsteerError(f"no fast path for {self.ad.model_type}: {reason}; use fast=False")
            return self
        self._shared = _SharedPrefix(self.model, self.ad, self.inputs, self.fused)
        return self

    @property
    def prefix_length(self) -> int:
        """Tokens of the shared prefix (up to the last image token), on the fast path."""
        return self._shared.P

    @property
    def suffix_ids(self) -> torch.Tensor:
        """The text suffix's token ids [1, s], on the fast path."""
        return self._shared.suffix

    @property
    def batch_size(self) -> int:
        """Masks per batch on the fast path (``chunk``, or from free GPU memory)."""
        sh = self._shared
        return self.chunk or auto_chunk(self.model, sh.P, sh.suffix.shape[1], self.ad, sh.state_bytes)

    @torch.no_grad()
    def attention_to_image(self):
        """float [L, H]: each head's attention weight from the last position to the image, on the
        prepared prompt (the paper's attention baseline)."""
        rec = Recorder(self.ad.num_layers, self.ad.num_heads)
        with intervene(self.model, recorder=rec):
            self.model(**self.inputs, logits_to_keep=1)
        return rec.mean("last").float().numpy()

    def use_naive(self) -> None:
        """From now on, the naive path (the run's self-check found the fast path wrong)."""
        self.fast, self._shared = False, None

    @torch.no_grad()
    def __call__(self, masks, reduce=None) -> torch.Tensor:
        """``reduce``: applied on the device to each batch's [m, vocab] float32 logits, so that only
        what the caller needs crosses to the host (on a 7B model, copying every vocabulary logit took
        a sixth of the fast path's time)."""
        masks = check_masks(masks, self.ad)
        if self.path == "naive":
            return naive_logits(self.model, self.processor, self.inputs, masks, self.baseline, reduce)
        sh = self._shared
        device, dtype = _model_device_dtype(self.model)
        chunk = self.batch_size
        outs = []
        with tf32_for(dtype, device):
            for i in range(0, len(masks), chunk):
                m = masks[i : i + chunk]
                with intervene(self.model, Spec(ablate=m, baseline=self.baseline, prefix=sh.prefix)):
                    logits = self.model(use_cache=True, logits_to_keep=1, **sh.batch_inputs(len(m))).logits
                last = logits[:, -1].float()
                outs.append(last if reduce is None else reduce(last))
        return torch.cat(outs).cpu()

    def gradients(self, weights, stat, path: str = "output", grad_drop=None):
        """Gradients of a statistic with respect to how far each head is ablated: ``weights`` float
        [M, L, H] (0 = clean, 1 = ablated; one row per forward), ``stat`` maps a batch's last-position
        logits [m, vocab] (fp32, on the device) to [m], or to [m, C] (C outputs: one backward pass each);
        ``path``: how a head moves from clean to ablated (``headsteer.ablation.interpolate``);
        ``grad_drop``: long [M], a decoder layer per row whose residual contribution passes no gradient
        (GradDrop; -1: none). Returns (d stat / d weights float32 [M, L, H] or [M, C, L, H], stat float32
        [M] or [M, C]) on the host.

        Only the weights are differentiated: the parameters' ``requires_grad`` is left as it is, the graph
        is freed batch by batch, nothing is kept. On the fast path gradients flow through the text
        suffix only (the shared prefix holds no graph); the naive path runs one full forward and backward
        per row. A non-finite gradient (fp16 overflow) is a one-line error."""
        ad = self.ad
        weights = torch.as_tensor(weights, dtype=torch.float32).cpu()
        if weights.ndim != 3 or tuple(weights.shape[1:]) != (ad.num_layers, ad.num_heads) or not len(weights):
            raise HeadsteerError(f"weights must be float [M, {ad.num_layers}, {ad.num_heads}]; got {tuple(weights.shape)}")
        drop = None if grad_drop is None else torch.as_tensor(grad_drop).long().cpu()
        device, dtype = _model_device_dtype(self.model)
        # a graph keeps every layer's activations and fp32 scores per row (about 0.4 GB per row on a 7B
        # model with a 19-token suffix): 32 rows per batch, whatever the memory a no-grad batch could take
        chunk = min(self.batch_size, GRAD_ROWS) if self.path == "fast" else 1
        grads, values = [], []
        with torch.enable_grad(), tf32_for(dtype, device):
            for i in range(0, len(weights), chunk):
                w = weights[i : i + chunk].to(device).requires_grad_(True)
                spec = Spec(ablate_weight=w, baseline=self.baseline, interpolation=path,
                            grad_drop=None if drop is None else drop[i : i + chunk])
                if self.path == "fast":
                    spec.prefix = self._shared.prefix
                    kw = dict(use_cache=True, **self._shared.batch_inputs(len(w)))
                else:
                    kw = dict(self.inputs)
                with intervene(self.model, spec):
                    y = stat(self.model(logits_to_keep=1, **kw).logits[:, -1].float())
                outs = [y] if y.ndim == 1 else list(y.unbind(1))
                g = [torch.autograd.grad(o.sum(), w, retain_graph=j < len(outs) - 1)[0] for j, o in enumerate(outs)]
                grads.append((g[0] if y.ndim == 1 else torch.stack(g, 1)).detach().float().cpu())
                values.append(y.detach().float().cpu())
                del y, g, w, outs
        grads, values = torch.cat(grads), torch.cat(values)
        if not bool(torch.isfinite(grads).all() and torch.isfinite(values).all()):
            raise HeadsteerError(f"the gradients of the statistic are not finite in {str(dtype).removeprefix('torch.')} "
                                 "(the backward pass overflowed): load the model in bf16 or fp32 (--dtype bf16)")
        return grads, values

    def check_fast_path(self, floor: float = 0.0, rate: float = 0.1, n_masks: int = 4, seed: int = 0) -> dict | None:
        """The run-time check of the fast path on the prepared prompt (``headsteer.selfcheck``): fast
        against naive on ``n_masks`` masks (no head, every head, random ones at ``rate``); a failure
        switches this runner to the naive path. None where the prompt takes the naive path anyway."""
        if self.path != "fast":
            return None
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        masks = torch.rand(n_masks, self.ad.num_layers, self.ad.num_heads, generator=g) < rate
        masks[0], masks[1] = False, True
        try:
            fast = self(masks)
        except Exception as e:  # a fast path that cannot even run here is a failed check, not a crash
            out = _failed(e)
        else:
            naive = naive_logits(self.model, self.processor, self.inputs, masks, self.baseline)
            out = compare(fast, naive, _model_device_dtype(self.model)[1], floor)
        out.update(masks=n_masks, seconds=round(time.perf_counter() - t0, 3))
        if not out["passed"]:
            self.use_naive()
        return out

    def prepare_checked(self, inputs) -> dict | None:
        """``prepare(inputs=...)`` for a run's self-check: a fast path whose prefix cannot even be built
        here is a failed check (its figures are returned, the runner goes naive), not a crash. Bad input
        (``HeadsteerError``) still stops the run."""
        try:
            self.prepare(inputs=inputs)
        except HeadsteerError:
            raise
        except Exception as e:
            self.fast, self._shared = False, None
            self.prepare(inputs=inputs)
            return _failed(e)
        return None


def _failed(e: Exception) -> dict:
    return {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _state_bytes(cache) -> int:
    """One mask's recurrent state in the largest recurrent layer of a prefix cache (0 without any)."""
    sizes = [sum(t.numel() * t.element_size() for d in (lay.conv_states, lay.recurrent_states) for t in d.values()
                 if t is not None) for lay in cache.layers if hasattr(lay, "recurrent_states")]
    return max(sizes, default=0)


def _language_model_inputs(model, ad, inputs) -> dict:
    """The keyword arguments the model passed to its language model in one forward."""
    got = {}

    def hook(mod, args, kwargs):
        if not got:
            got.update(kwargs)

    handle = ad.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return got


def _with_positions(model, ad, inputs):
    """The position ids the model passed to its language model in one forward."""
    pos = _language_model_inputs(model, ad, inputs).get("position_ids")
    if pos is None:
        raise HeadsteerError(f"{ad.model_type}: the model gave its language model no position ids; use fast=False")
    return pos


@torch.no_grad()
def naive_logits(model, processor, inputs, masks, baseline, reduce=None) -> torch.Tensor:
    """The reference path: a full forward (vision tower included) per mask. CPU float32 [M, vocab],
    or what ``reduce`` makes of them on the device (as in ``AblationRunner``)."""
    ad = get_adapter(model, processor)
    masks = check_masks(masks, ad)
    device, dtype = _model_device_dtype(model)
    out = []
    with tf32_for(dtype, device):
        for m in masks:
            with intervene(model, ablate=m[None], baseline=baseline):
                out.append(model(**inputs, logits_to_keep=1).logits[:, -1].float())
    out = torch.cat(out)
    return (out if reduce is None else reduce(out)).cpu()


def ablated_logits(model, processor, image, question, masks, baseline="mean", fast=True, chunk=None):
    """Float tensor [M, vocab] on the host: last-position logits of (image, question) with each
    mask's heads ablated (``masks`` bool [M, L, H], True = ablated). ``baseline``: "mean",
    "blank", "zero" or a ``Baseline``. ``fast=False`` runs the naive reference path (``fast=True``:
    the fast path wherever the family and prompt allow it).

    >>> import torch, headsteer
    >>> from headsteer.ask import default_image
    >>> model, processor = headsteer.load("default")
    >>> masks = torch.zeros(3, 4, 8, dtype=torch.bool); masks[1, 2] = True   # none, layer 2's heads, ...
    >>> ablated_logits(model, processor, default_image(), "what shape is in the image?", masks, "zero").shape[0]
    3
    """
    runner = AblationRunner(model, processor, baseline, fast=None if fast else False, chunk=chunk)
    check_masks(masks, runner.ad)  # before any work
    return runner.prepare(image, question)(masks)
