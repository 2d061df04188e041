"""Processes FinPulse spawns end with the process that spawned them.

A parent killed with kill -9 (or by the kernel, for memory) runs no clean-up, so what it spawned would go on: a
tokenizer process would wait for work forever, a teacher would keep training for minutes and writing into a run
directory that the resumed run is using. So each spawned process watches its parent and exits once it is gone.

This module imports nothing heavy: the tokenizer processes that use it start in well under a second.
"""
from __future__ import annotations

import os
import threading
import time

PARENT_CHECK_S = 1.0


def exit_with_parent(parent_pid: int) -> None:
    """End this process, at once and without clean-up (there is no one left to report to), within about
    PARENT_CHECK_S of ``parent_pid`` no longer being its parent."""
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="watch-parent").start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)
