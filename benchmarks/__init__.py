"""sdsjax's benchmarks: run them from the repository root as `python -m benchmarks.bench_NAME`.

`common` holds the shared timing, sync, memory, child-process and output helpers,
`model_specs` the model dimensions, `torch_baseline` the PyTorch baseline; results are in
RESULTS.md.
"""
