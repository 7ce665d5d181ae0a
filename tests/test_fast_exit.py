"""`rlhf`'s quick exit (`rlhf_core.app.fast_exit`): the objects are frozen at exit, and
everything an exit must still do is done."""

import subprocess
import sys

SCRIPT = """
import atexit, gc, sys
from pathlib import Path

out = Path(sys.argv[1])
# Registered before: runs after the freeze (atexit is last in, first out).
atexit.register(lambda: out.with_suffix(".after").write_text(str(gc.get_freeze_count() > 0)))
from rlhf_core.app.fast_exit import freeze_at_exit

before = atexit._ncallbacks()
freeze_at_exit()
freeze_at_exit()  # once per process
registered = atexit._ncallbacks() - before
# Registered after: runs before it, with nothing frozen yet.
atexit.register(lambda: out.with_suffix(".before").write_text(str(gc.get_freeze_count())))
cycle = []
cycle.append(cycle)
sys.stdout.write(f"registered {registered}; no newline, flushed at exit")
"""


def test_the_objects_are_frozen_last_and_handlers_and_streams_still_run(tmp_path):
    out = tmp_path / "record"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "registered 1; no newline, flushed at exit"
    assert out.with_suffix(".before").read_text() == "0"
    assert out.with_suffix(".after").read_text() == "True"
