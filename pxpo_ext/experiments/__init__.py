"""Experiments on the embedded model: PXPO against DDPO, and the paper's three feedback sources.

- :mod:`.runs`: one training run per :class:`RunSpec` (config, seed, reward, prompts), run in
  parallel worker processes, each returning its reward curve, final evaluation and wall time;
- :mod:`.curves`: curves over seeds (mean and spread), learning-rate selection, and the number
  of reward queries one method needs to reach another's final reward;
- :mod:`.evaluation`: fixed evaluation sets, mean reward, circle detection (segmenter and an
  independent colour/shape check), prompt fidelity and sample diversity;
- :mod:`.figures`: CSV files, curves with their spread, and before/after grids;
- :mod:`.provenance`: the command, machine and wall time every result is reported with.

The commands are ``python/experiment_*.py``; the results are written up in docs/experiments.md.
"""
