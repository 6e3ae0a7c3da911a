"""Where independent tasks run: in this process, in local worker processes, or on a Ray cluster.

`Workers(count=2).map(setup, task, context, items)` returns `[task(setup(context), item) for item
in items]`, in the order of `items`, whatever the scheduling. `context` (a model, the data) travels
once per worker process, not once per task: local workers are forked with it (their
initializer runs `setup`), and Ray workers fetch it from the object store on their first task
and keep `setup`'s result for the rest. `Workers.pool(setup, task, context)` keeps the same
workers for several `map`s (the accuracy search's rounds): one fork, and whatever the workers
cached stays warm. A worker that dies mid-task (killed, out of memory) has its unfinished tasks
run again, up to `retries` times. Nothing here schedules: local processes come from
`concurrent.futures`, Ray tasks from Ray. In a worker, `session_threads()` is its share of the
machine's cores, for the ONNX Runtime sessions it opens.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import numbers
import os
import signal
import socket
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from qdq.errors import QdqError, UsageError, expect, first_line

log = logging.getLogger(__name__)
C, S, T, R = TypeVar("C"), TypeVar("S"), TypeVar("T"), TypeVar("R")
# In each worker process: the run's token -> (task, setup's result). One run at a time.
_INSTALLED: dict[str, tuple[Callable[[Any, Any], Any], Any]] = {}
# In a worker process: the intra-op threads of each session it opens; None in the driver.
_THREADS: int | None = None
PR_SET_PDEATHSIG = 1  # prctl's option: the signal a process gets when its parent ends


class WorkerError(QdqError, RuntimeError):
    """Workers that kept dying: every retry of a task was lost with its process."""


@dataclass(frozen=True)
class Workers:
    """`count` local processes (1: this process, no pool), or a Ray cluster at `ray` ("auto",
    or an address such as "ray://head:10001"), on which Ray decides how many tasks run at once.
    `retries`: how often a task lost with its worker is run again."""

    count: int = 1
    ray: str | None = None
    retries: int = 3

    def __post_init__(self) -> None:
        expect(self.count, numbers.Integral, "`workers`")
        expect(self.retries, numbers.Integral, "`retries`")
        expect(self.ray, (str, type(None)), "`ray`", 'an address such as "auto"')
        if self.count < 1:
            raise UsageError(f"`workers` must be >= 1, got {self.count}")
        if self.retries < 0:
            raise UsageError(f"`retries` must be >= 0, got {self.retries}")

    @property
    def parallel(self) -> bool:
        """Whether tasks leave this process (and work is therefore split into shards)."""
        return self.count > 1 or self.ray is not None

    @property
    def width(self) -> int:
        """How many tasks run at once: `count`, or the CPUs of the Ray cluster."""
        if self.ray is None:
            return self.count
        return max(1, int(_connected(self.ray).cluster_resources().get("CPU", 1)))

    def map(
        self,
        setup: Callable[[C], S],
        task: Callable[[S, T], R],
        context: C,
        items: Sequence[T],
    ) -> list[R]:
        """`task(setup(context), item)` for each item, in the order of `items`."""
        with self.pool(setup, task, context) as pool:
            return pool.map(items)

    def pool(self, setup: Callable[[C], S], task: Callable[[S, T], R], context: C) -> Pool:
        """Workers that keep `setup(context)` over several `map`s; close it (`with`)."""
        return Pool(self, setup, task, context)


class Pool:
    """`Workers.map` over several rounds of items with the same workers: local processes are
    forked at the first round that needs them and serve the next (their caches, the pages they
    copied, stay), Ray workers keep `setup`'s result under one token. A round of one item runs
    in this process while no local worker is up (a fork is slower than the task's start)."""

    def __init__(self, workers: Workers, setup: Callable, task: Callable, context: object):
        self.workers, self.setup, self.task, self.context = workers, setup, task, context
        self.token = uuid.uuid4().hex
        self._state: list = []  # setup's result in this process, once needed
        self._executor: ProcessPoolExecutor | None = None
        self._shared: object = None  # the context in Ray's object store

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.close(stop=kind is not None)

    def close(self, stop: bool = False) -> None:
        """Let the workers go; `stop` (an interrupt, a failure): at once, ending the tasks they
        run and hold queued (a shutdown alone waits for those: up to three shards after a
        Ctrl-C, seconds to minutes each)."""
        if self._executor is not None:
            if stop:
                for process in list(getattr(self._executor, "_processes", {}).values()):
                    process.terminate()
            self._executor.shutdown(wait=not stop, cancel_futures=True)
            self._executor = None

    def map(self, items: Sequence) -> list:
        """`task(setup(context), item)` for each item, in the order of `items`."""
        if not items:
            return []
        workers = self.workers
        if workers.ray is not None:
            return self._ray_map(workers.ray, items)
        if workers.count == 1 or (len(items) == 1 and self._executor is None):
            if not self._state:
                self._state.append(self.setup(self.context))
            return [self.task(self._state[0], item) for item in items]
        return self._local_map(items)

    def _start(self, count: int) -> ProcessPoolExecutor:
        if self._executor is None:
            args = (self.token, _share(count), self.setup, self.task, self.context)
            self._executor = ProcessPoolExecutor(
                count, multiprocessing.get_context("fork"), initializer=_install, initargs=args
            )
        return self._executor

    def _local_map(self, items: Sequence) -> list:
        """Forked workers: the context is inherited (no pickling, closures welcome); items and
        results are pickled. A dead worker breaks the whole pool, so a fresh pool runs what was
        left."""
        results: dict[int, object] = {}
        retries = self.workers.retries
        for attempt in range(retries + 1):
            left = [i for i in range(len(items)) if i not in results]
            pool = self._start(min(self.workers.count, len(left)))
            futures = {pool.submit(_call, self.token, items[i]): i for i in left}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            lost = False
            for future in done:
                error = future.exception()
                if error is None:
                    results[futures[future]] = future.result()
                elif isinstance(error, BrokenProcessPool):
                    lost = True
                else:
                    self.close(stop=True)
                    raise error
            if not lost:
                for future in futures:  # FIRST_EXCEPTION returned with all of them done
                    results[futures[future]] = future.result()
                return [results[i] for i in range(len(items))]
            self.close()
            if attempt < retries:
                log.warning(
                    "a worker died (attempt %d of %d); running its %d unfinished tasks again",
                    attempt + 1,
                    retries + 1,
                    len(items) - len(results),
                )
        raise WorkerError(
            f"workers kept dying ({retries + 1} attempts); check memory (each worker holds a "
            "session of the model), or run with fewer workers"
        )

    def _ray_map(self, address: str, items: Sequence) -> list:
        """Ray tasks: the context goes into the object store once; Ray retries lost tasks."""
        ray = _connected(address)
        if self._shared is None:
            self._shared = ray.put((self.setup, self.task, self.context))
        # Ray starts workers with OMP_NUM_THREADS=1; NumPy's BLAS sums in an order that depends
        # on its thread count (evaluation's error sums moved in the last bit), so they get
        # this one's.
        threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        remote = ray.remote(_ray_call).options(
            max_retries=self.workers.retries,
            retry_exceptions=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
        )
        # The reference inside a list is not resolved for every task: a worker fetches it once.
        tasks = [remote.remote(self.token, [self._shared], item) for item in items]
        try:
            return ray.get(tasks)
        except ray.exceptions.RayTaskError as error:  # str(): the remote traceback, coloured
            for task in tasks:  # the others' failures would be printed as unhandled
                with contextlib.suppress(Exception):
                    ray.cancel(task)
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, Exception) else error) from None


