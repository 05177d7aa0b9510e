"""Cus-Prun: score every neuron on the expert's corpora, choose what to remove, remove it, repair the rest.

  score.py        one scoring pass: per-neuron and per-head impact on each corpus (ScoreSet)
  methods.py      the registry of pruning methods over that one ScoreSet (cusprun, wanda, flap, ...)
  damage.py       per-layer damage budgets: how much each layer may lose
  reconstruct.py  the refit of what remains on held-apart calibration documents
  vocab.py        which tokens the expert keeps, and trimming its vocabulary
  pruner.py       prune_model / prune_and_save: plan, edit, refit, save
"""
