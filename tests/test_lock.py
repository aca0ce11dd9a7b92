"""The output lock: a second writer is refused with the holder named; a killed holder's lock is free again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.errors import StageError
from pipeline.lock import OutputLock

HOLDER = """
import sys, time
from pipeline.lock import OutputLock
with OutputLock(sys.argv[1], "generate"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_second_writer_is_refused_until_the_holder_dies(tmp_path):
    out = tmp_path / "run" / "samples"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=rf"samples: another tauflow process is writing it \(generate, pid {proc.pid} on "):
            with OutputLock(out, "generate"):
                pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with OutputLock(out, "score"):  # the dead holder's lock is free; nothing to clean up by hand
        assert not out.exists()  # the lock lives beside the output, which --overwrite may remove


def test_lock_is_released_on_error_and_reusable(tmp_path):
    out = tmp_path / "pairs"
    with pytest.raises(RuntimeError), OutputLock(out, "pair"):
        raise RuntimeError("boom")
    with OutputLock(out, "pair"):
        pass


def test_released_lock_leaves_no_file(tmp_path):
    out = tmp_path / "labeled"
    with OutputLock(out, "threshold") as lock:
        assert lock.file.exists()
    assert not lock.file.exists()
