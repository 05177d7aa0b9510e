"""`build`: the stages in order, each skipped when its fingerprint is unchanged.

  config.py  BuildConfig: the typed build configuration, its defaults and checks, and its recipe file
  stage.py   the stage base: context, progress, fingerprints from the code a stage really imports
  stages.py  load, score, prune, export, validate, bench, generate, report, gguf
  search.py  the ratio search (and its joint choice with the int4 plan)
  build.py   build(): run the stages into a build directory, resumable and locked
"""
