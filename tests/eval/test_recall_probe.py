"""The recall probe on a tiny random model (the read at the softmax RMS or at a learned scale): its `exact` mode
is full attention again (the base model's logits), its `model` mode is the converted model untouched, the other
modes differ from both (but perfect-read at a learned scale, which is exact), and the layers are restored
afterwards."""

import pytest
import torch

from tests.conftest import tiny_model
from tptt_runtime.config import TpttConfig
from tptt_runtime.eval import recall
from tptt_runtime.model import TitansModel

# no sinks: the window branch gives sink keys cache positions just before the window, so with sinks `exact` is
# full attention up to those positions (measured: 5e-4 apart on this model with 2 sinks, 6e-8 without)
CONFIG = TpttConfig(window=6, sinks=0, mag_gate="learned", mag_weight=0.3, feature_map="learned")


@pytest.fixture(scope="module", params=["softmax_rms", "learned"])
def models(request):
    base = tiny_model("llama")
    converted = TitansModel(tiny_model("llama"), CONFIG.replace(read_scale=request.param))
    with torch.no_grad():  # a gate that depends on the token, so mu differs from lam and from a constant
        for layer in converted.layers:
            layer.mag_gate.weight.normal_(0, 0.5)
            if layer.read_scale is not None:
                layer.read_scale.normal_(0, 0.5)
    return base, converted


IDS = list(range(3, 43))


def test_exact_mode_is_full_attention(models):
    base, converted = models
    logits, readings = recall.probe_logits(converted, IDS, "exact")
    with torch.no_grad():
        full = base(input_ids=torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    assert len(readings) == len(converted.layers)
    lam = readings[0][0]
    assert lam[..., :CONFIG.window + CONFIG.sinks].abs().max() == 0 and lam[..., -1].min() > 0


def test_model_mode_is_the_converted_model_and_layers_are_restored(models):
    _, converted = models
    reference = converted.forward_full(IDS)
    logits, _ = recall.probe_logits(converted, IDS, "model")
    torch.testing.assert_close(logits, reference)
    assert all("_output" not in vars(layer) and "_project" not in vars(layer) for layer in converted.layers)


@pytest.mark.parametrize("mode", ["perfect-read", "own-read", "own-gate", "own-far-norm", "own-head-rms"])
def test_oracle_modes_change_the_output(models, mode):
    base, converted = models
    logits, _ = recall.probe_logits(converted, IDS, mode)
    assert (logits - converted.forward_full(IDS)).abs().max() > 1e-3
    with torch.no_grad():
        full_attention = base(input_ids=torch.tensor([IDS])).logits[0]
    if mode == "perfect-read" and converted.config.read_scale == "learned":  # o_far at its own size, mu = lam
        torch.testing.assert_close(logits, full_attention, atol=1e-5, rtol=1e-5)
    else:
        assert (logits - full_attention).abs().max() > 1e-3


def test_unknown_mode_is_refused(models):
    with pytest.raises(ValueError, match="unknown probe mode"):
        recall.probe_logits(models[1], IDS, "bogus")
