"""Continual-learning demo: PIECE vs SeqFT, SeqLoRA and a random mask, on CPU in minutes.

Run it with ``piece-optim demo [--quick] [--out DIR]``.  Modules: :mod:`.data` (byte
tokenizer, stdlib corpus, tasks), :mod:`.model` (LLaMA config, cached pretraining,
metrics), :mod:`.methods` (the method loop, OP/BWT), :mod:`.tuning` (the lr grid),
:mod:`.cli` (the subcommand: table, results.json, plots, sparse deltas).
"""
