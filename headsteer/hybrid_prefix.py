"""The fast path's shared prefix for hybrid stacks (only some decoder layers are attention; the
others are gated delta-net, Mamba-2 or short-convolution layers, which carry a state instead of K/V).

Ablation never changes the prefix, so each recurrent layer's state at the end of the prefix is the
same for every mask, like the prefix K/V: it is computed once at batch 1 and kept there. A layer
reading it gets a per-batch copy (``HybridPrefixCache.get_recurrent_state``): some kernels update the
state they are given in place (Mamba-2's one-token step, Nemotron-H), which on a broadcast view
raises or, at batch 1, would overwrite the prefix. Nothing is written back, so batches never see
each other's suffix.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin, LinearAttentionLayer

from .errors import HeadsteerError
from .fastpath import _PrefixLayer


def filling_cache(model) -> DynamicCache:
    """An empty cache for the prefix forward of a hybrid stack: the model's own state layers for its
    recurrent layers, a plain ``DynamicLayer`` for every attention layer (it keeps every prefix
    position, also where the model's cache would keep only a sliding window)."""
    cache = DynamicCache(config=model.config)
    for i, lay in enumerate(cache.layers):
        state, kv = isinstance(lay, LinearAttentionCacheLayerMixin), isinstance(lay, CacheLayerMixin)
        if state and kv:
            raise HeadsteerError(f"layer {i} holds both a recurrent state and K/V ({type(lay).__name__}); use fast=False")
        if kv:
            cache.layers[i] = DynamicLayer()
    return cache


class _PrefixState(LinearAttentionLayer):
    """One recurrent layer's states at the end of the prefix, viewed at ``batch`` rows; read-only."""

    def __init__(self, filled: LinearAttentionCacheLayerMixin, batch: int):
        super().__init__(filled.number_of_states)
        # Views, not copies: update_* below never write into them, and a layer reading its recurrent
        # state gets a copy (HybridPrefixCache.get_recurrent_state); conv states are only read through
        # update_conv_state (record_past).
        self.conv_states = {i: _rows(s, batch) for i, s in filled.conv_states.items()}
        self.recurrent_states = {i: _rows(s, batch) for i, s in filled.recurrent_states.items()}
        self.is_conv_states_initialized = dict(filled.is_conv_states_initialized)
        self.is_recurrent_states_initialized = dict(filled.is_recurrent_states_initialized)
        self.has_previous_state = dict(filled.has_previous_state)
        self.conv_kernel_size = dict(filled.conv_kernel_size)
        self.dtype, self.device = filled.dtype, filled.device
        self.length = filled_length(filled)
        self.cumulative_length_linear = torch.tensor(self.length)  # what a re-view (at_batch) reads
        # A one-token suffix would otherwise take the models' decode kernel, which updates the conv
        # state in place; a layer that records its past gets the whole window through update_conv_state.
        self.record_past = True

    def get_seq_length(self) -> int:
        # transformers >= 5.25 asks a cache's layer 0 for the tokens seen, recurrent or not (5.24 skipped
        # to the first attention layer): the prefix length, fixed, since nothing is ever written here.
        return self.length

    def increase_count(self, state_idx: int):
        pass  # read-only: the count stays the prefix length

    def update_conv_state(self, conv_states, state_idx=0, **kwargs):
        return torch.cat([self.conv_states[state_idx], conv_states], dim=-1)

    def update_recurrent_state(self, recurrent_states, state_idx=0, **kwargs):
        return recurrent_states


def filled_length(layer) -> int:
    """Tokens a filled recurrent layer has seen (the prefix length); transformers < 5.25 kept no count
    there (0: the cache then asks its first attention layer)."""
    n = getattr(layer, "cumulative_length_linear", None)
    return 0 if n is None else int(n)


def _rows(state, batch):
    return None if state is None else state.expand(batch, *state.shape[1:])


class HybridPrefixCache(DynamicCache):
    """A filled hybrid cache, read-only: attention layers hold the prefix K/V (as ``PrefixCache``),
    recurrent layers their state at the end of the prefix, at batch 1."""

    def __init__(self, filled: DynamicCache, batch: int = 1):
        super().__init__()
        self.layers = [_PrefixLayer(lay.keys, lay.values) if isinstance(lay, DynamicLayer)
                       else _PrefixState(lay, batch) if isinstance(lay, LinearAttentionCacheLayerMixin)
                       else lay for lay in filled.layers]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        """A fresh [batch, ...] copy of the prefix state, one per read (one layer's at a time: the chunk
        size counts it), since some kernels update the state they read in place (Mamba-2's
        ``selective_state_update``: ``state.copy_(...)``)."""
        state = super().get_recurrent_state(layer_idx, state_idx)
        return None if state is None else state.clone(memory_format=torch.contiguous_format)

    def at_batch(self, batch: int) -> HybridPrefixCache:
        """The cache one batch of ``batch`` masks runs with (new views of the same prefix tensors)."""
        return HybridPrefixCache(self, batch)
