"""What a user chooses, read and checked once: target profiles and the expert's calibration corpora.

  targets.py   target profiles (data/targets/*.toml or a user's file): device, providers, precision, threads
  corpora.py   the expert spec (`language=en,domain=code`) and its calibration/tune/eval documents
"""
