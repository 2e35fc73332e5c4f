"""PyTorch baseline of sdsjax's SDS step: diffusers/transformers parts + a soft rasterizer.

`raster` ports sdsjax's soft rasterizer; `sds_step` builds the step (one prompt at a time,
or P prompts batched). Used by `benchmarks/bench_fit.py` and `tests/test_torch_parity.py`.
"""
