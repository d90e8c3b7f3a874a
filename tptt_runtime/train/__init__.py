"""Conversion training: distil a base model into its TPTT form (LoRA on the shared projections, MaG schedules).

    data.py       token sequences from text already on the machine (no downloads), held-out split by document
    retrieval.py  retrieval documents: facts hidden in text, asked for at the end
    schedules.py  MaG weight over training: constant, gradual, cyclic
    transfer.py   attention transfer: the memory towards full attention's output beyond the window
    retain.py     fitting the exact-token cache's retaining heads (fact-token classifiers)
    distill.py    the training loop: KL to the base model's own logits (+ optional CE), checkpoints, resume
    cli.py        `tptt-convert`
"""
