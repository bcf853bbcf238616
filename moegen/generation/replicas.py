"""Data-parallel generation: N engines as Ray actors, pulling prompts from one shared queue.

The driver puts every pending (index, prompt) on a `ray.util.queue.Queue`; each replica feeds
its engine's `generate_iter` from that queue (its first window half of an even share, planned on
that window), so a replica pulls more whenever its batch has room and a fast one takes more, and
puts each Completion on a results queue the driver drains (the driver alone writes the journal).
A prompt stays in the driver's `work` until its completion comes back: when a replica dies, the
rows it held are put on the queue again for the others once the round ends, and a row that comes
back twice is yielded once.

Devices: on CUDA each replica reserves one GPU (Ray hands replica i its own device, which it sees
as `cuda`); on CPU each reserves `threads` CPUs and runs torch on that many threads. Without a
KV budget each replica takes its share (1/N) of the default. `ray_address` joins a running
cluster (moegen must be installed on its nodes); without one a local Ray is started.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from itertools import count, tee

from moegen.engine.llm_engine import WINDOW
from moegen.errors import ConfigError, InputError, MoegenError
from moegen.recipe import EngineRecipe

log = logging.getLogger("moegen")
POLL_S = 0.2          # how often the driver looks at the results queue and the replicas
PULL_CHUNK = 16       # prompts a replica takes from the queue per round trip


class Replica:
    """One engine in a Ray actor (made an actor class by Replicas)."""

    def start(self, recipe: EngineRecipe, threads: int | None, share: int) -> int:
        """Build the engine (a method, not __init__, so that its errors reach the driver as
        themselves); returns this process's id."""
        import torch
        if threads:
            torch.set_num_threads(threads)
        kwargs = dict(recipe.kwargs)
        if recipe.on_cuda:
            kwargs["device"] = "cuda"     # the one GPU Ray gave this actor
        if kwargs.get("host_memory") is None and kwargs.get("kv_cache_memory") is None and share > 1:
            kwargs["kv_cache_memory"] = kv_share_bytes(share)
        self.engine = EngineRecipe(recipe.model, recipe.dummy_weights, kwargs).build()
        return os.getpid()

    def run(self, work, results, params, truncate: str | None, window: int | None) -> int:
        """Generate until the work queue is empty; returns the number of completions sent.
        params None: each work item's prompt comes with its own SamplingParams, (prompt, params)."""
        if params is None:
            indices, prompts, per_prompt = tee(pulled(work), 3)
            prompts, params = (p for _, (p, _) in prompts), (sp for _, (_, sp) in per_prompt)
        else:
            indices, prompts = tee(pulled(work))
            prompts = (p for _, p in prompts)
        sent = 0
        for completion in self.engine.generate_iter(prompts, params, truncate=truncate,
                                                    indices=(i for i, _ in indices), window=window):
            results.put(completion)
            sent += 1
        return sent


def kv_share_bytes(share: int) -> int:
    from moegen.engine.memory import host_memory_bytes
    from moegen.planner.policy import default_kv_cache_bytes
    return default_kv_cache_bytes(host_memory_bytes()) // share


def pulled(work):
    """(index, prompt) items from the work queue until it is empty (all work is queued before
    the replicas start, so empty means done)."""
    from ray.util.queue import Empty
    while True:
        try:
            items = work.get_nowait_batch(min(PULL_CHUNK, max(1, work.qsize())))
        except Empty:                     # another replica took some meanwhile: one at a time
            try:
                items = [work.get_nowait()]
            except Empty:
                return
        yield from items


