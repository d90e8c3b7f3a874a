"""`tptt-bench runtime` on a tiny random Llama shape (CPU): both sides measured at every context and batch, the
memory columns mean what they say, and a side that runs out of memory is recorded while the other goes on."""

import json

import pytest
import torch

from tptt_runtime.bench import runtime as bench
from tptt_runtime.bench.cli import main


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    main(["runtime", "--shape", "tiny", "--contexts", "64", "256", "--batch", "1", "3", "--decode-tokens", "3",
          "--dtype", "float32", "--out", str(out)])  # float32 whatever this CPU's auto dtype
    return json.loads((out / "runtime.json").read_text()), out


def test_both_sides_at_every_context_and_batch(result):
    data, out = result
    assert data["batches"] == [1, 3] and (out / "runtime.png").exists()
    for row in data["rows"]:
        for side in ("ours", "baseline"):
            assert row[side]["prefill_tok_s"] > 0
            assert set(row[side]["decode"]) == {"1", "3"}
            assert all(d["tok_s"] > 0 and d["ms"] > 0 for d in row[side]["decode"].values())
        ratio = data["ratios"][str(row["context"])]
        assert ratio["decode_tok_s_ours_over_baseline_batch_3"] > 0


def test_memory_columns(result):
    """Ours holds the same bytes at any context; the baseline's KV cache grows with it, by the KV bytes of a
    token of this shape (2 layers x K and V x 2 kv heads x 16 dims x 4 bytes)."""
    rows = result[0]["rows"]
    short, long = rows[0], rows[1]
    assert short["ours"]["state_bytes"] == long["ours"]["state_bytes"]
    per_token = 2 * 2 * 2 * 16 * 4
    assert long["baseline"]["state_bytes"] - short["baseline"]["state_bytes"] == (256 - 64) * per_token


def test_out_of_memory_is_recorded_and_the_run_goes_on(monkeypatch, tmp_path):
    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(bench, "_baseline_prefill", no_room)
    data = bench.run([64], 1000, 2, None, tmp_path, shape="tiny", batches=(1, 2))
    row = data["rows"][0]
    assert row["baseline"]["decode"] == {"1": bench.OUT_OF_MEMORY, "2": bench.OUT_OF_MEMORY}
    assert all(d["tok_s"] > 0 for d in row["ours"]["decode"].values())
    assert data["ratios"]["64"]["decode_tok_s_ours_over_baseline_batch_2"] == "ours ran, baseline out of memory"
    assert "OOM" in bench.table(data["rows"])


def test_the_bandwidth_floor_reads_every_weight_of_a_decode_step_once(result):
    """The floor's matrices: the base model's projections, MLPs and head (q/k/v fused in ours, counted once at
    full size; the tied embedding once) plus the small matrices a LiZA layer adds (retaining heads included);
    every decode figure has its ratio to the floor."""
    from torch import nn

    ours, baseline = bench.build_models("tiny", "cpu", torch.float32, None)
    linear = {m.weight.data_ptr(): m.weight for m in baseline.modules() if isinstance(m, nn.Linear)}
    added = [p for name, p in ours.hf.named_parameters() if p.dim() >= 2 and any(
        part in name for part in ("mag_gate", "memory_map", "gate_input", "retaining_head"))]
    expected = sum(w.numel() * 4 for w in [*linear.values(), *added])
    assert sum(w.numel() * w.element_size() for w in bench.weight_matrices(ours)) == expected
    data = result[0]
    assert data["floor"]["bytes"] == expected and data["floor"]["ms"] > 0
    for row in data["rows"]:
        for side in ("ours", "baseline"):
            for batch, decode in row[side]["decode"].items():
                ratio = data["ratios"][str(row["context"])][f"decode_ms_over_floor_{side}_batch_{batch}"]
                assert ratio == pytest.approx(decode["ms"] / data["floor"]["ms"])
