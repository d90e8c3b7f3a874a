"""LiZA on every supported family: the base model is recovered when the memory is off, and any split of a
sequence into prefill pieces and decode steps gives the logits of forward_full."""

import copy
import math

import pytest
import torch

from tptt_runtime import TitansModel, TpttConfig
from tptt_runtime import model as model_module
from tptt_runtime.model import DecodeRows, PrefillPiece
from tptt_runtime.layers.liza import LiZAttention
from tptt_runtime.ops import memory_inputs
from tptt_runtime.state import SessionState

TOL = 2e-4  # float32 rounding of two chunkings; measured: olmo 0.9-1.0e-4 (before and after a change of matmul layouts), the other families <= 2e-5


def ids(n, seed=1):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed))


def incremental_logits(model, tokens, pieces):
    """Prefill the given piece sizes, then decode the rest one token at a time: {position: logits}, state."""
    rows, state, pos = {}, model.new_session(), 0
    for size in pieces:
        rows[pos + size - 1] = model.prefill(state, tokens[pos:pos + size])
        pos += size
    while pos < len(tokens):
        rows[pos] = model.step(state, int(tokens[pos]))
        pos += 1
    return rows, state


def test_every_attention_is_replaced(tiny_pair):
    converted, _ = tiny_pair
    model = TitansModel(converted, TpttConfig())
    assert len(model.layers) == 2
    assert sum(isinstance(m, LiZAttention) for m in model.hf.modules()) == 2


