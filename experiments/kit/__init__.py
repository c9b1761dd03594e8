"""The experiments' kit, a local package the scripts in `experiments/` import (`from kit import ...`);
it is not part of the installed `odenet`.

- `kit.skeleton`: what every script shares: settings dataclass -> command line, environment
  record, results files and resume, figure saving.
- `kit.data`: small classification data sets, all offline.
- `kit.models`: one architecture (`stem -> residual part -> head`) run discrete or continuous,
  and the presets of Chen et al. 2018's Table 1 comparison.
- `kit.training`: training and evaluation loops that record what continuous depth costs
  (DDP-aware under torchrun).
"""
