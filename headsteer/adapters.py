"""Architecture adapters: where a VLM keeps its language-model attention, how many heads it has,
and which sequence positions are image, question, role and last tokens.

One generic adapter covers every family whose text backbone uses transformers' attention interface;
families differ only in a few facts (positions, prompt format, processor calls), kept in each family's
record (``headsteer.families.Family``), which the adapter holds as ``Adapter.family``.
In the cross-attention families (``Family.cross``) the text has no image positions: the image
reaches it only through cross-attention layers, and the heads headsteer ranks and edits are those
layers' query heads (``Adapter.attention`` holds the cross-attention modules only).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import ProcessorMixin

from .errors import HeadsteerError
from .families import Family, family, supported_families
from .images import open_image
from .questions import check_question
from .versions import warn_untested_transformers

_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense")


def _language_model(model: nn.Module) -> nn.Module:
    for path in ("model.language_model", "language_model", "model.text_model", "model", "language_model.model.decoder",
                 "language_model.model"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module) and hasattr(obj, "layers"):
            return obj
    raise HeadsteerError(f"cannot find the language model inside {type(model).__name__}; supported families: {supported_families()}")


def _attention_class(lm: nn.Module):
    rec = getattr(lm, "_can_record_outputs", None) or {}
    target = rec.get("attentions")
    if target is None:
        return None
    return getattr(target, "target_class", target)


@dataclass
class Adapter:
    """Facts about one loaded model, found once and used by every intervention."""

    model: nn.Module = field(repr=False)
    model_type: str
    family: Family = field(repr=False)
    attention: list = field(repr=False)  # attention modules of the language model, in layer order
    num_heads: int
    num_kv_heads: int
    head_dim: int
    image_token_id: int
    pad_token_id: int | None = None
    processor: object = field(default=None, repr=False)
    video_token_id: int | None = None  # video frames are image tokens too
    language_model: nn.Module | None = field(default=None, repr=False)
    gates: list | None = field(default=None, repr=False)  # cross-attention families: each layer's gate parameter

    @property
    def cross_attention(self) -> bool:
        """True when the text reads the image only through cross-attention layers (``Family.cross``):
        ``attention`` holds those layers' modules, every key they read is an image token and every
        query a text position."""
        return self.gates is not None

    @property
    def own_positions(self) -> bool:
        """True where the model's forward computes positions from the token layout (``Family.own_positions``)."""
        return self.family.own_positions

    @property
    def num_layers(self) -> int:
        """Attention layers of the language model that headsteer acts on. In hybrid stacks (some layers
        recurrent or convolutional) heads exist only in the attention layers, and in cross-attention
        families only the cross-attention layers carry the image: there a HeadSet's layer index
        ``L<i>`` is the index among those layers; ``model_layer(i)`` gives the model's own index."""
        return len(self.attention)

    def model_layer(self, layer: int) -> int:
        """The model's own index of layer ``layer`` (differs in hybrid stacks and cross-attention families)."""
        return self.attention[layer].layer_idx

    @property
    def hybrid(self) -> bool:
        """True when only some decoder layers are attention layers (the others recurrent/convolutional)."""
        return not self.cross_attention and len(self.attention) < self.text_config.num_hidden_layers

    @property
    def text_config(self):
        return self.attention[0].config

    def out_proj(self, layer: int) -> nn.Linear:
        mod = self.attention[layer]
        for name in _OUT_PROJ_NAMES:
            if isinstance(getattr(mod, name, None), nn.Linear):
                return getattr(mod, name)
        raise HeadsteerError(f"{type(mod).__name__} has no output projection ({'/'.join(_OUT_PROJ_NAMES)})")

    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids for a left-padded batch, counted from each row's first real token as
        ``generate`` does, so a padded row equals the same prompt alone — or None where the family
        computes its positions itself (multimodal RoPE)."""
        if self.own_positions:
            return None
        start = self.family.position_base
        return (attention_mask.long().cumsum(-1) - 1 + start).clamp(min=start)

    # -- positions ---------------------------------------------------------------------------
    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: positions holding image (or video-frame) features — in a cross-attention
        family, the image placeholder token (a text position: the features are cross-attention keys)."""
        img = input_ids == self.image_token_id
        return img if self.video_token_id is None else img | (input_ids == self.video_token_id)

    def token_groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     object_patches: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named bool [B, T] position groups of a batch of prompts (left or right padded).

        ``after_image``: every real position after the last image token (the text the image flows
        into); ``sees_image``: every real text position after the *first* image token — also the
        tokens between image tiles or between several images, which read the image too (head
        ablation acts on these queries), and the marker opening a bidirectional image block
        (``Family.bidirectional_openers``); ``question``: those before the generation prompt; ``role``: the generation-prompt
        tokens (e.g. ``ASSISTANT`` ``:``) except the last token; ``last``: the final real token.
        ``object``/``background`` split the image tokens when ``object_patches`` (bool [B, n_img])
        is given.
        """
        B, T = input_ids.shape
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        image = self.image_mask(input_ids) & real
        idx = torch.arange(T, device=input_ids.device).expand(B, T)
        last_img = torch.where(image, idx, torch.full_like(idx, -1)).max(dim=1).values
        after = (idx > last_img[:, None]) & real & (last_img[:, None] >= 0)
        first_img = torch.where(image | self._opener_mask(input_ids), idx, torch.full_like(idx, T)).min(dim=1).values
        sees = (idx >= first_img[:, None]) & real & ~image
        last_pos = torch.where(real, idx, torch.full_like(idx, -1)).max(dim=1).values
        last = idx == last_pos[:, None]
        n_role = self.num_role_tokens()
        # role tokens: the generation prompt's tokens at the end, the last one excluded
        role = (idx >= (last_pos[:, None] - n_role + 1)) & (idx < last_pos[:, None]) & real
        special = self._special_mask(input_ids)
        question = after & ~role & ~last & ~special
        groups = {
            "image": image,
            "after_image": after,
            "sees_image": sees,
            "text": real & ~image,
            "question": question,
            "role": role & after,
            "last": last,
        }
        if object_patches is not None:
            obj = torch.zeros_like(image)
            for b in range(B):
                pos = image[b].nonzero().squeeze(-1)
                op = object_patches[b].to(input_ids.device).bool()
                if len(op) != len(pos):
                    raise HeadsteerError(f"object mask covers {len(op)} patches but the prompt has {len(pos)} image tokens")
                obj[b, pos[op]] = True
            groups["object"] = obj
            groups["background"] = image & ~obj
        return groups

    def _opener_mask(self, input_ids):
        """bool [B, T]: the markers opening a bidirectional image block (``Family.bidirectional_openers``)."""
        cfg = self.model.config
        ids = [getattr(cfg, a) for a in self.family.bidirectional_openers if getattr(cfg, a, None) is not None]
        return torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))

    def _special_mask(self, input_ids):
        tok = getattr(self.processor, "tokenizer", None)
        ids = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
        # tokens added as special that all_special_ids no longer lists: Idefics2Processor's two
        # add_special_tokens calls each replace the additional special tokens, dropping <fake_token_around_image>
        ids |= {i for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
        ids.add(self.image_token_id)
        if self.video_token_id is not None:
            ids.add(self.video_token_id)
        if self.pad_token_id is not None:
            ids.add(self.pad_token_id)
        return torch.isin(input_ids, torch.tensor(sorted(ids), device=input_ids.device))

    def num_role_tokens(self) -> int:
        """Tokens of the assistant-turn marker that ends a prompt (1 when unknown)."""
        if not hasattr(self, "_n_role"):
            self._n_role = 1
            tok = getattr(self.processor, "tokenizer", None)
            fam = self.family
            if tok is not None and fam.model_turn is not None:  # its template ends with this turn, flag or not
                self._n_role = max(1, len(tok(fam.model_turn, add_special_tokens=False).input_ids))
            elif tok is not None and getattr(self.processor, "chat_template", None):
                try:
                    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
                    with_gen = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                    without = self.processor.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
                    n = len(tok(with_gen, add_special_tokens=False).input_ids) - len(tok(without, add_special_tokens=False).input_ids)
                    self._n_role = max(1, n)
                except Exception:
                    pass
            elif tok is not None and fam.no_template_prompt[1]:
                self._n_role = max(1, len(tok(fam.no_template_prompt[1], add_special_tokens=False).input_ids))
        return self._n_role

    # -- prompts -----------------------------------------------------------------------------
    def prompt(self, question: str) -> str:
        """The model's own prompt for one image and a question: the chat template when it has one,
        else the family's own turns (``Family.no_template_prompt``); the question alone where the
        processor places the image itself (``Family.question_only``)."""
        proc = self.processor
        if proc is None:
            raise HeadsteerError("this model was loaded without a processor; pass processor= to build prompts")
        if self.family.question_only:
            return question
        if getattr(proc, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            try:
                return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # jinja2's SecurityError (a template escaping its sandbox), TemplateError ...
                why = " ".join(str(e).split())[:160]
                raise HeadsteerError(f"the processor's chat template failed ({type(e).__name__}: {why}): fix "
                                     "chat_template.jinja (or the chat_template in its processor files)") from None
        turn, gen = self.family.no_template_prompt
        return turn.format(image=getattr(proc, "image_token", "<image>"), question=question) + gen

    def answer_token_id(self, answer: str, question: str = "what is in the image?") -> int:
        """Id of the answer's first token as the model would emit it right after the prompt."""
        tok = self.processor.tokenizer
        prompt = self.prompt(question).replace(getattr(self.processor, "image_token", "<image>"), "")
        sep = "" if prompt[-1:].isspace() else " "
        base = tok(prompt, add_special_tokens=False).input_ids
        full = tok(prompt + sep + answer, add_special_tokens=False).input_ids
        if len(full) <= len(base) or full[: len(base)] != base:
            ids = tok(sep + answer, add_special_tokens=False).input_ids
            if not ids:
                raise HeadsteerError(f"answer {answer!r} has no tokens")
            return ids[0]
        return full[len(base)]

    def image_placeholder(self) -> str | None:
        """The text a chat-template prompt must hold where its image goes (the processor expands it into the
        image tokens), or None where headsteer builds the prompt itself or the processor places the image."""
        proc = self.processor
        if self.family.question_only or not getattr(proc, "chat_template", None):
            return None
        # Qianfan-OCR's prompt holds <image>, which its processor replaces by <img><IMG_CONTEXT>...</img>
        mark = getattr(proc, "image_placeholder_token", None) or getattr(proc, "image_token", None)
        return mark if isinstance(mark, str) and mark else None

    def _check_image_placeholder(self, prompts: list[str]):
        """Every prompt given an image holds the image placeholder: a chat template that drops the
        image part would otherwise build an image-less prompt (or meet the processor's own count error)."""
        mark = self.image_placeholder()
        bad = next((p for p in prompts if mark is not None and mark not in p), None)
        if bad is not None:
            raise HeadsteerError(f"the model's chat template (chat_template.jinja, or chat_template in its processor or "
                                 f"tokenizer config) rendered {bad[:80]!r} without the image placeholder {mark}: make it "
                                 'render {"type": "image"} content parts as ' + mark)

    def image_tokens(self) -> tuple[str, ...]:
        """The processor's own image (and video) placeholder strings, which a question must not hold."""
        proc = self.processor
        names = ("image_token", "video_token", "boi_token", "eoi_token", "image_start_token", "image_end_token")
        return tuple(sorted({t for t in (getattr(proc, n, None) for n in names) if isinstance(t, str) and t.strip()}))

    def check_question(self, question) -> str:
        """A question is text without an image placeholder, the generic ones or this processor's
        (the prompt template places the image: a placeholder in the text would add image positions
        without an image, or shift the image the processor expands)."""
        return check_question(question, placeholders=self.image_tokens())

    def context_limit(self) -> int | None:
        """The most tokens the text model takes: its config's ``max_position_embeddings`` (the
        positions it was built for), or the tokenizer's ``model_max_length`` where that is smaller
        (transformers' placeholder for "no limit" is about 1e30 and is ignored)."""
        limits = []
        tcfg = self.model.config.get_text_config()
        v = getattr(tcfg, "max_position_embeddings", None)
        if isinstance(v, int) and v > 0:
            limits.append(v)
        m = getattr(getattr(self.processor, "tokenizer", None), "model_max_length", None)
        if isinstance(m, int) and 0 < m < 10**9:
            limits.append(m)
        return min(limits) if limits else None

    def check_length(self, n_tokens: int) -> None:
        """Refuse a prompt longer than the model's context (counted after the processor expanded the
        image into its tokens): past it the positions are ones the model never learnt, and its
        answers mean nothing. Refused before any forward, so no memory is asked for."""
        limit = self.context_limit()
        if limit is not None and n_tokens > limit:
            raise HeadsteerError(f"the prompt is {n_tokens} tokens (image tokens included), longer than this model's context "
                                 f"of {limit}: shorten the question")

    def processor_kwargs(self) -> dict:
        """What the family's processor must be asked for besides images and text (``Family.ask_mm_token_types``)."""
        return {"return_mm_token_type_ids": True} if self.family.ask_mm_token_types else {}

    def encode(self, images, questions, device=None):
        """Processor inputs for a batch of (image, question), left-padded so the last real token is at -1."""
        proc = self.processor
        if isinstance(questions, str):
            questions, images = [questions], [images]
        if any(im is None for im in images):
            raise HeadsteerError("missing image: every question needs an image (a PIL image or a path)")
        if len(images) != len(questions):
            raise HeadsteerError(f"{len(images)} images for {len(questions)} questions: give one image per question")
        for q in questions:
            self.check_question(q)
        images = [open_image(im) for im in images]
        tok = proc.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            kw = self.processor_kwargs()
            if self.family.nested_images:
                images = [[im] for im in images]
            renames = self.family.own_prompt_outputs or {}
            call = partial(ProcessorMixin.__call__, proc) if renames else proc
            texts = [self.prompt(q) for q in questions]
            self._check_image_placeholder(texts)
            batch = call(images=images, text=texts, return_tensors="pt", padding=True, **kw)
            for ours, theirs in renames.items():
                if ours in batch:
                    batch[theirs] = batch.pop(ours)
        finally:
            tok.padding_side = old
        self.check_length(batch["input_ids"].shape[-1])
        dev = device or next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) if torch.is_tensor(v) else v for k, v in batch.items()}


