"""The benchmark harness: batch-1 latency over exactly N runs on a pinned core (the paper's Table 4).

    from edge_effnet.bench import BenchOptions, benchmark, resolve_targets
    record = benchmark(resolve_targets(["m.tflite"]), BenchOptions(runs=20, cpu=0))
"""
from .harness import BenchOptions, Target, benchmark, make_input, resolve_targets, summarize  # noqa: F401
from .machine import cpu_model, load_average, machine_info  # noqa: F401
