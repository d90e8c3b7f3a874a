"""tptt-eval's KL to the base: per position against a sum written out by hand, the spans it is reported in, and
a run on tiny models where the window-only model must equal the base wherever the window still holds every
earlier token."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.eval.conftest import TINY_CONFIG
from tests.eval.test_suite import CharTokenizer
from tptt_runtime.eval import run as run_module
from tptt_runtime.eval.run import kl_per_position, kl_table, position_edges

LENGTH = 70
EXACT_SPAN = TINY_CONFIG.sinks + TINY_CONFIG.window  # 18


def test_kl_per_position_is_the_sum_by_hand():
    torch.manual_seed(0)
    model_logits, base_logits = torch.randn(5, 7), torch.randn(5, 7)
    by_hand = []
    for row_model, row_base in zip(model_logits.tolist(), base_logits.tolist()):
        z_model, z_base = (math.log(sum(math.exp(x) for x in row)) for row in (row_model, row_base))
        by_hand.append(sum(math.exp(b - z_base) * ((b - z_base) - (m - z_model))
                           for m, b in zip(row_model, row_base)))
    assert kl_per_position(model_logits, base_logits).tolist() == pytest.approx(by_hand, abs=1e-6)
    assert kl_per_position(base_logits, base_logits).abs().max() < 1e-6


@pytest.mark.parametrize("length, exact_span, edges", [
    (8192, 132, [0, 132, 256, 512, 1024, 2048, 4096, 8192]),
    (2048, 132, [0, 132, 256, 512, 1024, 2048]),
    (300, 132, [0, 132, 256, 300]),
    (100, 132, [0, 100]),
    (70, 18, [0, 18, 32, 64, 70]),
    (64, 16, [0, 16, 32, 64]),
])
def test_position_edges(length, exact_span, edges):
    assert position_edges(length, exact_span) == edges


@pytest.fixture
def sequences(monkeypatch):
    """Two random held-out 'sequences' of any asked length, in the tiny models' vocabulary."""
    def held_out(tokenizer, length, held_out):
        assert held_out
        return torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(length))
    monkeypatch.setattr(run_module.data, "sequences", held_out)


def test_kl_by_position_is_zero_where_the_window_holds_everything(tiny_models, sequences):
    base, *models = tiny_models
    kl, by_position = kl_table(models, base, CharTokenizer(), [LENGTH], per_context=2, exact_span=EXACT_SPAN)
    window_only = by_position["window-only"][str(LENGTH)]
    assert list(window_only) == ["0-18", "18-32", "32-64", "64-70"]
    assert window_only["0-18"] < 1e-6 and min(list(window_only.values())[1:]) > 1e-4
    for name in ("window-only", "converted"):
        spans = by_position[name][str(LENGTH)]
        weighted = sum(value * (int(span.split("-")[1]) - int(span.split("-")[0])) for span, value in spans.items())
        assert weighted / LENGTH == pytest.approx(kl[name][str(LENGTH)], rel=1e-5)


def test_run_reports_the_kl_by_position(tiny_models, sequences, monkeypatch, tmp_path, capsys):
    converted = SimpleNamespace(config=TINY_CONFIG, tokenizer=CharTokenizer())
    monkeypatch.setattr(run_module, "load_models", lambda adapter: (converted, tiny_models))
    results = run_module.run("tiny", [LENGTH, 40], [], per_context=2, trials=1, out_dir=tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["kl_by_position"] == results["kl_by_position"]
    assert set(saved["kl_by_position"]["converted"]) == {str(LENGTH), "40"}
    assert (tmp_path / "eval.png").stat().st_size > 1000
    assert f"by position at {LENGTH}: 0-18:" in capsys.readouterr().out
