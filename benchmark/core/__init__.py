"""The core the plugins and the harness stand on; it imports nothing heavy (no torch, MLflow,
Optuna), so ``concl-bench --help`` and the config machinery load in a fraction of a second.

- ``contracts``: where a process sits (``World``) and what a method is told (build/step contexts);
- ``registry``: ``@register_method`` and the entry-point group;
- ``errors``: ``UserError``, the one error type printed as one line with exit 2;
- ``schema``: the names shared by every stage (datasets, metrics, profiles, MLflow tags and the
  queries built on them).
"""
