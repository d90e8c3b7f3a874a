"""Fixtures shared by the evaluation tests: the three compared models, tiny and random."""

import pytest

from tests.conftest import tiny_model
from tptt_runtime import TitansModel, TpttConfig
from tptt_runtime.eval.run import Base, Converted

TINY_CONFIG = TpttConfig(window=16, sinks=2, mag_weight=0.5)


@pytest.fixture(scope="module")
def tiny_models():
    """base (full attention, max 500 tokens), window-only and converted, all on the same tiny llama weights."""
    return [Base(tiny_model("llama"), max_len=500),
            Converted(TitansModel(tiny_model("llama"), TINY_CONFIG.replace(mag_weight=0.0)), "window-only"),
            Converted(TitansModel(tiny_model("llama"), TINY_CONFIG), "converted")]