def _kv_heads(mod: nn.Module, num_heads: int, head_dim: int) -> int | None:
    """KV heads of an attention module, from the module itself (a config's num_key_value_heads is
    not always used: Persimmon/Fuyu ignore it)."""
    groups = getattr(mod, "num_key_value_groups", None)
    if groups:
        return num_heads // groups
    k = getattr(mod, "k_proj", None)
    if isinstance(k, nn.Linear):
        return k.out_features // head_dim
    qkv = getattr(mod, "query_key_value", None)
    if isinstance(qkv, nn.Linear):
        return (qkv.out_features // head_dim - num_heads) // 2
    return None


def _token_id(processor, token: str) -> int:
    tok = getattr(processor, "tokenizer", None)
    tid = tok.convert_tokens_to_ids(token) if tok is not None else None
    return -1 if tid is None or tid == getattr(tok, "unk_token_id", None) else int(tid)


# model -> its Adapter: a cache of facts found once per model (not state that changes what a model does);
# weak, so it lives exactly as long as the model
_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_adapter(model) -> Adapter | None:
    """The adapter already made for ``model``, or None (never makes one)."""
    try:
        return _ADAPTERS.get(model)
    except TypeError:  # not weak-referenceable: not a model
        return None


def get_adapter(model: nn.Module, processor=None) -> Adapter:
    """The adapter of a loaded model (made once per model; a processor given later is attached)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise HeadsteerError(f"expected a transformers vision-language model (an nn.Module with a config); got "
                             f"{type(model).__name__}: load one with headsteer.load(...)")
    cached = _ADAPTERS.get(model)
    if cached is not None:
        if processor is not None and cached.processor is None:
            cached.processor = processor
            if cached.image_token_id < 0:
                cached.image_token_id = _token_id(processor, cached.family.cross.image_token)
        return cached
    warn_untested_transformers()
    cfg = model.config
    mtype = getattr(cfg, "model_type", type(model).__name__)
    fam = family(mtype, f" ({type(model).__name__})")
    for work_around in fam.compat:
        work_around(model)
    lm = _language_model(model)
    gates = None
    cross = fam.cross
    if cross is not None:
        blocks = [b for b in getattr(lm, cross.blocks, []) if isinstance(getattr(b, cross.module, None), nn.Module)]
        mods, gates = [getattr(b, cross.module) for b in blocks], [getattr(b, cross.gate) for b in blocks]
    else:
        cls = _attention_class(lm)
        mods = [m for m in lm.modules() if (isinstance(m, cls) if cls is not None else hasattr(m, "o_proj")) and hasattr(m, "layer_idx")]
        mods.sort(key=lambda m: m.layer_idx)
    if not mods:
        raise HeadsteerError(f"no attention modules found in {type(lm).__name__}")
    tcfg = cfg.get_text_config()
    image_token_id = next((getattr(cfg, a) for a in ("image_token_id", "image_token_index") if getattr(cfg, a, None) is not None), None)
    if image_token_id is None and cross is not None:
        # the image placeholder is only a text token here (no image positions): -1 until a processor names it
        image_token_id = _token_id(processor, cross.image_token)
    if image_token_id is None:
        raise HeadsteerError(f"{mtype}: config names no image token id (image_token_id / image_token_index)")
    video_token_id = next((getattr(cfg, a) for a in ("video_token_id", "video_token_index") if getattr(cfg, a, None) is not None), None)
    num_heads = tcfg.num_attention_heads
    head_dim = getattr(mods[0], "head_dim", None) or getattr(tcfg, "head_dim", None) or tcfg.hidden_size // num_heads
    num_kv = _kv_heads(mods[0], num_heads, head_dim) or getattr(tcfg, "num_key_value_heads", None) or num_heads
    ad = Adapter(model=model, model_type=mtype, family=fam, attention=mods, num_heads=num_heads, num_kv_heads=num_kv,
                 head_dim=head_dim, image_token_id=int(image_token_id),
                 pad_token_id=getattr(tcfg, "pad_token_id", None), processor=processor,
                 video_token_id=None if video_token_id is None else int(video_token_id), language_model=lm, gates=gates)
    _ADAPTERS[model] = ad
    return ad
