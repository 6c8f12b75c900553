"""Long jitted work at the terminal: Ctrl-C and SIGTERM held during a block that must not be cut short, ending
a jitted chain (one `lax.scan`) after the step in progress through its per-step host callback, or agreed on by
every process of a multi-process run; progress bars."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_interrupts() -> None:
    """From now on SIGTERM (a scheduler's pre-emption, ``kill``) raises KeyboardInterrupt, as Ctrl-C does: the
    scripts then keep what they finished instead of dying at once (main thread only)."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT and SIGTERM (where Python handles them) until the block ends, then deliver the first; a block
    that raised ends with its own error (a KeyboardInterrupt put in its place hid it, e.g. a diverged run's).

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
    sharded over several devices (``watching(stop=False)``), the chain runs to its end and the signal is held until
    the block ends, so that the block can keep the chain's result: the processes must stop together, and the
    callback's error in a sharded computation would resurface in JAX's exit handlers.
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

        ``stop=False``: the chain runs to its end, and a Ctrl-C arrives when the block ends (keep the result in it).
        """
        self._on_step, self.stopped = on_step, False
        if not stop or threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            with interrupts_deferred():
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


class StopVote:
    """Ctrl-C, SIGTERM and a time limit in a multi-process run: every process stops before the same train call.

    A signal reaches one process, or each at another moment, and clocks differ: a process that stopped alone would
    wait forever in the checkpoint save every process must enter. While armed, a signal only records the wish.
    Before each train call every process casts its vote, an any() over one flag per device that runs behind the
    calls already queued, and reads the vote cast before the previous call, which is done by then: the host does
    not wait for the device. In one process the vote is the process's own and signals are left alone.
    """

    def __init__(self, mesh: Mesh):
        self._multi_process = jax.process_count() > 1
        self._sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._any = jax.jit(lambda flags: flags.any(axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._previous_handlers: dict = {}
        self._pending = None
        self.signal: int | None = None  # the first SIGINT or SIGTERM this process received while armed

    def arm(self) -> None:
        """From now on (multi-process, main thread) SIGINT and SIGTERM are recorded for the vote instead of raising."""
        if not self._multi_process or threading.current_thread() is not threading.main_thread():
            return

        def record(signum, frame):
            self.signal = self.signal or signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, record)

    def disarm(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def cast(self, out_of_time: bool) -> tuple[bool, bool]:
        """Vote (a signal came here, ``out_of_time``); returns (interrupted, out_of_time) of the previous vote, taken
        over all processes (in one process: no signal, and ``out_of_time`` itself)."""
        if not self._multi_process:
            return False, out_of_time
        local = np.tile([self.signal is not None, out_of_time], (len(self._sharding.addressable_devices), 1))
        ballot = self._any(jax.make_array_from_process_local_data(self._sharding, local))
        previous, self._pending = self._pending, ballot
        if previous is None:
            return False, False
        interrupted, timed_out = (bool(v) for v in np.asarray(previous.addressable_data(0)))
        return interrupted, timed_out

    def interruption(self) -> KeyboardInterrupt:
        """What every process raises when the vote is to stop: it names the signal where it came to this one."""
        return KeyboardInterrupt(f"signal {self.signal}" if self.signal else "signal in another process")

    def last(self) -> bool:
        """After the last train call and its evaluations: whether a signal reached any process since the last vote
        read (every process waits for the others' vote here)."""
        if not self._multi_process:
            return False
        earlier, _ = self.cast(False)
        now, self._pending = self._pending, None
        return earlier or bool(np.asarray(now.addressable_data(0))[0])


def progress_bar(**kwargs) -> tqdm:
    """tqdm that redraws every second on a terminal and every 30 s into a log file."""
    return tqdm(dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)


def say(message: str, file=None) -> None:
    """Print a message about the whole run above any progress bar, from process 0 only: in a multi-process run
    every process would print the same line."""
    if jax.process_index() == 0:
        tqdm.write(message, file=file)
