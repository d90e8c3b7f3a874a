"""Evaluations of a converted model against its base: KL per token, passkey retrieval, greedy agreement.

    passkey.py   prompt generator and scorer (pure text / token ids)
    needles.py   held-out needle prompts: passkey, multi-key, document QA, raw and chat, wording no training uses
    suite.py     `tptt-eval --suite`: the needle prompts on models side by side, accuracy with Wilson intervals
    run.py       three models side by side (base full attention, base window-only, converted); CLI `tptt-eval`
"""
