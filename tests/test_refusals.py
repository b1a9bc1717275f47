"""A refusal that rests on how the installed transformers behaves is re-checked on it: when a release
changes that behaviour, this test fails and says which family to revisit, instead of the registry
refusing a model headsteer could now support (or keeping a reason that no longer holds)."""
import inspect

import pytest
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

from headsteer.families import _ACTIONS, _GEN_POSITIONS, REFUSED

# a type newer than the installed transformers (headsteer.families.since) has no class to look at
DROPS_POSITIONS = sorted(t for t, why in REFUSED.items() if why == _GEN_POSITIONS and t in MAPPING)
ACTION_MODELS = sorted(t for t, why in REFUSED.items() if why == _ACTIONS and t in MAPPING)


def model_class(mtype):
    return getattr(tf, MAPPING[mtype])


@pytest.mark.parametrize("mtype", DROPS_POSITIONS)
def test_generation_position_refusals_still_hold(mtype):
    source = inspect.getsource(model_class(mtype).prepare_inputs_for_generation)
    assert 'model_inputs["position_ids"] = None' in source, f"{mtype} keeps its position ids now: revisit its refusal"


@pytest.mark.parametrize("mtype", ACTION_MODELS)
def test_action_models_have_no_language_model_head(mtype):
    source = inspect.getsource(model_class(mtype).__init__)
    assert "action_out_proj" in source and "self.lm_head" not in source, f"{mtype} has a language-model head now: revisit it"
