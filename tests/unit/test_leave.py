"""Unit: the job's exit without the interpreter's teardown (job.interrupt.leave, from cli.main once torch is imported)
still does what an exit does for others first: a thread pool's pending work and its shutdown, the threads that are
not daemons, the atexit handlers, the buffered output; and the exit code is the one given."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import atexit, concurrent.futures, sys, threading, time
from job import interrupt
atexit.register(lambda: print("atexit ran"))
pool = concurrent.futures.ThreadPoolExecutor(2)  # never shut down by its owner
pool.submit(lambda: (time.sleep(0.3), print("pool work finished")))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
sys.stdout.write("buffered, no newline")
interrupt.leave(3)
print("not reached")
"""


def test_leave_runs_what_an_exit_runs_and_exits_with_the_code():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 3, result.stderr[-2000:]
    out = result.stdout
    assert "buffered, no newline" in out and "not reached" not in out
    assert out.index("pool work finished") < out.index("atexit ran")
    assert out.index("thread finished") < out.index("atexit ran")


def test_a_finished_cli_command_that_imported_torch_leaves_at_once(tmp_path):
    """`peftopt` ends through leave once torch is imported: its output is complete and its exit code kept."""
    probe = ("import sys, torch\n"
             "sys.argv = ['peftopt', 'validate', 'missing.json']\n"
             "from job.cli import main\n"
             "main()\n"
             "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "missing.json" in result.stderr and "not reached" not in result.stdout
