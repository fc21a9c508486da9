"""Checkpoints of the training state, and clean stops on preemption.

`Checkpointer` is a thin layer over orbax's `CheckpointManager` that fixes the few decisions a
post-training run needs:

- What is saved is exactly the pytree it is given (the student's `TrainState`: params, optimizer
  state, step, rng, skipped-step counter) plus a small JSON dict of run metadata (`extra`: data
  position, config name, ...). Teacher and reference parameters are never part of that state: the
  trainer passes only the student's state, so a distillation checkpoint is as small as an SFT one
  and resuming never depends on which teacher was used.
- Saves are asynchronous. `save` returns once orbax has copied the arrays to host memory, so the
  caller may donate or overwrite the device buffers in the next step while the files are written
  in a background thread.
- A state with a NaN or inf in its params or optimizer state is refused with `NonFiniteStateError`
  before anything is written: a corrupted checkpoint is worse than none, because the run would
  resume from it forever.
- Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save
  interrupted by SIGKILL leaves a temporary directory that `latest_step` and `restore` ignore, and
  that a later save of the same step replaces.
- Restoring takes an abstract target (`jax.ShapeDtypeStruct` leaves carrying shardings) so every
  array is read straight into its final placement, and the pytree structure — including integer
  dict keys such as `{"layers": {0: ...}}` and optax's namedtuples — comes from the target, not
  from the strings orbax uses on disk.

`PreemptionGuard` turns SIGTERM (what cluster schedulers send before killing a job) into a flag the
step loop polls; `sync_should_stop` makes every process of a multi-host run agree on it, so all of
them take the final save together.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_log = logging.getLogger(__name__)

# Names of the two items of every checkpoint step (subdirectories of `<directory>/<step>/`).
_STATE = "state"
_META = "meta"


class NonFiniteStateError(ValueError):
    """Raised by `Checkpointer.save` for a state whose params or optimizer state are not finite."""


def abstract_like(tree: Any) -> Any:
    """The restore target matching a concrete pytree: its shapes, dtypes and shardings.

    Useful for resuming: build the initial state as usual (already placed on the mesh), then
    `restore(abstract_like(state))` reads the checkpoint into the same placement.
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _is_typed_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _inexact_leaves(tree: Any) -> list[tuple[Any, Any]]:
    return [
        (path, x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    # One fused reduction for the whole tree: a single scalar crosses to the host per save.
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def _check_finite(state: Any) -> None:
    """Raise NonFiniteStateError naming the offending leaves if params/opt_state are not finite."""
    parts = {
        name: getattr(state, name) for name in ("params", "opt_state") if hasattr(state, name)
    } or {"state": state}  # a bare pytree (no TrainState fields): check all of it
    leaves = _inexact_leaves(parts)
    if not leaves or bool(_all_finite([x for _, x in leaves])):
        return
    # The failure path may be slow: count the bad values leaf by leaf for a precise message.
    bad = []
    for path, x in leaves:
        n = int(jnp.size(x) - jnp.isfinite(x).sum())
        if n:
            bad.append(f"{jax.tree_util.keystr(path)} ({n} of {jnp.size(x)})")
    raise NonFiniteStateError(
        "refusing to checkpoint a state with non-finite values in: " + ", ".join(bad[:10])
        + (f" and {len(bad) - 10} more leaves" if len(bad) > 10 else "")
    )  # fmt: skip


def _key_paths(tree: Any) -> list[str]:
    return [
        jax.tree_util.keystr(p)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if _is_typed_key(x.dtype)
    ]


def _unwrap_keys(state: Any) -> tuple[Any, dict[str, str]]:
    """Typed PRNG keys -> their uint32 key data, plus {leaf path: key implementation name}.

    Orbax stores plain arrays; the implementation name goes into the JSON metadata so `restore`
    can wrap the data back into keys of the same kind.
    """
    impls = {}

    def unwrap(path, x):
        if not _is_typed_key(x.dtype):
            return x
        impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
        return jax.random.key_data(x)

    return jax.tree_util.tree_map_with_path(unwrap, state), impls


def _key_data_abstract(abstract: Any) -> Any:
    """Replace typed-key leaves of an abstract tree by the abstract uint32 data they store."""

    def to_data(x):
        if not _is_typed_key(x.dtype):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        # A sharding spec shorter than the rank leaves trailing dims replicated, so the key's own
        # sharding is also a valid sharding of its data (which only has extra trailing dims).
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)

    return jax.tree.map(to_data, abstract)


class Checkpointer:
    """Save and restore one training-state pytree per step, keeping the last few.

    Only what `save` receives is written; the trainer passes the student's TrainState, never the
    teacher's or the reference policy's parameters.

    Example::

        ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
        if ckpt.latest_step() is not None:
            state, extra = ckpt.restore(abstract_like(state))
        ...
        ckpt.save(step, state, extra={"examples_seen": n})
        ...
        ckpt.wait(); ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        """Open (or create) a checkpoint directory.

        Args:
          directory: where the step subdirectories live; made absolute (orbax needs that).
          max_to_keep: how many of the most recent checkpoints survive (None: all).
          save_interval_steps: `save(step, ...)` without `force` writes only when `step` is a
            multiple of this.
          async_save: write files in a background thread; `wait()` blocks until they are done.
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.directory = os.path.abspath(os.fspath(directory))
        # The interval is applied here rather than by orbax, whose policy also saves the first
        # step it sees (whatever it is): "multiple of the interval" is simpler to reason about.
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _META)
        )

    def latest_step(self) -> int | None:
        """The newest fully written step, or None if there is none (temporary dirs don't count)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every fully written step on disk, ascending."""
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state: Any, *, extra: dict | None = None, force: bool = False
    ) -> bool:
        """Start writing `state` (and the JSON-serializable `extra`) as checkpoint `step`.

        Returns True if a save was started; False if `step` is not on the save interval (and not
        `force`d) or is not newer than the latest checkpoint. Files are complete only after
        `wait()`; until then the step directory exists only under its temporary name.

        Raises:
          NonFiniteStateError: params or opt_state contain NaN/inf; nothing is written.
        """
        step = int(step)
        # Decide first: the finiteness check synchronizes with the device, and should only be paid
        # for on steps that actually save.
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        if not force and step % self.save_interval_steps != 0:
            return False
        _check_finite(state)
        state, key_impls = _unwrap_keys(state)
        meta = {"extra": dict(extra or {}), "typed_keys": key_impls}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Read checkpoint `step` (default: the latest) into the structure of `abstract_state`.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set (from
            `jax.eval_shape` plus the run's shardings, or `abstract_like(state)`); concrete arrays
            are accepted too. Restored arrays have exactly these shapes, dtypes and shardings, and
            the result has this pytree structure (dict keys of any hashable type, namedtuples).
          step: which checkpoint; None for the latest.

        Returns:
          (state, extra): the restored pytree and the `extra` dict given to `save`.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        abstract_state = abstract_like(abstract_state)
        missing = [
            jax.tree_util.keystr(p)
            for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
            if x.sharding is None
        ]
        if missing:
            raise ValueError(
                "restore needs a sharding on every leaf of the abstract state (use "
                f"jax.ShapeDtypeStruct(..., sharding=...)); missing on: {', '.join(missing[:10])}"
            )
        # The metadata first: it says which leaves were typed keys, and a mismatch with the target
        # deserves a clear error rather than orbax's complaint about a shape.
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )[_META]
        key_impls = meta.get("typed_keys", {})
        expected = _key_paths(abstract_state)
        if sorted(expected) != sorted(key_impls):
            raise ValueError(
                f"typed PRNG keys differ between the target ({expected}) and the checkpoint "
                f"({sorted(key_impls)}); save and restore with the same kind of rng leaf"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(_key_data_abstract(abstract_state))}
            ),
        )[_STATE]

        def rewrap(path, x):
            impl = key_impls.get(jax.tree_util.keystr(path))
            return x if impl is None else jax.random.wrap_key_data(x, impl=impl)

        # Wrap in the abstract tree's structure: the path strings then match those used at save.
        state = jax.tree_util.tree_map_with_path(
            lambda p, _, x: rewrap(p, x), abstract_state, restored
        )
        return state, meta.get("extra", {})

    def wait(self) -> None:
        """Block until every started save is fully on disk (renamed from its temporary dir)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's background threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """Context manager that turns SIGTERM (optionally SIGINT) into a `should_stop` flag.

    Schedulers (Kubernetes, SLURM, TPU maintenance events) send SIGTERM some seconds before they
    kill a job. Instead of dying mid-step, the loop polls `guard.should_stop` after each step and,
    when set, saves with `force=True`, waits for the save, and returns. The previous handlers are
    restored on exit, so the guard composes with whatever the host program installed.

    With `sigint=True`, a first Ctrl-C requests the same clean stop and a second one is passed to
    the previous handler (normally: KeyboardInterrupt), so an impatient user can still abort.

    Signal handlers can only be installed from the main thread; elsewhere (a loop run in a worker
    thread) the guard warns and stays inert, `should_stop` remaining False.
    """

    def __init__(self, *, sigint: bool = False):
        self.signals: tuple[int, ...] = (signal.SIGTERM,) + ((signal.SIGINT,) if sigint else ())
        self.should_stop = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.should_stop and signum == signal.SIGINT:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            raise KeyboardInterrupt
        self.should_stop = True
        self.received = signum
        _log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            _log.warning("PreemptionGuard outside the main thread: signals will not be caught")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # getsignal returns None for handlers not installed from Python; SIG_DFL is the
            # closest faithful restoration then.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def sync_should_stop(flag: bool) -> bool:
    """Whether any process wants to stop; every process gets the same answer.

    A signal reaches the processes of a multi-host job at different times (or only some of them).
    Since saving is collective, one process breaking out of the loop alone would deadlock the
    others in the next step's collectives; so the flags are all-gathered and OR-ed. This is a
    small blocking collective: call it once per step (or every few steps), at the same step on
    every process. Single process: returns `flag` unchanged.
    """
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
    return bool(np.any(flags))


__all__ = [
    "Checkpointer",
    "NonFiniteStateError",
    "PreemptionGuard",
    "abstract_like",
    "sync_should_stop",
]
