"""Recipes: end-to-end jobs built on the library, each behind a ``dmdr-fast`` command.

- :mod:`~dmdr_fast.recipes.digits` — the digits demo (the main job of the quick start): its data,
  teacher and classifier training, the DMDR run, the report and the experiment.
- :mod:`~dmdr_fast.recipes.t2i` — text-to-image DMDR on a local diffusers pipeline folder: build,
  train, compare with the teacher, export.

The presets they run are the YAML files of :mod:`dmdr_fast.configs`.
"""
