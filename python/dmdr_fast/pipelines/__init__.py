"""Diffusers pipelines around a distilled student: export, loading and sampling, random test pipelines.

- :mod:`~dmdr_fast.pipelines.export` — save a student as a diffusers pipeline folder or LoRA, load
  it with plain diffusers, sample it.
- :mod:`~dmdr_fast.pipelines.evaluate` — an exported student against its teacher, both run by plain
  diffusers (scores, win rates, diversity, drift).
- :mod:`~dmdr_fast.pipelines.random` — random-weight pipelines from configs (tests, benchmarks).
"""
