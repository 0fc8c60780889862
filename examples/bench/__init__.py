"""The pieces of examples/benchmark.py (the entry point, whose docstring documents the benchmark):

    common     constants (variants, kernels, shapes, time estimates), log, SIGTERM handling, error records
    cli        command line, model config, the run order of the stages
    timing     timing (CUDA events or perf_counter), memory counters, measured matmul / copy ceilings
    flops      FLOPs per token
    variants   the model variants: build, patch (Liger, shardformer), compile, train, time
    kernels    the kernel micro-benchmarks
    report     environment, JSON output, ratios to peers, targets, the printed tables
"""
