"""Work-arounds for bugs in the transformers release headsteer runs on, applied to one model object
when its adapter is made (never to a model class: nothing here patches classes or ``forward``)."""
from __future__ import annotations

from torch import nn

_HOOKED = "_headsteer_image_outputs_hook"  # attribute of the language model: the hook's handle


def apply_compat(model: nn.Module, model_type: str) -> None:
    """Every work-around that ``model`` (of ``model_type``) needs; safe to call again."""
    if model_type == "llama4":
        _llama4_image_outputs(model)


def _llama4_image_outputs(model: nn.Module) -> None:
    # transformers 5.24: Llama4ForConditionalGeneration.forward ends by reading
    # ``outputs.image_outputs`` from its language model's MoeCausalLMOutputWithPast, a class without
    # that field, so every forward raises AttributeError after the logits are computed. A forward hook
    # on this model's language model gives that output the attribute (None: the composite model
    # never passes the image features down anyway). ModelOutput.__setattr__ stores a name that is
    # not a field as a plain attribute, so the output's keys and to_tuple() stay as they were.
    lm = getattr(model, "language_model", None)
    if lm is None or _HOOKED in lm.__dict__:
        return

    def hook(module, args, output):
        if not isinstance(output, tuple) and not hasattr(output, "image_outputs"):
            output.image_outputs = None
        return output

    lm.__dict__[_HOOKED] = lm.register_forward_hook(hook)
