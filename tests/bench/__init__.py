"""FinPulse benchmarks: each ``bench_<name>.py`` module has ``main(argv) -> dict`` that prints its figures (as ratios
to a baseline measured in the same run, never as absolute pass/fail timings) and returns them.
Run them with ``python -m tests.bench [name ...] [-- module args]`` (``make bench``)."""
