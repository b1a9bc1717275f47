"""Work-arounds for bugs in the transformers releases headsteer supports. A family's record names the
ones its models need (``Family.compat``); each is applied to one model object when its adapter is made
(never to a model class: nothing here patches classes or ``forward``), only where the installed release
has the bug — found by looking at that release's code — so a fixed release runs untouched. Each is
applied once per model (the adapter is made once per model)."""
from __future__ import annotations

import inspect

from torch import nn


def reads_language_model_image_outputs(cls) -> bool:
    """transformers 5.24's Llama4ForConditionalGeneration.forward passes ``outputs.image_outputs`` of its
    language model's output on, a field that output class lacks; 5.25 passes the vision outputs instead.
    Without the forward's source (a frozen install), assume the bug: the hook is harmless where fixed."""
    try:
        return "outputs.image_outputs" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


def llama4_image_outputs(model: nn.Module) -> None:
    """Where the forward has the bug, every forward raises AttributeError after the logits are computed.
    A forward hook on this model's language model gives that output the attribute (None: the composite
    model never passes the image features down anyway). ModelOutput.__setattr__ stores a name that is
    not a field as a plain attribute, so the output's keys and to_tuple() stay as they were."""
    lm = getattr(model, "language_model", None)
    if lm is None or not reads_language_model_image_outputs(type(model)):
        return

    def hook(module, args, output):
        if not isinstance(output, tuple) and not hasattr(output, "image_outputs"):
            output.image_outputs = None
        return output

    lm.register_forward_hook(hook)