def test_memory_off_and_wide_window_is_the_base_model(tiny_pair):
    converted, base = tiny_pair
    model = TitansModel(converted, TpttConfig(window=64, sinks=0, mag_weight=0.0))
    tokens = ids(40)
    expected = base(input_ids=tokens[None]).logits[0]
    torch.testing.assert_close(model.forward_full(tokens), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("pieces", [(1,), (7, 1, 13), (30,), (3, 3, 3)])
def test_incremental_equals_full(tiny_pair, pieces):
    converted, _ = tiny_pair
    model = TitansModel(converted, TpttConfig(window=5, sinks=2, mag_weight=0.5, chunk_size=4))
    tokens = ids(37)
    full = model.forward_full(tokens)
    rows, state = incremental_logits(model, tokens, pieces)
    assert state.num_tokens == 37
    for position, logits in rows.items():
        torch.testing.assert_close(logits, full[position], atol=TOL, rtol=0)


@pytest.mark.parametrize("pack_tokens", [2048, 8])  # 8: packs of 8 tokens, longer pieces cut across packs
@pytest.mark.parametrize("cache_tokens", [0, 3])
def test_a_packed_prefill_of_sessions_at_different_positions_equals_forward_full(tiny_pair, cache_tokens,
                                                                                  pack_tokens, monkeypatch):
    """prefill_packed: pieces of five sessions in shared forwards, each piece from its own position (one still
    filling its sinks) and of its own length, the last one two sessions at one position as a batch; each
    session's logits and the decode after its piece are forward_full's."""
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", pack_tokens)
    converted, _ = tiny_pair
    model = TitansModel(converted, TpttConfig(window=5, sinks=2, mag_weight=0.5, chunk_size=4,
                                              cache_tokens=cache_tokens))
    streams = [ids(40, seed) for seed in range(1, 6)]
    seen, new = (0, 11, 1, 7), (9, 1, 20, 6)  # tokens each piece's sessions have seen, tokens of the piece
    rows = ((0,), (1,), (2,), (3, 4))          # the sessions of each piece
    states = [model.new_session() for _ in streams]
    for state, stream, n in zip(states, streams, (0, 11, 1, 7, 7)):
        if n:
            model.prefill(state, stream[:n])
    batched = [{name: torch.cat([states[3].layers[i][name], states[4].layers[i][name]]) for name in layer}
               for i, layer in enumerate(states[3].layers)]
    pieces = [PrefillPiece(batched if len(sessions) > 1 else states[sessions[0]].layers, n,
                           torch.stack([streams[s][n:n + m] for s in sessions]), all_logits=i == 2)
              for i, (sessions, n, m) in enumerate(zip(rows, seen, new))]
    logits = model.prefill_packed(pieces)
    for piece_logits, sessions, n, m, all_logits in zip(logits, rows, seen, new, (False, False, True, False)):
        for row, s in enumerate(sessions):
            full = model.forward_full(streams[s])
            expected = full[n:n + m] if all_logits else full[n + m - 1:n + m]
            torch.testing.assert_close(piece_logits[row], expected, atol=TOL, rtol=0)
            if len(sessions) > 1:
                for mine, stacked in zip(states[s].layers, batched):
                    for name, tensor in mine.items():
                        tensor.copy_(stacked[name][row:row + 1])
            states[s].num_tokens = n + m
            torch.testing.assert_close(model.step(states[s], int(streams[s][n + m])), full[n + m], atol=TOL, rtol=0)


@pytest.mark.parametrize("cache_tokens", [0, 3])
def test_decode_rows_in_a_packed_prefill_equal_forward_full(tiny_pair, cache_tokens):
    """An engine step that prefills and decodes at once: three sessions at their own positions (one still filling
    its sinks, one past its window) take one decode token each as DecodeRows beside a prefill piece of a fourth
    session, in one forward; every logit row and the next step of every session are forward_full's."""
    converted, _ = tiny_pair
    model = TitansModel(converted, TpttConfig(window=5, sinks=2, mag_weight=0.5, chunk_size=4,
                                              cache_tokens=cache_tokens))
    streams = [ids(30, seed) for seed in range(1, 5)]
    seen = (1, 4, 13)  # tokens the decoding sessions have seen
    states = [model.new_session() for _ in streams]
    for state, stream, n in zip(states, streams, seen):
        model.prefill(state, stream[:n])
    batched = [{name: torch.cat([states[s].layers[i][name] for s in range(3)]) for name in layer}
               for i, layer in enumerate(states[0].layers)]
    rows = DecodeRows(batched, torch.tensor(seen), torch.stack([streams[s][n:n + 1] for s, n in enumerate(seen)]),
                      filling_sinks=True)
    prompt = PrefillPiece(states[3].layers, 0, streams[3][None, :9])
    decoded, prefilled = model.prefill_packed([rows, prompt])
    fulls = [model.forward_full(stream) for stream in streams]
    torch.testing.assert_close(prefilled[0, -1], fulls[3][8], atol=TOL, rtol=0)
    for row, n in enumerate(seen):
        torch.testing.assert_close(decoded[row, -1], fulls[row][n], atol=TOL, rtol=0)
        for mine, stacked in zip(states[row].layers, batched):
            for name, tensor in mine.items():
                tensor.copy_(stacked[name][row:row + 1])
        states[row].num_tokens = n + 1
    states[3].num_tokens = 9
    for s, n in enumerate((*seen, 8)):
        torch.testing.assert_close(model.step(states[s], int(streams[s][n + 1])), fulls[s][n + 1], atol=TOL, rtol=0)


def test_a_packed_prefill_takes_one_set_of_decode_rows():
    from tests.conftest import tiny_model

    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.5))
    state = model.new_session()
    rows = DecodeRows(state.layers, torch.tensor([0]), ids(1)[None])
    with pytest.raises(ValueError, match="more than one set of decode rows"):
        model.prefill_packed([rows, rows])


def test_a_copy_made_during_a_forward_has_a_context_of_its_own_with_no_forward_in_flight():
    """TitansModel.compiled_copy deep-copies a model that goes on serving: the copy's layers share one fresh
    context, never the original's session tensors or packed pieces, and compute what the original does."""
    from tests.conftest import tiny_model

    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.5))
    context = model.context
    context.pieces, context.layer_states, context.memo["geometry"] = ["piece"], [{"memory": torch.ones(1)}], 1
    twin = copy.deepcopy(model)
    assert twin.context is not context and all(layer.context is twin.context for layer in twin.layers)
    assert twin.context.pieces is None and twin.context.layer_states is None and not twin.context.memo
    context.reset()
    tokens = ids(12)
    torch.testing.assert_close(twin.forward_full(tokens), model.forward_full(tokens), atol=0, rtol=0)


