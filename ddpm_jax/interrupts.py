"""Long jitted work at the terminal: Ctrl-C and SIGTERM held during a block that must not be cut short, or ending
a jitted chain (one `lax.scan`) after the step in progress through its per-step host callback; progress bars."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import jax
from tqdm.auto import tqdm


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT and SIGTERM (where Python handles them) until the block ends, then deliver the first.

    For the blocks a KeyboardInterrupt must not cut short:
    - the train step, which donates the state: interrupted after the call returned but before ``state`` named its
      result, ``state`` would name deleted buffers and the checkpoint saved on Ctrl-C would fail (seen in 1 of 8
      SIGINTs sent at random moments);
    - Orbax's save: interrupted inside it, Orbax's background threads waited forever (the process hung at exit)
      and the checkpoint saved on Ctrl-C failed (1 of 12 SIGINTs at random moments, with a save every 3 steps).
    Signal handlers can only be set from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if callable(handler)}
    received = []
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            signum, frame = received[0]
            previous[signum](signum, frame)


class ChainStopped(Exception):
    """Raised by a chain's progress callback to end the jitted computation at Ctrl-C or SIGTERM."""


class ChainWatch:
    """The ``progress_fn`` of a jitted chain (one `lax.scan` over its steps) that lets Ctrl-C and SIGTERM stop it.

    Python runs signal handlers only between bytecodes of the main thread, and the whole chain is one XLA call:
    a Ctrl-C took effect only when the chain had ended (46 s later in a sample.py run; minutes for 1000 steps of
    the CIFAR-10 U-Net on a CPU). While `watching`, the C-level signal handler also writes the signal's number to
    a pipe (`signal.set_wakeup_fd`); the callback, run on the host after every step, reads it and raises, which
    ends the computation, and the signal is delivered when the block ends. In a multi-process run, and for a chain
    sharded over several devices (``watching(stop=False)``), the chain runs to its end: the processes must stop
    together, and the callback's error in a sharded computation would resurface in JAX's exit handlers.
    """

    def __init__(self):
        self._read_fd: int | None = None
        self._on_step = None
        self.stopped = False

    def __call__(self, t) -> None:
        if self._on_step is not None:
            self._on_step(t)
        if self._read_fd is None:
            return
        try:
            signals = os.read(self._read_fd, 64)
        except BlockingIOError:
            signals = b""
        self.stopped = self.stopped or bool({signal.SIGINT, signal.SIGTERM} & set(signals))
        if self.stopped:
            raise ChainStopped

    @contextlib.contextmanager
    def watching(self, on_step=None, *, stop: bool = True):
        """Run the chain in this block; ``on_step(t)`` is called after each of its steps (e.g. a progress bar).

        ``stop=False``: the chain runs to its end, and a Ctrl-C arrives as usual after it.
        """
        self._on_step, self.stopped = on_step, False
        if not stop or threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            try:
                yield
            finally:
                self._on_step = None
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        # JAX logs every exception of a debug callback with its traceback; a stop asked for is not an error.
        debugging_log = logging.getLogger("jax._src.debugging")

        def log_filter(record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], ChainStopped))

        with interrupts_deferred():  # records the signal, so that it is delivered when the block ends
            previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._read_fd = read_fd
            debugging_log.addFilter(log_filter)
            try:
                yield
            except jax.errors.JaxRuntimeError:
                if not self.stopped:
                    raise
            finally:
                debugging_log.removeFilter(log_filter)
                signal.set_wakeup_fd(previous_fd)
                self._read_fd, self._on_step = None, None
                os.close(read_fd)
                os.close(write_fd)
        if self.stopped:  # the signal's handler returned, but the chain has no result to give
            raise KeyboardInterrupt


def progress_bar(**kwargs) -> tqdm:
    """tqdm that redraws every second on a terminal and every 30 s into a log file."""
    return tqdm(dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)
