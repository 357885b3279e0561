"""Free the Ray Train workers' CPUs of a trial that ASHA stopped.

Stopping a trial kills its process and, with it, the Ray Train controller the trial started. The
controller's placement group (the workers' CPUs) outlives it: Ray removes a placement group only
when both its creating actor and its job are gone, and the job is the search. Ray Train's own
cleaner asks the state API, which needs a dashboard and, on a host that runs several Rays, an
address it is not given; without it each stopped trial would keep its CPUs until the search ends,
and on a small cluster the next trials would wait for them forever.

So each Train run records `(controller actor, placement group)` in Ray's key-value store, and the
search driver removes the group once that controller is dead (`release_dead`).
"""

from __future__ import annotations

import logging
import time

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback

log = logging.getLogger("pipelines.tune")
PREFIX = "mmfusion-tune"


def kv_key(search_name: str, trial_id: str) -> bytes:
    return f"{PREFIX}/{search_name}/{trial_id}".encode()


class RecordPlacementGroup(WorkerGroupCallback):
    """A Ray Train callback (runs in the controller): record the worker group's placement group."""

    def __init__(self, key: bytes):
        self.key = key

    def after_worker_group_start(self, worker_group) -> None:
        import ray
        from ray.experimental import internal_kv

        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        line = f"{ray.get_runtime_context().get_actor_id()} {pg.id.hex()}\n".encode()
        old = internal_kv._internal_kv_get(self.key) or b""
        internal_kv._internal_kv_put(self.key, old + line, overwrite=True)


def release_dead(key: bytes) -> bool:
    """Remove the recorded placement groups whose controller is dead; True when none is left."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.experimental import internal_kv
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    lines = (internal_kv._internal_kv_get(key) or b"").decode().split("\n")
    left = []
    for line in filter(None, lines):
        actor_id, pg_id = line.split()
        if (ray._private.state.actors(actor_id) or {}).get("State", "DEAD") != "DEAD":
            left.append(line)
            continue
        if placement_group_table().get(pg_id, {}).get("state", "REMOVED") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            log.info("tune: released placement group %s of a stopped trial", pg_id)
    if left:
        internal_kv._internal_kv_put(key, ("\n".join(left) + "\n").encode(), overwrite=True)
    else:
        internal_kv._internal_kv_del(key)
    return not left


class ReleaseEndedTrials(Callback):
    """A Tune callback (runs in the driver): after a trial ends, release what its Train runs hold."""

    def __init__(self, search_name: str):
        self.search_name = search_name
        self._pending: set[bytes] = set()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._pending.add(kv_key(self.search_name, trial.trial_id))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._pending.add(kv_key(self.search_name, trial.trial_id))

    def on_step_begin(self, iteration, trials, **info) -> None:
        # The controller dies shortly after its trial: check again on each step of the loop.
        self._pending = {key for key in self._pending if not release_dead(key)}

    def on_experiment_end(self, trials, **info) -> None:
        """The last trial's controller may still be dying: give it a minute."""
        deadline = time.monotonic() + 60
        while self._pending and time.monotonic() < deadline:
            time.sleep(1)
            self.on_step_begin(0, trials)