def test_a_research_hook_sees_stateless_forwards_only_and_states_need_positions():
    """LayerHook is for the stateless forward (forward_full, training): a session's prefill under
    `model.hooked` calls neither of its methods and equals the unhooked prefill; a forward over session states
    without positions is refused (a stateful prefill is prefill_packed), never run on a fresh state."""
    from tests.conftest import tiny_model
    from tptt_runtime.compiled import run_forward
    from tptt_runtime.layers.liza import LayerHook

    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.5))
    tokens = ids(12)

    class Calls(LayerHook):
        def __init__(self):
            self.calls = []

        def prefill(self, layer, hidden_states, q, k, v):
            self.calls.append("prefill")

        def mix(self, layer, hidden_states, softmax_out, read, seen):
            self.calls.append("mix")

    with model.hooked(Calls()) as hook:
        served = model.prefill(model.new_session(), tokens)
    assert hook.calls == []
    torch.testing.assert_close(served, model.prefill(model.new_session(), tokens), atol=0, rtol=0)
    with model.hooked(Calls()) as hook:
        model.forward_full(tokens)
    assert hook.calls == ["prefill", "mix"] * len(model.layers)
    with pytest.raises(ValueError, match="prefill_packed"):
        run_forward(model.hf, model.context, tokens[None], model.new_session().layers)


@pytest.mark.parametrize("options", [
    dict(order=1), dict(order=2, trick="rotary"), dict(order=2, trick="combined"), dict(cross_gate=True),
    dict(alpha_gate="kv", beta_gate="v", nonlinear_chunk=8, chunk_size=4), dict(sinks=0, window=1),
    dict(beta_gate="c", alpha_gate="k", gate_pool=1), dict(read_scale="learned"), dict(decay=0.9),
    dict(alpha_gate="learned", decay=0.95), dict(cache_tokens=2), dict(cache_tokens=3, mag_weight=0.0),
    dict(cache_tokens=4, order=1, sinks=0, chunk_size=4, nonlinear_chunk=8),
])
def test_incremental_equals_full_for_each_option(options):
    from tests.conftest import tiny_model

    model = TitansModel(tiny_model("llama"), TpttConfig(**{"window": 6, "sinks": 1, "mag_weight": 0.7, **options}))
    tokens = ids(29)
    full = model.forward_full(tokens)
    rows, _ = incremental_logits(model, tokens, (11, 2))
    for position, logits in rows.items():
        torch.testing.assert_close(logits, full[position], atol=TOL, rtol=0)


