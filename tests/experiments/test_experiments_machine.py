"""Machine info and CPU time recorded with every demo / suite result."""

import torch

from locakd.experiments.machine import available_cores, cpu_seconds, load_average, machine_info


def test_machine_info_names_what_timings_depend_on():
    info = machine_info()
    assert info["torch"] == torch.__version__
    assert info["cores_available"] == available_cores() >= 1
    assert isinstance(info["cpu"], str) and info["python"].count(".") == 2
    load = load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))


def test_cpu_seconds_counts_work_done():
    before = cpu_seconds()
    total = 0
    for i in range(3_000_000):  # about 0.1-0.3 s of pure-Python work
        total += i * i
    after = cpu_seconds()
    assert total > 0 and after > before
