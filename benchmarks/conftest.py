"""Options of the CPU benchmark suite (benchmarks/test_bench_cpu.py)."""


def pytest_addoption(parser):
    parser.addoption(
        "--update-baseline",
        action="store_true",
        default=False,
        help="write this run's ratios to benchmarks/baseline-cpu.json instead of checking against it",
    )
