"""A scheduler's stop signal becomes a checkpoint and an exit the job is requeued from.

SLURM warns a job before its time limit (submitit asks for SIGUSR2 `signal_delay_s` seconds ahead; SIGUSR1 is
the other common choice) and sends SIGTERM when it preempts, requeues (`scontrol requeue`) or cancels it. While
a training loop runs (qspeech.loop), `watch()` turns these signals into a flag instead of letting them kill the
process; the loop polls the flag after each step, writes its resumable state and raises `Preempted`. The run's
result.json then says "preempted", and `stop` ends the job: inside a submitit job through submitit's own
handler for its signal, which requeues it (time-limit requeues count against max_num_timeout; preemptions do
not); otherwise with exit code 128 + the signal's number, as if the signal had killed it. The requeued job, or
the same command run again, resumes from the state to the numbers of an uninterrupted run.

Outside a training loop the signals keep their previous handlers (the default kills; submitit's requeues).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from qspeech.errors import TrainingError

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(BaseException):
    """Raised by the loop once its state is written. A BaseException (like KeyboardInterrupt): no `except
    Exception` on the way up mistakes it for a failure of the run."""

    def __init__(self, signum: int, message: str, previous: Any = None):
        super().__init__(message)
        self.signum = signum
        self.previous = previous  # the handler `watch` had replaced for this signal

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Watch:
    """The signal a running loop received (None: none yet), and the handlers it replaced."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def preempted(self, where: str) -> Preempted:
        """The exception the loop raises after writing its state (`where`: what was stopped and where the state is)."""
        signum = self.signum or signal.SIGTERM  # distributed: another rank got the signal
        return Preempted(signum, f"stopped by {signal.Signals(signum).name} {where}", self.previous.get(signum))


@contextlib.contextmanager
def watch() -> Iterator[Watch]:
    """SIGTERM, SIGUSR1 and SIGUSR2 set the flag inside the block; their handlers are restored after it. A signal
    the block did not act on (it came after the loop's last check) is delivered again to the restored handler.
    Only the main thread can install handlers: elsewhere the flag is never set."""
    w = Watch()
    if threading.current_thread() is not threading.main_thread():
        yield w
        return
    w.previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, w.handle)
    acted = False
    try:
        yield w
    except Preempted:
        acted = True
        raise
    finally:
        for s, handler in w.previous.items():
            signal.signal(s, handler)
        if w.signum is not None and not acted:
            signal.raise_signal(w.signum)


def _submitit_requeue(handler: Any) -> bool:
    """Whether `handler` is submitit's checkpoint-and-requeue handler of a SLURM job."""
    owner = getattr(handler, "__self__", None)
    return (getattr(handler, "__name__", "") == "checkpoint_and_try_requeue"
            and type(owner).__module__.startswith("submitit"))


def stop(p: Preempted) -> TrainingError:
    """End a job stopped by `p` (its state is saved and its result.json says preempted): hand the signal to
    submitit when it requeues on it (it requeues the job and exits), otherwise exit with 128 + signal. Returns
    the error to fail the job with when submitit will not requeue it (timed out max_num_timeout times)."""
    requeue = _submitit_requeue(p.previous)
    then = "submitit requeues the job" if requeue else "the same command resumes it"
    print(f"qspeech: {p}; {then}", file=sys.stderr, flush=True)
    if requeue:
        try:
            p.previous(p.signum, None)  # requeues, then sys.exit(-1)
        except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError: it gave up on the job
            return TrainingError(f"not requeued ({' '.join(str(e).split())}); rerun the same command to resume")
    sys.exit(p.exit_code)