def random_retaining_heads(model, seed=0):
    """Give every layer's retaining head random weights (fresh ones are 0: they add nothing to the write score)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for param in layer.retaining_head.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 3 / param.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("cache_score,cache_pool", [("write", 0), ("retain", 0), ("retain", 2)])
@pytest.mark.parametrize("cache_tokens", [1, 4, 64])
@pytest.mark.parametrize("pieces", [(1,), (7, 1, 13), (30,)])
def test_incremental_equals_full_with_an_exact_token_cache(tiny_pair, cache_tokens, pieces, cache_score, cache_pool):
    """The cache (64: more slots than tokens ever evicted), ranked by the memory's writes alone or with a
    retaining head, its score max-pooled or not, keeps every split exact on every family."""
    converted, _ = tiny_pair
    model = TitansModel(converted, TpttConfig(window=5, sinks=2, mag_weight=0.5, chunk_size=4,
                                              cache_tokens=cache_tokens, cache_score=cache_score,
                                              cache_pool=cache_pool))
    if cache_score == "retain":
        random_retaining_heads(model)
    tokens = ids(37)
    full = model.forward_full(tokens)
    rows, state = incremental_logits(model, tokens, pieces)
    for position, logits in rows.items():
        torch.testing.assert_close(logits, full[position], atol=TOL, rtol=0)
    held = state.layers[0]["cache_pos"]
    assert (held >= 0).sum(-1).eq(min(cache_tokens, 37 - 5 - 2)).all()  # filled as far as evictions allow


@pytest.mark.parametrize("mag_weight,cache_pool", [(0.5, 0), (0.0, 0), (0.5, 2)])
@pytest.mark.parametrize("pieces", [(37,), (7, 1, 13), (1,)])
def test_a_retaining_head_caches_the_tokens_it_scores_highest(pieces, mag_weight, cache_pool):
    """cache_score "retain": after any split, each layer and kv head holds the `cache_tokens` evicted tokens
    with the highest log write norm + retaining head logit (the later one on a tie), computed here from the
    layer's own q, k, v and a memory run over the whole sequence at once, with or without the memory in the
    mix; with cache_pool r, the highest of those scores within r tokens either side (sinks left out)."""
    from tests.conftest import tiny_model
    from tests.ops.test_exact_cache import pooled_by_hand
    from tptt_runtime.layers.liza import LayerHook
    from tptt_runtime.layers.retaining import head_features

    config = TpttConfig(window=5, sinks=2, mag_weight=mag_weight, chunk_size=4, cache_tokens=4, cache_score="retain",
                        cache_pool=cache_pool)
    model = random_retaining_heads(TitansModel(tiny_model("llama"), config))
    tokens = ids(37)

    class Scores(LayerHook):
        scores = {}

        def prefill(self, layer, hidden_states, q, k, v):
            _, write_norms = layer.memory_branch(q, k, v, layer.new_state(1, q.dtype, q.device), 0)
            logit = layer.retaining_head(head_features(q, k, v))
            self.scores[layer.layer_idx] = pooled_by_hand(write_norms.clamp(min=1e-8).log() + logit, cache_pool, 2)

    with model.hooked(Scores()), torch.no_grad():
        model.forward_full(tokens)
    _, state = incremental_logits(model, tokens, pieces)
    evicted = torch.arange(2, 37 - 5)  # sinks .. the last token that left the window (t - window for t = 36)
    for layer, layer_state in zip(model.layers, state.layers):
        score = Scores.scores[layer.layer_idx][0][:, evicted]  # [Hkv, evicted]
        for head in range(score.shape[0]):
            ranked = sorted(range(len(evicted)), key=lambda j: (score[head, j].item(), j), reverse=True)
            expected = sorted(int(evicted[j]) for j in ranked[:4])
            assert sorted(layer_state["cache_pos"][0, head].tolist()) == expected


def test_the_cache_changes_the_output_once_tokens_leave_the_window():
    """Guard: the cache really contributes, only after the first eviction, and a state's size is fixed."""
    from tests.conftest import tiny_model

    tokens = ids(30)
    config = TpttConfig(window=4, sinks=1, mag_weight=0.3)
    without = TitansModel(tiny_model("llama"), config).forward_full(tokens)
    cached = TitansModel(tiny_model("llama"), config.replace(cache_tokens=3))
    with_cache = cached.forward_full(tokens)
    torch.testing.assert_close(with_cache[:5], without[:5], atol=1e-6, rtol=0)  # t < sinks + window
    assert (with_cache[6:] - without[6:]).abs().max() > 1e-3
    state = cached.new_session()
    nbytes = state.nbytes
    cached.prefill(state, tokens)
    assert state.nbytes == nbytes == SessionState.from_bytes(state.to_bytes()).nbytes


def test_memory_changes_the_output():
    """Guard: with mag_weight > 0 the linear branch really contributes."""
    from tests.conftest import tiny_model

    tokens = ids(20)
    off = TitansModel(tiny_model("llama"), TpttConfig(window=4, mag_weight=0.0)).forward_full(tokens)
    on = TitansModel(tiny_model("llama"), TpttConfig(window=4, mag_weight=0.5)).forward_full(tokens)
    assert (off - on).abs().max() > 1e-3


@pytest.mark.parametrize("cache_tokens,cache_score,cache_pool", [(0, "write", 0), (2, "write", 0), (2, "retain", 0),
                                                                 (2, "retain", 2)])
