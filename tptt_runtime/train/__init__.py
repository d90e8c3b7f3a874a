"""Conversion training: distil a base model into its TPTT form (LoRA on the shared projections, MaG schedules).

    data.py       token sequences from text already on the machine (no downloads), held-out split by document
    schedules.py  MaG weight over training: constant, gradual, cyclic
    distill.py    the training loop: KL to the base model's own logits (+ optional CE), checkpoints, resume
    cli.py        `tptt-convert`
"""
