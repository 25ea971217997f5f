"""Tests for the DSM reference implementation: `pytest test_dsm.py` (CPU, fast).

Sections follow the stages: data, augmentation, models, pretraining.
Every video file a test needs is written by the test itself with PyAV.
"""

# ---- data.py ---------------------------------------------------------------
# (data tests go here)

# ---- augment.py ------------------------------------------------------------
# (augment tests go here)

# ---- models.py -------------------------------------------------------------
# (models tests go here)

# ---- pretrain.py -----------------------------------------------------------
# (pretrain tests go here)