class Replicas:
    """N engine replicas on Ray. `generate_iter` takes the Engine's prompts, params, truncate and
    indices and keeps its contract: completions in finish order, each with its index."""

    def __init__(self, recipe: EngineRecipe, replicas: int, ray_address: str | None = None,
                 threads: int | None = None, window: int | None = None):
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise ConfigError("replicas need Ray: pip install 'moegen[cluster]'") from None
        self._own_ray = not ray.is_initialized()
        if self._own_ray and ray_address:
            ray.init(address=ray_address)     # joining a cluster takes no local options
        elif self._own_ray:
            ray.init(include_dashboard=False)
        self.window, self.actors = window, []
        self.work, self.results = Queue(), Queue()
        try:
            self._start(recipe, replicas, threads)
        except BaseException:
            self.close()
            raise

    def _start(self, recipe: EngineRecipe, replicas: int, threads: int | None) -> None:
        """The actors, each holding a GPU or `threads` CPUs, with their engines built."""
        import ray
        self.threads = None if recipe.on_cuda else threads or cpu_share(replicas)
        need = {"GPU": replicas} if recipe.on_cuda else {"CPU": replicas * self.threads}
        have = ray.cluster_resources()
        for kind, amount in need.items():
            if have.get(kind, 0) < amount:       # Ray would wait for them forever
                raise ConfigError(f"{replicas} replicas need {amount:g} {kind}s; the Ray cluster has "
                                  f"{have.get(kind, 0):g}")
        actor = ray.remote(num_gpus=1 if recipe.on_cuda else 0, num_cpus=0 if recipe.on_cuda else self.threads,
                           max_restarts=0)(Replica)
        self.actors = [actor.remote() for _ in range(replicas)]
        self._pid = dict(zip(self.actors, self._get([a.start.remote(recipe, self.threads, replicas)
                                                     for a in self.actors])))

    @property
    def pids(self) -> list[int]:
        """Process ids of the live replicas."""
        return [self._pid[a] for a in self.actors]

    def generate_iter(self, prompts, params=None, truncate: str | None = None, indices=None):
        """params: one SamplingParams, or a list with one per prompt (each travels with its prompt)."""
        from moegen.engine import SamplingParams
        params = params or SamplingParams()
        if isinstance(params, list):
            prompts, params = list(zip(prompts, params)), None
        work = dict(zip(count() if indices is None else indices, prompts))   # until its row is back
        while work:                       # a round; another only for the rows of replicas that died
            if not self.actors:
                raise MoegenError(f"every replica died with {len(work)} rows unfinished; run again to resume")
            live = len(self.actors)
            for chunk in chunks(list(work.items()), 4096):
                self.work.put_nowait_batch(chunk)
            window = self.window or first_window(len(work), len(self.actors))
            runs = {a.run.remote(self.work, self.results, params, truncate, window): a for a in self.actors}
            for completion in self._collect(runs):
                if work.pop(completion.index, None) is not None:
                    yield completion
            if work and len(self.actors) == live:
                raise MoegenError(f"the replicas ended with {len(work)} rows unanswered and none died")

    def _collect(self, runs: dict):
        """Completions while the round's runs last; a replica that dies leaves the round."""
        import ray
        pending = list(runs)
        while pending:
            yield from self._drain()
            ready, pending = ray.wait(pending, timeout=POLL_S)
            for ref in ready:
                self._check(ref, runs[ref])
        yield from self._drain()

    def _drain(self) -> list:
        waiting = self.results.qsize()
        return self.results.get_nowait_batch(waiting) if waiting else []

    def _check(self, ref, actor) -> None:
        from ray.exceptions import RayActorError
        try:
            self._get(ref)
        except RayActorError as e:
            self.actors.remove(actor)
            log.warning("replica (pid %s) died (%s); its unfinished rows go to the others", self._pid[actor],
                        type(e).__name__)

    @staticmethod
    def _get(refs):
        """ray.get, raising a replica's own error (an InputError stays an InputError)."""
        import ray
        from ray.exceptions import RayTaskError
        try:
            return ray.get(refs)
        except RayTaskError as e:
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None

    def close(self) -> None:
        import ray
        for handle in self.actors:
            ray.kill(handle)
        self.actors = []
        self.work.shutdown()
        self.results.shutdown()
        if self._own_ray:
            ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def first_window(rows: int, replicas: int) -> int:
    """Prompts a replica takes before it starts: half its even share (at most the engine's
    window), so that the other half goes to whichever replicas finish first."""
    return max(1, min(WINDOW, -(-rows // (2 * replicas))))


def cpu_share(replicas: int) -> int:
    """CPU threads per replica: the cluster's CPUs split evenly (at least one each)."""
    import ray
    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) // replicas)


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def open_source(recipe: EngineRecipe, rows: int, replicas: int = 1, ray_address: str | None = None,
                threads: int | None = None):
    """What generates `rows` rows: nothing when there are none, one engine here, or (replicas > 1
    or a cluster address) Replicas on Ray, closed at the end."""
    if replicas < 1:
        raise InputError(f"replicas must be >= 1, got {replicas}")
    if not rows:
        yield None
    elif replicas > 1 or ray_address:
        with Replicas(recipe, replicas, ray_address, threads) as source:
            yield source
    else:
        yield recipe.build()
