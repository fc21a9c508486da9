"""Checkpoints of the training state: asynchronous, never non-finite, falling back when corrupt.

`Checkpointer` is a thin layer over orbax's `CheckpointManager` that fixes the few decisions a
post-training run needs:

- What is saved is exactly the pytree it is given (the student's `TrainState`; teacher and
  reference parameters never are, so resuming never depends on the teacher) plus a small JSON
  dict of run metadata (`extra`).
- Saves are asynchronous: `save` returns once the arrays are in host memory (the caller may
  donate the device buffers) and the files are written in a background thread. A save that
  cannot fit on the disk is refused before it starts; a background write that failed is
  reported at the next step boundary (`check`); both as a one-line `CheckpointWriteError`.
- A state with a NaN or inf in its params or optimizer state is refused (`NonFiniteStateError`)
  before anything is written: a run would resume from a corrupted checkpoint forever.
- Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save
  interrupted by SIGKILL leaves a temporary directory that `latest_step` and `restore` ignore.
  A complete checkpoint that does not restore (a truncated file) is moved aside and the newest
  intact one is used (`restore_newest_intact`).
- Restoring takes an abstract target (`jax.ShapeDtypeStruct` leaves carrying shardings) so every
  array is read straight into its final placement, and the pytree structure (integer dict keys,
  optax's namedtuples) comes from the target, not from the strings orbax uses on disk.

SIGTERM handling (a clean save-and-stop on preemption) is `jaxpost.preemption`.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxpost.errors import UserError

# Names of the two items of every checkpoint step (subdirectories of `<directory>/<step>/`).
_STATE = "state"
_META = "meta"


class NonFiniteStateError(ValueError):
    """Raised by `Checkpointer.save` for a state whose params or optimizer state are not finite."""


class CheckpointWriteError(UserError):
    """A checkpoint's background write failed (a full disk, a lost mount): the run stops at the
    next step boundary, the previous checkpoints intact."""


class NoIntactCheckpointError(UserError):
    """Every checkpoint in the directory failed to restore (nothing was moved)."""


def abstract_like(tree: Any) -> Any:
    """The restore target matching a concrete pytree: its shapes, dtypes and shardings.

    Useful for resuming: build the initial state as usual (already placed on the mesh), then
    `restore(abstract_like(state))` reads the checkpoint into the same placement.
    """
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(
        x, "sharding", None)), tree)  # fmt: skip


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
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, x in leaves if _is_typed_key(x.dtype)]


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

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True):  # fmt: skip
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
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)  # fmt: skip
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=(_STATE, _META))  # fmt: skip

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
        self._check_space(step, state)
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
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have "
                                    f"{self.all_steps()}")  # fmt: skip
        abstract_state = abstract_like(abstract_state)
        missing = [jax.tree_util.keystr(p) for p, x in
                   jax.tree_util.tree_flatten_with_path(abstract_state)[0] if x.sharding is None]  # fmt: skip
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

    def restore_newest_intact(self, abstract_state: Any, say=print) -> tuple[Any, int]:
        """Restore the newest checkpoint that reads back; returns (state, its step).

        A checkpoint that fails to restore (a truncated or corrupt file: a disk that filled up,
        a copy cut short) is moved aside to `<directory>.corrupt/<step>` (never deleted), `say`
        tells which and why, and the next older one is tried. Every process of a multi-host run
        takes the same decision (a step counts as intact only if it restored everywhere).

        Raises:
          NoIntactCheckpointError: no checkpoint restored; nothing was moved (a checkpoint of
            another model or code version fails on every step the same way).
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state, _ = self.restore(abstract_state, step)
                error = None
            except Exception as e:  # noqa: BLE001  (any reader failure means "not intact")
                state, error = None, f"{type(e).__name__}: {_first_line(e)}"
            if _all_processes_agree(error is None):
                for bad, why in failed:
                    moved = self._move_aside(bad)
                    say(f"checkpoint step {bad} in {self.directory} could not be restored "
                        f"({why}); moved it to {moved}; resuming from step {step}")  # fmt: skip
                return state, step
            failed.append((step, error or "failed on another process"))
        steps = ", ".join(f"step {s}: {why}" for s, why in failed[:3])
        raise NoIntactCheckpointError(
            f"no checkpoint in {self.directory} could be restored ({steps}); if it belongs to "
            f"another run or version, pass a new --workdir"
        )

    def _move_aside(self, step: int) -> str:
        target = os.path.join(self.directory + ".corrupt", str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                target = f"{target}.{len(os.listdir(os.path.dirname(target)))}"
            os.replace(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxpost_checkpoint_moved_{step}")
        self._manager.reload()  # orbax lists the steps once; read the directory again
        return target

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse a save that cannot fit before writing any of it (a write that fills the disk
        fails in orbax's background threads, loudly and late). The previous save is finished
        first (orbax would wait for it anyway), so the free space is what this one gets."""
        self.wait()
        need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) * 1.1 + 2**20
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise CheckpointWriteError(
                f"no space for checkpoint step {step} in {self.directory}: it needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; "
                f"{self._last_complete()}: free space or pass another --workdir, then rerun")

    def _last_complete(self) -> str:
        steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]  # finalized only
        return f"the last complete checkpoint is step {max(steps)}" if steps else (
            "no checkpoint is complete")  # fmt: skip

    def check(self) -> None:
        """Raise `CheckpointWriteError` if a background save has failed (cheap: call per step)."""
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from None

    def _write_error(self, e: BaseException) -> CheckpointWriteError:
        try:
            free = f"{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        code = re.search(r"os_error_code='?(\d+)", str(e))  # TensorStore's form of an OSError
        why = os.strerror(int(code.group(1))) if code else f"{type(e).__name__}: {_first_line(e)}"
        return CheckpointWriteError(f"writing a checkpoint to {self.directory} failed ({why}; "
                                    f"{free} there); {self._last_complete()}: free space or pass "
                                    f"another --workdir, then rerun to resume")  # fmt: skip

    def wait(self) -> None:
        """Block until every started save is fully on disk (renamed from its temporary dir);
        raises `CheckpointWriteError` if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from None

    def close(self) -> None:
        """Finish pending saves and release orbax's background threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, dtype=np.int32))))


__all__ = [
    "CheckpointWriteError",
    "Checkpointer",
    "NoIntactCheckpointError",
    "NonFiniteStateError",
    "abstract_like",
]
