"""The model: loading a source, the architecture table, and experts saved and loaded with per-layer widths.

  arch.py           the architecture table: where each family keeps its layers, norms, projections
  load.py           embedded GGUFs, local HF directories and hub ids -> (model, tokenizer), converted once
  structure.py      a model's per-layer widths, and the edits that remove neurons, heads and layers
  vocab_layers.py   the modules of a pruned vocabulary, for loading experts saved that way
  tokenizer_trim.py a tokenizer.json with rows removed and new contiguous ids
  expert_io.py      save/load an expert; a transformers-loadable copy (remote code or zero-padded)
  hf_modeling.py    the modeling file an expert ships for `from_pretrained(..., trust_remote_code=True)`
  weights_read.py   bytes of weights each generated token reads (the speed model)
"""
