"""One arm's run on disk: train it from the base and evaluate it (`train_and_evaluate`, the same
in the main process and in a worker of `parallel`), its directory (claimed by `arm_key`), its
saved evaluation and curve; and the run's persistent compilation cache.

    WORKDIR/arms/<arm>/arm_key       the settings its checkpoints were trained under
    WORKDIR/arms/<arm>/eval.json     its evaluation under `eval_key` (or why it diverged)
    WORKDIR/arms/<arm>/metrics.jsonl its training curve
    WORKDIR/xla_cache/               compiled programs shared by the run, its workers and reruns
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxpost import metrics, workdir
from jaxpost.errors import Diverged, Preempted
from jaxpost.headtohead import arms, evaluation, models, settings
from jaxpost.headtohead.evaluation import Evaluation
from jaxpost.metrics_log import read_metrics

ARM_KEY_FILE = "arm_key"


def history(path: str) -> list[dict]:
    """An arm's training curve from its metrics.jsonl (a resumed run's replayed steps deduped)."""
    if not os.path.exists(os.path.join(path, "metrics.jsonl")):
        return []
    rows = {}
    for r in read_metrics(path):
        rows[r["step"]] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                           for k, v in r.items()}  # fmt: skip
    return [rows[k] for k in sorted(rows)]


def _read(path: str, key: str) -> dict | None:
    """A saved eval.json if it holds this `key`, else None."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return saved if saved.get("key") == key else None


def _evaluation(saved: dict) -> Evaluation:
    return Evaluation(saved["curves"], saved["scalars"], saved["per_problem"],
                      footprint=saved.get("footprint"))


def load_eval(path: str, key: str) -> Evaluation | None:
    """A reference model's saved evaluation of this `key`, or None."""
    saved = _read(path, key)
    return None if saved is None else _evaluation(saved)


def load_arm(config, arm: str, key: str) -> ArmOutcome | None:
    """An arm's saved outcome under this `key` (its evaluation and extras, or why it diverged),
    read once from its eval.json; None when it has none."""
    saved = _read(eval_path(config, arm), key)
    if saved is None:
        return None
    if "diverged" in saved:
        return ArmOutcome(diverged=saved["diverged"])
    return ArmOutcome(_evaluation(saved), saved["extra"])


def save_eval(path: str, key: str, ev: Evaluation, extra: dict | None = None) -> None:
    save_json(path, {"key": key, **ev.to_json(), **(extra or {})})


def save_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    workdir.write_atomic(path, json.dumps(value, default=float).encode())


def claim_arm_dir(arm_dir: str, key: str, arm: str, log) -> None:
    """Make `arm_dir` hold only this run's training: checkpoints and curves another arm_key left
    there (other settings, e.g. a new learning rate) would otherwise be resumed as this run's.
    They are moved aside to `<arm_dir>.stale-<their key>`, not deleted."""
    marker = os.path.join(arm_dir, ARM_KEY_FILE)
    if os.path.isdir(arm_dir):
        old = None
        if os.path.exists(marker):
            with open(marker) as f:
                old = f.read().strip()
        if old == key:
            return  # the same run, interrupted: resume it
        stale = f"{arm_dir}.stale-{old or 'unmarked'}"
        log(f"{arm}: {arm_dir} holds a run with other settings; moved it to {stale} and "
            f"starting this arm over")  # fmt: skip
        if os.path.exists(stale):
            shutil.rmtree(stale)
        os.replace(arm_dir, stale)
    os.makedirs(arm_dir)
    with open(marker, "w") as f:
        f.write(key)


def eval_path(config, arm: str) -> str:
    return os.path.join(config.workdir, "arms", arm, "eval.json")


@dataclasses.dataclass
class ArmOutcome:
    """One arm trained and evaluated (`evaluation`, `extra`) or why it diverged (`diverged`)."""

    evaluation: Evaluation | None = None
    extra: dict | None = None
    diverged: str | None = None


