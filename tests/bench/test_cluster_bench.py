"""`tptt-bench cluster`'s session move: a real default-model snapshot through a real Redis, restored whole."""

from tests.redis_server import redis_server  # noqa: F401 - fixture
from tptt_runtime.bench.cluster import session_moves, table


def test_session_move_restores_the_whole_state(redis_server, default_model):  # noqa: F811
    move = session_moves(redis_server.url, moves=3)
    assert move["state_bytes"] == default_model.new_session().nbytes
    assert 0 < move["p50_ms"] <= move["p95_ms"]
    results = {"turn_tokens": 8, "trials": 1, "turn3_ttft_s": {"same": 1.0, "moved": 1.1, "cold": 2.0},
               "moved_over_same": 1.1, "moved_over_cold": 0.55, "cached_tokens": {"same": [5], "moved": [5]},
               "session_move": move}
    assert "moved / same 1.10x" in table(results)
