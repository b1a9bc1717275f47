"""The one per-head intervention layer: ``with intervene(model, spec): ...``.

An intervention switches the text model to headsteer's attention function (headsteer/attention.py,
which falls through to the model's own backend wherever a layer has nothing to do) and adds a forward
pre-hook on each layer's output projection (per-head output scaling and steering). Ablation, knockout,
image-attention scaling, head scaling/steering, attention recording and the fast path's shared prefix
are all fields of one ``Spec`` (headsteer/spec.py). Leaving the ``with`` block — normally, by an
exception, or by one raised while entering — restores the model exactly.

Per batch element and per *query* head: under grouped-query attention the shared KV head is only
replaced for the query heads that are selected. Cross-attention families (``Adapter.cross_attention``)
have no image positions in the text: ablation acts on the cross-attention layers, whose keys/values all
come from the image; knockout and image-attention scaling are refused there.

What an open intervention writes on the user's model: the text configs' attention implementation
name (transformers' documented switch), forward hooks, and one attribute per text attention module
(``attention.LAYER_ATTR``) through which the attention function finds the open session — transformers
hands an attention function nothing else that could. All of it is undone on exit.
"""
from __future__ import annotations

import contextlib

import torch

from .adapters import Adapter, cached_adapter, get_adapter
from .attention import LAYER_ATTR, Recorder
from .errors import HeadsteerError
from .fastpath import seen_tokens
from .spec import ActiveSpec, Knockout, Spec, compile_spec

__all__ = ["Intervention", "Knockout", "Recorder", "Spec", "installed_labels", "intervene", "is_intervened"]


class _Session:
    """What is active on one model while at least one intervention is open on it. It is opened by the
    outermost intervention (which owns what it installs) and reached through the attention modules."""

    def __init__(self, adapter: Adapter):
        self.ad = adapter
        self.actives: list[ActiveSpec] = []
        self.labels: list = []  # per open intervention: what it is (an installed edit's fingerprint), or None
        self.recorders: list[Recorder] = []
        self.object_patches: list = []
        self.captures: list[dict] = []
        self.groups: dict | None = None
        self.past = 0  # tokens seen before the current forward (set by the groups hook)
        self.kept_prefill: dict[int, int] = {}  # model layer -> prompt keys its cache always keeps (set there too)
        self.oproj_handles: list = []

    @property
    def recorder(self) -> Recorder | None:
        return self.recorders[-1] if self.recorders else None

    @property
    def capture(self) -> dict | None:
        return self.captures[-1] if self.captures else None

    def ablating(self) -> ActiveSpec | None:
        """The open spec that ablates heads (its ``ablation``), or None; two at once are refused."""
        abl = [a for a in self.actives if a.ablation is not None]
        if len(abl) > 1:
            raise HeadsteerError("two active interventions both ablate heads; combine their masks into one Spec")
        return abl[0] if abl else None

    def prefix(self):
        pre = [a.prefix for a in self.actives if a.prefix is not None]
        if len(pre) > 1:
            raise HeadsteerError("two fast-path prefixes are active at once; run one AblationRunner at a time")
        return pre[0] if pre else None

    def groups_for(self, active: ActiveSpec | None):
        """The token groups an active spec reads: its own (``Spec.groups``), else the forward's."""
        g = active.groups if active is not None and active.groups is not None else self.groups
        if g is None:
            raise HeadsteerError("this intervention needs token positions: call the model with input_ids or give Spec(groups=...)")
        return g

    def layer_active(self, layer: int, dtype) -> bool:
        if self.recorder is not None:
            return True
        for a in self.actives:
            if a.edits_attention or (a.ablation is not None and a.ablation.acts_on(layer)):
                return True
        if dtype != torch.float32:  # the precision policy: one arithmetic for every layer
            return any(a.attention_level for a in self.actives)
        return False

    def needs_oproj_hooks(self) -> bool:
        return any(a.head_scale is not None or a.head_add is not None for a in self.actives)


def _session_of(model) -> _Session | None:
    ad = cached_adapter(model)
    entry = ad.attention[0].__dict__.get(LAYER_ATTR) if ad is not None else None
    return entry[0] if entry is not None else None


def _oproj_hook(session: _Session, layer: int):
    def hook(mod, args):
        x = args[0]
        B, T, _ = x.shape
        H = session.ad.num_heads
        h = x.view(B, T, H, -1)
        for a in session.actives:
            if a.head_scale is not None:
                s = a.head_scale[..., layer, :].to(x.device, x.dtype)  # [H] or [B|1, H]
                h = h * (s.reshape(-1, 1, H, 1) if s.ndim == 2 else s[None, None, :, None])
            if a.head_add is not None:
                h = h + a.head_add[layer].to(x.device, x.dtype)[None, None]
        return (h.reshape(B, T, -1),) + tuple(args[1:])

    return hook