ONE_PROCESS = Workers()


def session_threads() -> int | None:
    """Intra-op threads for an ONNX Runtime session opened in this process: in a worker, its
    share of the cores (workers that each took every core slowed each other down); in the
    driver, None (ONNX Runtime's default, every core)."""
    return _THREADS


def _share(workers: float) -> int:
    """The cores of this machine split between `workers` processes."""
    return max(1, int((os.cpu_count() or 1) // workers))


def _install(token: str, threads: int, setup: Callable, task: Callable, context: object) -> None:
    """A local worker's initializer: the context arrived with the fork; `setup` runs once."""
    global _THREADS
    # The parent decides what an interrupt means; a worker finishes its task (a shard: seconds).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    _end_with_parent()
    _THREADS = threads
    _INSTALLED.clear()
    try:
        _INSTALLED[token] = (task, setup(context))
    except Exception as error:  # raised as each task's own error: no dead pool, no retries
        _INSTALLED[token] = (_failed_setup, error)


def _failed_setup(error: Exception, item: object) -> object:
    """The task of a worker whose setup failed (a session ONNX Runtime cannot open): its
    error, which one process would have raised (a failed initializer had broken the pool,
    been retried as a dead worker and ended in "workers kept dying")."""
    raise error


def _end_with_parent() -> None:
    """A forked worker ends when its parent does (Linux's PR_SET_PDEATHSIG): one whose parent
    was killed (SIGKILL, the out-of-memory killer) had waited on its queue forever, holding
    its memory."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the pool's own checks remain
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _call(token: str, item: object) -> object:
    task, state = _INSTALLED[token]
    return task(state, item)


def _connected(address: str) -> ModuleType:
    """Ray, connected to the cluster at `address` unless already connected."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'qdq[ray]'") from None
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError:  # "auto" with no cluster here
            raise UsageError(
                f"--ray {address}: no Ray cluster runs here; start one (`ray start --head`) or "
                "give its address"
            ) from None
        except ValueError as error:  # an address Ray cannot parse ("", "host:abc")
            raise UsageError(
                f"--ray {address!r}: {first_line(error)}; give a running cluster's HOST:PORT, "
                "or auto"
            ) from None
    return ray


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that takes no connection is refused at once: Ray itself
    retries such an address for minutes, printing a line per try."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise UsageError(
            f"--ray {address}: nothing answers there ({error.strerror or error}); start the "
            "cluster (`ray start --head`) or give its address"
        ) from None


def _ray_call(token: str, shared: list, item: object) -> object:
    global _THREADS
    if token not in _INSTALLED:
        import ray

        setup, task, context = ray.get(shared[0])
        # Ray runs as many one-CPU tasks at once on a node as the node has CPUs.
        node = ray.get_runtime_context().get_node_id()
        cpus = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node]
        _THREADS = _share(cpus[0] if cpus else 1)
        _INSTALLED.clear()
        _INSTALLED[token] = (task, setup(context))
    return _call(token, item)


def same(context: C) -> C:
    """The `setup` of tasks that need the context as it is."""
    return context
