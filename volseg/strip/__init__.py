"""Skull stripping: training (``train``), shipped weights (``model``) and inference (``infer``)."""
