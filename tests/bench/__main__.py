"""``python -m tests.bench [NAME ...] [-- ARGS ...]``: run the benchmark modules ``tests/bench/bench_*.py``.

With no NAME every module runs, in name order; ``NAME`` is ``stream`` or ``bench_stream``. ARGS after ``--`` go to
each module's ``main(argv)``. A module that fails is reported and the others still run; the exit code is 1 if any
failed.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

PACKAGE = "tests.bench"


def available() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if m.name.startswith("bench_"))


def main(argv: list[str]) -> int:
    names, module_args = argv, []
    if "--" in argv:
        split = argv.index("--")
        names, module_args = argv[:split], argv[split + 1:]
    known = available()
    chosen = [n.removeprefix("bench_") for n in names] or known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(known)}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n===== bench {name} =====", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(f"{PACKAGE}.bench_{name}").main(list(module_args))
        except (Exception, SystemExit):  # noqa: BLE001 - report it (an argparse error too) and go on with the others
            traceback.print_exc()
            failed.append(name)
        print(f"===== bench {name}: {'FAILED' if name in failed else 'done'} in {time.monotonic() - started:.0f}s =====",
              flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
