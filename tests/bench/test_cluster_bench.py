"""`tptt-bench cluster`'s session move: a real default-model snapshot through a real Redis, restored whole."""

from tests.redis_server import redis_server  # noqa: F401 - fixture
from tptt_runtime.bench.cluster import figure, session_moves, table


def test_session_move_restores_the_whole_state(redis_server, default_model):  # noqa: F811
    move = session_moves(redis_server.url, moves=3)
    assert move["state_bytes"] == default_model.new_session().nbytes
    assert 0 < move["p50_ms"] <= move["p95_ms"]
    ttft = {"same": 1.0, "moved": 1.1, "cold": 2.0}
    results = {"turn_tokens": 8, "trials": 1, "turn3_ttft_s": {**ttft, "all": {k: [v] for k, v in ttft.items()}},
               "moved_over_same": 1.1, "moved_over_cold": 0.55, "cached_tokens": {"same": [5], "moved": [5]},
               "session_move": move, "clients": 4,
               "ray": {"plain_1_stream": 10.0, "ray1_1_stream": 9.0, "ray1_4_streams": 20.0, "ray2_4_streams": 30.0,
                       "scaling_2_over_1": 1.5, "ray_over_plain_decode": 0.9, "ray_over_plain_ttft": 1.2}}
    text = table(results)
    assert "moved / same 1.10x" in text and "2 replicas / 1: 1.50x" in text
    figure(results)
