"""Benchmarks of cps_hf (not part of the installed package): the CPS training step (`step`), the streaming mIoU
(`metric`) and the training data pipeline (`data_pipeline`). Run through `scripts/benchmark*.py`."""
