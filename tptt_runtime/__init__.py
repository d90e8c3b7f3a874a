"""tptt_runtime: serve pretrained causal LMs converted with TPTT (LiZA attention + DeltaProduct memory + MaG).

    import tptt_runtime as tr
    m = tr.load("default")
    s = m.new_session()
    logits = m.prefill(s, m.tokenizer("Hello")["input_ids"])
    logits = m.step(s, int(logits.argmax()))

Everything here speaks token ids and tensors; HTTP lives in the `server` package.
"""

from .config import TpttConfig
from .loading import load
from .model import TitansModel
from .state import SessionState

__all__ = ["SessionState", "TitansModel", "TpttConfig", "load"]