def test_batched_decode_equals_one_at_a_time(cache_tokens, cache_score, cache_pool):
    from tests.conftest import tiny_model

    model = TitansModel(tiny_model("qwen2"), TpttConfig(window=4, sinks=1, mag_weight=0.5, nonlinear_chunk=4,
                                                        cache_tokens=cache_tokens, cache_score=cache_score,
                                                        cache_pool=cache_pool))
    if cache_score == "retain":
        random_retaining_heads(model)
    tokens = ids(30)
    states = [model.new_session() for _ in range(3)]
    for state, n in zip(states, (3, 9, 14)):
        model.prefill(state, tokens[:n])
    alone = [model.step(s.fork(), int(tokens[s.num_tokens])) for s in states]
    together = model.decode(states, [int(tokens[s.num_tokens]) for s in states])
    torch.testing.assert_close(together, torch.stack(alone), atol=TOL, rtol=0)
    assert [s.num_tokens for s in states] == [4, 10, 15]


def test_learned_gate_starts_as_the_constant_and_stays_exact_incrementally():
    """mag_gate "learned" with W = 0 is the constant mu it was initialised at; with random W (mu then varies per
    head and token) any split into prefill pieces and decode steps still gives forward_full's logits."""
    from tests.conftest import tiny_model

    tokens = ids(29)
    constant = TitansModel(tiny_model("llama"), TpttConfig(window=6, sinks=1, mag_weight=0.3)).forward_full(tokens)
    learned = TitansModel(tiny_model("llama"), TpttConfig(window=6, sinks=1, mag_weight=0.3, mag_gate="learned"))
    torch.testing.assert_close(learned.forward_full(tokens), constant, atol=TOL, rtol=0)

    with torch.no_grad():
        for layer in learned.layers:
            layer.mag_gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(layer.layer_idx))
    full = learned.forward_full(tokens)
    assert (full - constant).abs().max() > 1e-3  # the gate really varies
    rows, _ = incremental_logits(learned, tokens, (11, 2))
    for position, logits in rows.items():
        torch.testing.assert_close(logits, full[position], atol=TOL, rtol=0)


def test_learned_read_scale_sizes_each_heads_read():
    """read_scale "learned": with mu = 1 the layer's o_proj sees the memory read itself (once the first token has
    left the window: from position sinks + window = 5 on), and raising one head's
    log scale by log 2 doubles that head's channels and no other's; under "softmax_rms" the read's own size
    is normalized away (the o_proj input keeps the softmax branch's RMS at every token)."""

    from tests.conftest import tiny_model

    def o_proj_input(model):
        seen = []
        hook = model.layers[0].o_proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        model.forward_full(ids(21))
        hook.remove()
        return seen[0][0][5:]  # [T - 5, Hq * D]: positions whose memory weight is mu

    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=1.0, read_scale="learned"))
    layer = model.layers[0]
    before = o_proj_input(model)
    with torch.no_grad():
        layer.read_scale[1] += math.log(2.0)
    after = o_proj_input(model)
    head = slice(layer.head_dim, 2 * layer.head_dim)
    torch.testing.assert_close(after[:, head], 2 * before[:, head])
    others = torch.ones(after.shape[-1], dtype=torch.bool)
    others[head] = False
    torch.testing.assert_close(after[:, others], before[:, others])

    def token_rms(x):
        return x.pow(2).mean(-1).sqrt()

    window_only = o_proj_input(TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.0)))
    matched = o_proj_input(TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=1.0)))
    # rtol: the normalization's eps where the read is small (the first tokens; measured 0.2 %)
    torch.testing.assert_close(token_rms(matched), token_rms(window_only), atol=0, rtol=1e-2)
    assert (token_rms(before) / token_rms(window_only) - 1).abs().max() > 0.1  # a learned scale: its own size


