"""The one-worker training context (engine/training.py `StoreTrainContext`): checkpoints in the store, on a
local directory and on S3, restored newest-complete-first, pruned to `keep`; and which nodes need Ray Train."""

from __future__ import annotations

import torch

from interpflow.workflows.engine.store import Store
from interpflow.workflows.engine.training import STATE_FILE, StoreTrainContext, Training


def _context(store: Store, keep: int = 2) -> StoreTrainContext:
    return StoreTrainContext(store, store.path(".train", "fit-0123"), keep)


def test_checkpoints_restore_the_newest_and_keep_only_the_last_ones(store_uri):
    store = Store(store_uri)
    context = _context(store)
    assert context.restore() is None
    for step in (5, 10, 15):
        context.report(step, {"loss": 1.0 / step}, {"w": torch.full((3,), float(step))})
    context.report(16, {"loss": 0.0})  # metrics alone make no checkpoint

    state = _context(store).restore()  # a new context: what a rerun of the node sees
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((3,), 15.0))
    assert [step for step, _ in context._checkpoints()] == [10, 15]


def test_a_checkpoint_cut_off_before_its_step_file_is_never_restored(store_uri):
    store = Store(store_uri)
    context = _context(store, keep=3)
    context.report(5, {}, {"w": torch.ones(2)})
    torn = store.path(".train", "fit-0123", "checkpoint_000000010")  # a crash between the two writes
    store.fs.create_dir(torn, recursive=True)
    with store.fs.open_output_stream(f"{torn}/{STATE_FILE}") as f:
        f.write(b"partial")

    state = _context(store, keep=3).restore()
    assert state["step"] == 5 and torch.equal(state["w"], torch.ones(2))


def test_only_several_workers_or_a_process_group_need_ray_train():
    assert not Training().on_ray_train
    assert Training(num_workers=2).on_ray_train
    assert Training(distributed=True).on_ray_train  # DeepSpeed on one worker still needs a process group
    assert Training().run_name("sae", "ab" * 32) == "sae-" + "ab" * 12