def train_and_evaluate(w: models.World, m: models.Models, arm: str,
                       base: Callable[[], Evaluation], log: Callable[[str], None] = print
                       ) -> ArmOutcome:  # fmt: skip
    """Train one arm from the base (resuming its checkpoint when its directory holds this
    arm_key's run), evaluate it against the base's evaluation (`base()`, asked for once the
    arm is trained), and save its eval.json (or why it diverged: the other arms go on). Raises
    Preempted after SIGTERM, its checkpoint saved."""
    config = w.config
    arm_dir = os.path.join(config.workdir, "arms", arm)
    saved, eval_key = eval_path(config, arm), settings.eval_key(config)
    claim_arm_dir(arm_dir, settings.arm_key(config), arm, log)
    t0 = time.perf_counter()
    try:
        result = arms.run_arm(w, arm, m, log)
    except Diverged as e:
        log(f"{arm}: {e}")
        save_json(saved, {"key": eval_key, "diverged": str(e)})
        return ArmOutcome(diverged=str(e))
    if result.preempted:
        raise Preempted(f"{arm}: preempted (SIGTERM); the arm's checkpoint is saved; rerun "
                        f"the same command to resume")  # fmt: skip
    train_s = time.perf_counter() - t0
    log(f"{arm}: trained in {train_s:.0f} s; evaluating")
    t0 = time.perf_counter()
    params = result.params
    ev = evaluation.evaluate_model(w, m.base, params, base=base(), base_model=m.base,
                                   seed=config.seed, guide=result.guide)  # fmt: skip
    curve = history(arm_dir)
    tokens = sum(h.get("sampled_tokens", h.get("num_tokens", 0.0)) or 0.0 for h in curve)
    extra = {"tokens": tokens, "train_seconds": train_s}
    if result.last_batch is not None:
        lp, mask = evaluation.batch_nll(m.base, params, result.last_batch, result.guide)
        own = ev.samples
        extra["state_locality"] = metrics.state_locality(lp, mask, own.logprobs * own.mask,
                                                          own.mask)  # fmt: skip
    extra["eval_seconds"] = time.perf_counter() - t0
    save_eval(saved, eval_key, ev, {"extra": extra})
    return ArmOutcome(ev, extra)


def drop_cache_without_access_times(cache: str, log) -> bool:
    """Remove a persistent compilation cache whose entries lack their access-time files (written
    by JAX without a size limit): with a limit, JAX's eviction reads every entry's access time
    and fails each write to such a cache (a warning per program, nothing cached). It is only a
    cache; returns whether it was removed."""
    if not os.path.isdir(cache):
        return False
    names = set(os.listdir(cache))
    if not any(n.endswith("-cache") and n.removesuffix("-cache") + "-atime" not in names
               for n in names):  # fmt: skip
        return False
    log(f"{cache} was written without access times (an older jaxpost); removed it")
    shutil.rmtree(cache)
    return True


def use_compilation_cache(path: str, log, tidy: bool = True) -> None:
    """Keep the run's compiled programs in WORKDIR/xla_cache (JAX's persistent cache), unless
    the caller set a cache: arms whose steps are the same program (grpo and grpo_unlikely) and
    every rerun of the command skip compiling. Programs that compile in under a second are not
    kept. The size limit (never reached) makes JAX lock the cache around each read and write:
    arm workers (`parallel`) share it, and a reader must not see a half-written entry.

    With `tidy` (the run, not its workers), a cache an older jaxpost wrote without the limit is
    removed first (`drop_cache_without_access_times`)."""
    if jax.config.jax_compilation_cache_dir:
        return
    cache = os.path.join(path, "xla_cache")
    if tidy:
        drop_cache_without_access_times(cache, log)
    try:
        from jax.experimental import compilation_cache as cc

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_compilation_cache_max_size", 8 * 2**30)
        cc.compilation_cache.reset_cache()  # take the directory even if a program compiled before
    except (ImportError, AttributeError) as e:  # a jax without these: run without the cache
        log(f"no persistent compilation cache ({e})")
