"""Benchmarks: pytest-benchmark suites, run with `pytest bench/ --benchmark-json=FILE`.

Each benchmark stores what it counts (matvecs, errors, bytes) in extra_info;
`python bench/summarize.py FILE` turns a run into the tables of RESULTS.md.
"""

import os

import pycurv


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["pycurv"] = pycurv.__version__
    machine_info["pycurv_build"] = pycurv.build_info()
    machine_info["cpu_count"] = os.cpu_count()
