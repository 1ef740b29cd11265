"""Multi-step tools (``tools/demo.py``, ``tools/quant_report.py``): each step runs another
tool in a subprocess (:func:`run_step`) or in this process (:func:`output_to`), keeps its
whole log in a file and shows only its progress lines."""
import contextlib
import logging
import os
import subprocess
import sys
from typing import Sequence

#: Log lines worth showing while a step runs: training / test progress and the fold error.
PROGRESS_MARKERS = ('Iter(train)', 'Iter(test)', 'fold error')


def run_step(step: str, cmd: Sequence[str], log_path: str, cwd: str,
             prefix: str = '') -> None:
    """Run ``cmd`` in ``cwd`` as the step named ``step``, its output into ``log_path``.

    Prints ``[prefix] step``, then the progress lines (:data:`PROGRESS_MARKERS`) of the
    command, indented, as they come. A failure ends the calling tool with the exit status
    and the log's path: the log is the place to read what went wrong.

    Args:
        step (str): What the step does, printed first.
        cmd (Sequence[str]): The command line.
        log_path (str): File that receives the command's stdout and stderr.
        cwd (str): Working directory of the command.
        prefix (str): The calling tool's tag, e.g. ``'[demo]'``. Defaults to ''.

    Raises:
        SystemExit: The command exited with a non-zero status.
    """
    tag = f'{prefix} ' if prefix else ''
    print(f'{tag}{step}', flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if any(marker in line for marker in PROGRESS_MARKERS):
                print('        ' + line.split(' - INFO - ')[-1].rstrip()[:150], flush=True)
        if proc.wait() != 0:
            sys.exit(f'{tag}{step} failed (exit {proc.returncode}); see {log_path}')


@contextlib.contextmanager
def output_to(log_path: str):
    """Send what this process prints (print, warnings, mmengine's console log) to a log
    file for the duration of the block, as :func:`run_step` keeps a tool's whole log.

    Args:
        log_path (str): The log file (replaced).
    """
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance()  # the console handler exists before the redirection
    handlers = [h for logger in MMLogger._instance_dict.values() for h in logger.handlers
                if type(h) is logging.StreamHandler]  # console, not file handlers
    with open(log_path, 'w') as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        streams = [h.setStream(log) for h in handlers]
        try:
            yield
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
