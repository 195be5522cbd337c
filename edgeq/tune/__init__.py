"""`edgeq tune`: per target, the smallest (or fastest) artifact that holds a drift budget, searched per layer
on measured sensitivity, converted and validated by the pipeline (issue 15, parts 1 and 2).

    options.py   what is asked (objective, choices, uniform schemes), checked before torch loads
    choices.py   per target: the low-bit scheme the plan lives in, the choices, the uniform baselines
    measure.py   each layer at each choice: real bits (footprint) and drift alone (simulation)
    search.py    the greedy path from the cheapest plan up, and the front
    run.py       measure -> search -> convert and validate (pipeline.convert) -> uniform -> latency -> choose
    timing.py    each candidate's latency: timed interleaved in the runtime here, else cost.py's estimate
    cost.py      per-profile cost models (a roofline) for runtimes this machine cannot time (Core ML off macOS)
    report.py    tune.json, tune.md, tuned.toml;  page.py: tune.html with the front as inline SVG
"""

from edgeq.tune.options import Objective, TuneOptions, UniformScheme

__all__ = ["Objective", "TuneOptions", "UniformScheme"]