def test_sessions_decoding_together_over_many_steps_match_their_forward_full():
    """Sessions decoding together, leaving and joining, a fork and a serialization mid-batch: nobody's logits
    are disturbed, and every session keeps tensors of its own (no view into a stacked batch)."""
    from tests.conftest import tiny_model

    model = TitansModel(tiny_model("llama"), TpttConfig(window=4, sinks=1, mag_weight=0.5))
    streams = [ids(24, seed=s) for s in range(4)]
    full = [model.forward_full(t) for t in streams]
    states = [model.new_session() for _ in streams]
    for state, n in zip(states, (2, 5, 7, 3)):
        model.prefill(state, streams[states.index(state)][:n])

    def decode(members):
        logits = model.decode([states[m] for m in members], [int(streams[m][states[m].num_tokens]) for m in members])
        for m, row in zip(members, logits):
            torch.testing.assert_close(row, full[m][states[m].num_tokens - 1], atol=TOL, rtol=0)

    decode([0, 1, 2])
    decode([0, 1, 2])
    snapshot = states[1].fork()
    blob = states[2].to_bytes()
    decode([0, 1, 2])
    decode([0, 2])  # 1 leaves
    decode([0, 2, 3])  # 3 joins
    decode([0, 2, 3])
    assert all(t.untyped_storage().nbytes() == t.nbytes for layer in states[0].layers for t in layer.values())
    decode([2, 3])
    decode([1])  # the session that left resumes alone from its own (copied-out) row
    resumed = SessionState.from_bytes(blob, model.fingerprint)
    torch.testing.assert_close(model.step(resumed, int(streams[2][resumed.num_tokens])),
                               full[2][resumed.num_tokens - 1], atol=TOL, rtol=0)
    torch.testing.assert_close(model.step(snapshot, int(streams[1][snapshot.num_tokens])),
                               full[1][snapshot.num_tokens - 1], atol=TOL, rtol=0)