def _batch_rows(t) -> int | None:
    """Rows of a per-example tensor of a Spec (None where it is one for every example)."""
    return int(t.shape[0]) if torch.is_tensor(t) and t.ndim == 3 else None


def check_batch(session: _Session, batch: int):
    """Every per-example part of the open specs fits the batch the model is called with: one row per
    example, or one for all. Checked when the forward starts (a Spec does not know the batch it will
    meet), so a mismatch is one line here, not a shape error deep in a linear layer."""
    for a in session.actives:
        parts = [("head_scale", _batch_rows(a.head_scale)), ("ablate", _batch_rows(a.ablation.mask) if a.ablation else None)]
        for ko in a.knockouts:
            parts += [("Knockout heads", _batch_rows(ko.heads if torch.is_tensor(ko.heads) else None))]
            parts += [(f"Knockout {n}", int(t.shape[0])) for n, t in (("src", ko.src), ("dst", ko.dst)) if torch.is_tensor(t)
                      and t.ndim == 2]
        for name, rows in parts:
            if rows is not None and rows not in (1, batch):
                raise HeadsteerError(f"{name} has {rows} rows (one per example) but the model is called on a batch of "
                                     f"{batch}: give {batch} rows, or one for every example")


def _groups_hook(session: _Session):
    def hook(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if torch.is_tensor(ids) else kwargs.get("inputs_embeds")
        if torch.is_tensor(ref) and ref.ndim >= 2:
            check_batch(session, int(ref.shape[0]))
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # Tokens seen before this forward: a sliding-window layer's cache keeps only the last
        # keys, and groups are aligned by absolute position (see attention.key_positions).
        session.past = seen_tokens(cache)
        # cache layers that keep the whole prompt besides their window (reference sliding window)
        session.kept_prefill = {i: n for i, lay in enumerate(getattr(cache, "layers", None) or [])
                                if isinstance(n := getattr(lay, "prefill_length", None), int)}
        if ids is None or (session.past > 0 and session.groups is not None):
            return None  # decoding: keep the prompt's groups; new tokens count as text after the image
        am = kwargs.get("attention_mask")
        patches = session.object_patches[-1] if session.object_patches else None
        session.groups = session.ad.token_groups(ids, am, patches)
        if session.ablating() is not None and _padded_before_text(am) and kwargs.get("position_ids") is None:
            # Positions count real tokens only, so that a padded row sees the same rotary phases
            # as the same prompt alone — and as the baseline's keys.
            pos = session.ad.padded_position_ids(am)
            if pos is not None:
                kwargs["position_ids"] = pos
                return args, kwargs
        return None

    return hook


def _grad_drop_hook(rows: torch.Tensor):
    """GradDrop for one decoder layer: in the batch rows ``rows`` (bool [B]) the layer's output becomes
    ``out.detach() + (in - in.detach())`` — the same values (the added term is exactly 0) with the
    gradient passing only along the residual stream, none through what the layer added to it."""
    def hook(mod, args, kwargs, output):
        h_in = args[0] if args else kwargs.get("hidden_states")
        h_out = output[0] if isinstance(output, tuple) else output
        if not torch.is_grad_enabled() or not torch.is_tensor(h_in) or h_in.shape != h_out.shape:
            return None
        if h_out.shape[0] != len(rows):
            raise HeadsteerError(f"grad_drop names {len(rows)} batch rows; this forward has {h_out.shape[0]}")
        drop = rows.to(h_out.device).view(-1, *([1] * (h_out.ndim - 1)))
        new = torch.where(drop, h_out.detach() + (h_in - h_in.detach()), h_out)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _padded_before_text(am) -> bool:
    """A pad before some real token: left padding, or the gap that the BLIP-2/InstructBLIP processors
    leave between the image tokens they prepend and the left-padded text."""
    if am is None or am.ndim != 2:
        return False
    real_later = am.flip(-1).cumsum(-1).flip(-1) > 0  # a real token at or after this position
    return bool(((am == 0) & real_later).any())


class Intervention:
    """``with intervene(model, spec) as iv:`` — an open intervention on one model.

    Contexts nest: specs stack (scales multiply, additions add, knockouts accumulate). Leaving a
    context (normally or by an exception, also one raised while entering) undoes exactly what it
    did; the outermost one restores the model's attention implementation."""

    def __init__(self, model, spec: Spec, processor=None, object_patches=None, recorder=None, capture=None, label=None):
        self.model = model
        self.spec = spec
        self._ad = get_adapter(model, processor)
        self._active = compile_spec(spec, self._ad)
        self._extras = (object_patches, recorder, capture)
        self._label = label
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Intervention":
        if self._stack is not None:
            raise HeadsteerError("this intervention is already active; create a new one with intervene(...)")
        stack = contextlib.ExitStack()
        try:
            session = _session_of(self.model)
            if session is None:
                session = self._open_session(stack)
            _push(stack, session.actives, self._active)
            _push(stack, session.labels, (self._active, self._label))
            object_patches, recorder, capture = self._extras
            if object_patches is not None:
                _push(stack, session.object_patches, object_patches)
            if recorder is not None:
                _push(stack, session.recorders, recorder)
            if capture is not None:
                _push(stack, session.captures, capture)
            if self._active.grad_drop is not None:  # hooks of this intervention alone, removed with it
                for i, layer in enumerate(self._ad.language_model.layers):
                    rows = self._active.grad_drop == i
                    if bool(rows.any()):
                        stack.callback(layer.register_forward_hook(_grad_drop_hook(rows), with_kwargs=True).remove)
            if session.needs_oproj_hooks() and not session.oproj_handles:
                stack.callback(_remove_hooks, session.oproj_handles)
                for i in range(self._ad.num_layers):
                    session.oproj_handles.append(self._ad.out_proj(i).register_forward_pre_hook(_oproj_hook(session, i)))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _open_session(self, stack: contextlib.ExitStack) -> _Session:
        model, ad = self.model, self._ad
        session = _Session(ad)
        for cfg in {id(m.config): m.config for m in ad.attention}.values():
            impl = cfg._attn_implementation
            base = impl.removeprefix("headsteer_") if impl and impl.startswith("headsteer_") else impl
            stack.callback(setattr, cfg, "_attn_implementation_internal", impl)
            cfg._attn_implementation_internal = "headsteer_eager" if base == "eager" else "headsteer_sdpa"
        for i, m in enumerate(ad.attention):
            stack.callback(m.__dict__.pop, LAYER_ATTR, None)
            m.__dict__[LAYER_ATTR] = (session, i)
        stack.callback(model.register_forward_pre_hook(_groups_hook(session), with_kwargs=True).remove)
        return session

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return False


def _push(stack, items: list, item):
    items.append(item)
    stack.callback(_remove_item, items, item)


def _remove_item(items: list, item):
    for i in range(len(items) - 1, -1, -1):
        if items[i] is item:
            del items[i]
            return


def _remove_hooks(handles: list):
    for h in handles:
        h.remove()
    handles.clear()


def is_intervened(model) -> bool:
    """True while an intervention (an edit applied as hooks, an ablation ...) is active on ``model``:
    its outputs then differ from what its weights alone say."""
    session = _session_of(model)
    return session is not None and bool(session.actives)


def installed_labels(model) -> list:
    """What each open intervention on ``model`` is, in order: the ``label`` it was opened with (an
    installed edit's fingerprint, see headsteer.edit.install_edit), or None for an unlabelled one."""
    session = _session_of(model)
    return [label for _, label in session.labels] if session is not None else []


def intervene(model, spec: Spec | None = None, *, processor=None, object_patches=None, recorder: Recorder | None = None,
              capture: dict | None = None, label=None, **fields) -> Intervention:
    """``with intervene(model, Spec(...)): model(**inputs)`` — or pass the Spec fields as keywords.

    ``recorder`` collects attention mass on image keys; ``capture`` (a dict) receives each text
    layer's (key, value) after rotary embedding, by layer index; ``label``: what this intervention is,
    for a run folder's identity (``installed_labels``).

    >>> import torch, headsteer
    >>> from headsteer.ask import default_image
    >>> model, processor = headsteer.load("default")
    >>> ad = headsteer.get_adapter(model, processor)
    >>> inputs = ad.encode([default_image()], ["what shape is in the image?"])
    >>> with torch.no_grad(), intervene(model, head_scale=torch.zeros(ad.num_layers, ad.num_heads)):
    ...     silenced = model(**inputs).logits[0, -1]
    >>> with torch.no_grad():
    ...     torch.equal(model(**inputs).logits[0, -1], silenced)   # restored on exit
    False
    """
    if spec is not None and fields:
        raise HeadsteerError("give either a Spec or its fields as keywords, not both")
    return Intervention(model, spec if spec is not None else Spec(**fields), processor, object_patches, recorder, capture,
                        label)
