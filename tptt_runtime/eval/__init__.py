"""Evaluations of a converted model against its base: KL per token, passkey retrieval, greedy agreement.

    passkey.py   prompt generator and scorer (pure text / token ids)
    run.py       three models side by side (base full attention, base window-only, converted); CLI `tptt-eval`
"""