def test_split_attention_splits_full_attention_at_the_window():
    """The attention-transfer targets: for every query, (1 - lam) * attention over window + sinks
    + lam * o_far equals full causal attention; checked per query with plain softmax."""
    from tests.conftest import tiny_model
    from tptt_runtime.layers.full_attention import split_attention
    from tptt_runtime.layers.liza import rotary_table
    from tptt_runtime.ops import window_attention as wa

    config = TpttConfig(window=4, sinks=2, mag_weight=0.5)
    layer = TitansModel(tiny_model("llama"), config).layers[0]
    gen = torch.Generator().manual_seed(0)
    seq_len, dim = 13, layer.head_dim
    q = torch.randn(1, layer.num_heads, seq_len, dim, generator=gen)
    k = torch.randn(1, layer.num_kv_heads, seq_len, dim, generator=gen)
    v = torch.randn(1, layer.num_kv_heads, seq_len, dim, generator=gen)
    o_full, o_far, lam = split_attention(q, k, v, layer)
    cos, sin = rotary_table(layer._rotary[0], None, seq_len, q)
    factors = wa.rotary_factors(torch.arange(seq_len)[None], cos, sin)
    qr, kr = wa.apply_rotary(q, factors), wa.apply_rotary(k, factors)
    groups = layer.num_heads // layer.num_kv_heads
    for h in range(layer.num_heads):
        for t in range(seq_len):
            scores = (kr[0, h // groups, :t + 1] @ qr[0, h, t]) * layer.scaling
            full = scores.softmax(-1) @ v[0, h // groups, :t + 1]
            near = [j for j in range(t + 1) if j < config.sinks or j > t - config.window]
            o_near = scores[near].softmax(-1) @ v[0, h // groups, near]
            mixed = (1 - lam[0, h, t]) * o_near + lam[0, h, t] * o_far[0, h, t]
            torch.testing.assert_close(mixed, full, atol=1e-5, rtol=0)
            torch.testing.assert_close(o_full[0, h, t], full, atol=1e-5, rtol=0)
            assert (lam[0, h, t] == 0) == (len(near) == t + 1)


@pytest.mark.parametrize("gates", [dict(), dict(beta_gate="kv", alpha_gate="v")])
def test_learned_gate_input_starts_as_the_mean_and_keeps_incremental_equal_to_full(gates):
    """gate_input "learned": at the start the gates read the channel mean (the same logits as "mean"); with
    trained (here random) weights the write strength follows them, and any split still gives forward_full's
    logits (the pooled gate carry holds the learned inputs)."""
    from tests.conftest import tiny_model

    config = TpttConfig(window=6, sinks=1, mag_weight=0.7, chunk_size=4, **gates)
    tokens = ids(29)
    mean = TitansModel(tiny_model("llama"), config).forward_full(tokens)
    model = TitansModel(tiny_model("llama"), config.replace(gate_input="learned"))
    torch.testing.assert_close(model.forward_full(tokens), mean, atol=1e-6, rtol=0)
    assert (model.layers[0].gate_input_v is not None) == ("v" in gates.get("beta_gate", "k"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.layers:
            for gate_input in (layer.gate_input_k, layer.gate_input_v):
                if gate_input is not None:
                    gate_input.weight.copy_(torch.randn(gate_input.weight.shape, generator=generator))
                    gate_input.bias.copy_(torch.randn(gate_input.bias.shape, generator=generator))
    full = model.forward_full(tokens)
    assert (full - mean).abs().max() > 1e-3
    rows, _ = incremental_logits(model, tokens, (11, 2))
    for position, logits in rows.items():
        torch.testing.assert_close(logits, full[position], atol=TOL, rtol=0)


def test_decay_reaches_the_memory_and_a_learned_one_starts_at_the_constant():
    """decay < 1 multiplies the state before every write (the gates hand the kernel g = log decay per token);
    alpha_gate "learned" starts as the same constant (one logit per kv head) and, once its heads differ, any
    split still gives forward_full's logits."""
    from tests.conftest import tiny_model

    pooled = torch.randn(2, 3, 5)
    _, g = memory_inputs.gates(pooled, None, "k", "c", math.log(0.9))
    torch.testing.assert_close(g, torch.full((2, 3, 5), math.log(0.9)))
    assert memory_inputs.gates(pooled, None, "k", "c")[1] is None
    _, g = memory_inputs.gates(pooled, None, "k", "learned", torch.tensor([-0.1, -0.2, -0.3]))
    torch.testing.assert_close(g[1, :, 4], torch.tensor([-0.1, -0.2, -0.3]))

    config = TpttConfig(window=6, sinks=1, mag_weight=0.7, chunk_size=4)
    tokens = ids(29)
    no_decay = TitansModel(tiny_model("llama"), config).forward_full(tokens)
    constant = TitansModel(tiny_model("llama"), config.replace(decay=0.8)).forward_full(tokens)
    assert (constant - no_decay).abs().max() > 1e-3
    model = TitansModel(tiny_model("llama"), config.replace(alpha_gate="learned", decay=0.8))
    torch.testing.assert_close(model.forward_full(tokens), constant, atol=1e-6, rtol=0)
    with torch.no_grad():
        for layer in model.layers:
            layer.memory_decay.copy_(torch.linspace(-2.0, 3.0, layer.memory_decay.numel()))
    full = model.forward_full(tokens)
    assert (full - constant).abs().max() > 1e-3
    rows, _ = incremental_logits(model, tokens, (11, 2))
    for position, logits in rows.items():
        torch.testing.assert_close(logits, full[position], atol=TOL, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(decay=0.0), "decay must be"), (dict(decay=1.5), "decay must be"),
    (dict(alpha_gate="k", decay=0.9), "computes its own"), (dict(alpha_gate="learned"), "starts at decay"),
    (dict(beta_gate="learned"), "beta_gate must be"),
])
def test_decay_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        TpttConfig(**options)


def test_memory_stays_out_until_the_first_eviction(tiny_pair):
    """Until a token leaves the window (t < sinks + window) the softmax branch is full attention, so the memory
    weight is 0 there: the converted model gives the base model's logits exactly, whatever mu; after that, the
    memory contributes."""
    converted, base = tiny_pair
    model = TitansModel(converted, TpttConfig(window=8, sinks=2, mag_weight=0.7))
    tokens = ids(24)
    expected = base(input_ids=tokens[None]).logits[0]
    full = model.forward_full(tokens)
    torch.testing.assert_close(full[:10], expected[:10], atol=1e-5, rtol=0)
    assert (full[10:] - expected[10:]).abs().amax(-1).min() > 1e-4
