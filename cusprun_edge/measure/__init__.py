"""Measurements of models and artifacts: quality in PyTorch and ONNX Runtime, speed, answers, baselines.

  evaluate.py    perplexity, agreement and multiple-choice accuracy of any logits function
  runtime.py     ONNX Runtime / GenAI sessions; also the benchmark's worker process (no torch)
  validate.py    the exported expert against the dense model on held-out text
  bench.py       latency of several artifacts side by side, alternating, per provider
  generate.py    greedy answers, repetition and checked prompts
  baseline.py    the GenAI builder's int4 of the dense model: what users ship without us
  llamacpp.py    a GGUF run in llama.cpp (llama-cpp-python)
  gguf_check.py  the expert's GGUF checked in llama.cpp against PyTorch and the dense GGUF
"""
