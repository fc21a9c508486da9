"""Every metric of the report for one model: sampled on held-out problems, paired with the base.

`evaluate_model` samples `eval.samples` completions per held-out problem at temperature 1 and
computes pass@k / CoT-pass@k curves, diversity (entropy of what `task.diversity_key` counts),
solution-set coverage, retention (the addition task), steerability (the task's steering probe,
if it has one; also asked only by in-context examples), Spectrum Tuning's yield and JS divergence
from uniform over the solution set and, against the base's own evaluation, support change, rank
bias, KL from the base and the sparse footprint (`jaxpost.footprint`, on the first
`eval.footprint_samples` of the base's samples per problem), with bootstrap 95% CIs over
problems. The per-problem values are kept so claims can pair models problem by problem.

A model decoded under a guide (Q♯'s `sampler.Guide`, `jaxpost.qsharp`) is its base's weights
plus the guide: its samples on the task and its steering probes are the guided policy's, its
likelihoods (KL from the base, footprint, state locality) the guided policy's teacher-forced
(`qsharp.guided_logprobs`). A token outside the guide's top-k has probability 0 under it, so a
base sample holding one has an infinite KL: `kl_from_base` is then the estimate over the base's
samples the guide supports, with `outside_guide` the share of them it does not (the true KL is
infinite when that share is > 0), and state locality counts the supported tokens only. Its
retention is the base's own: the guide is for the task it was trained on, and the weights are
untouched.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, evaluate, footprint, metrics, models, qsharp, sampler, spectrum, train
from jaxpost.headtohead.models import World
from jaxpost.inputs import Model


@dataclasses.dataclass
class Evaluation:
    """One model's evaluation: JSON-able summary plus the per-problem values claims pair on."""

    curves: dict
    scalars: dict
    per_problem: dict
    samples: evaluate.Samples | None = None
    footprint: dict | None = None  # `footprint.Footprint.summary` against the base

    def to_json(self) -> dict:
        return {"curves": self.curves, "scalars": self.scalars, "per_problem": self.per_problem,
                "footprint": self.footprint}


def forced_logprobs(model: Model, params, prompts, tokens, mask, chunk: int = 1024,
                    loss_impl: str = "auto", guide: sampler.Guide | None = None
                    ) -> np.ndarray:  # fmt: skip
    """Per-token logprobs [N, M] of fixed completions under a model (teacher forcing; at a
    large vocabulary from hidden states in vocabulary blocks, never [N, M, V] logits), or under
    the guided policy of `params` and `guide`; 0 where `mask` is 0."""
    fn = train.jitted_completion_logprobs(model.config, loss_impl)
    width = data.round_up(max(len(x) for x in prompts), 16)
    if guide is not None:
        chunk = min(chunk, qsharp.guided_rows(model.config, width, tokens.shape[1],
                                              guide.top_k))  # fmt: skip

        def fn(params, b):
            return qsharp.guided_logprobs(model.config, params, guide.params, b.prompt_tokens,
                                          b.prompt_mask, b.completion, b.completion_mask,
                                          eta=guide.eta, top_k=guide.top_k)  # fmt: skip

    out = []
    for i in range(0, len(prompts), chunk):
        pt, pm = data.left_pad(prompts[i : i + chunk], width, model.tokenizer.pad_id)
        batch = data.CompletionBatch(pt, pm, tokens[i : i + chunk], mask[i : i + chunk])
        out.append(np.asarray(fn(params, jax.tree.map(jnp.asarray, batch))))
    return np.where(np.asarray(mask) > 0, np.concatenate(out), 0.0)


def _rows(samples: evaluate.Samples) -> list[list[int]]:
    return [p for p in samples.prompts for _ in range(samples.n)]


def batch_nll(model: Model, params, batch, guide: sampler.Guide | None = None
              ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-token logprobs and mask of the targets of a training batch (this process's rows)."""
    if isinstance(batch, data.CompletionBatch):
        prompts = [r[m.astype(bool)].tolist() for r, m in zip(batch.prompt_tokens,
                                                              batch.prompt_mask)]  # fmt: skip
        mask = np.asarray(batch.completion_mask)
        lp = forced_logprobs(model, params, prompts, np.asarray(batch.completion), mask,
                             guide=guide)  # fmt: skip
        ok = np.isfinite(lp)  # under a guide: the tokens it supports
        return np.where(ok, lp, 0.0), mask * ok
    if guide is not None:
        raise ValueError("a guided model's likelihood is defined on completions only")
    return _sequence_nll(model.config, params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs(config, params, batch: data.SequenceBatch):
    hidden = models.hidden_states(config, params, batch.tokens, batch.attention_mask)
    mask = batch.loss_mask[:, 1:]
    impl = train.resolve_loss_impl("auto", config)
    return train.head_logprobs(config, params, hidden[:, :-1], batch.tokens[:, 1:], mask,
                               loss_impl=impl).logp  # fmt: skip


def _sequence_nll(config, params, batch: data.SequenceBatch) -> tuple[np.ndarray, np.ndarray]:
    logp = np.asarray(_sequence_logprobs(config, params, jax.tree.map(jnp.asarray, batch)))
    mask = np.asarray(batch.loss_mask[:, 1:])
    return logp * mask, mask


def _est(values) -> dict:
    return metrics.mean_ci(np.asarray(values, float)).as_dict()


def solution_diversity(keys) -> dict[str, list]:
    """Per problem, from the solutions of its correct samples (`task.diversity_key`, None for a
    wrong one): `diversity`, the chance that two of them are different solutions (1 - collision
    rate, Gini-Simpson; NaN under 2), unbiased whatever their number where the plug-in
    `solution_entropy` reads lower the fewer they are; and the `solution_counts` the diversity
    claims compare at equal sizes (`claims.entropy_gap`)."""
    return {"diversity": [1.0 - metrics.collision_rate(row) for row in keys],
            "solution_entropy": [metrics.solution_entropy(row) for row in keys],
            "solution_counts": [metrics.solution_counts(row) for row in keys]}  # fmt: skip


def sample_rows(w: World) -> int:
    """The most rows `evaluate_model` decodes at once (its memory plan's sampler batch)."""
    e = w.config.eval
    sets = [(len(w.test), e.samples), (len(w.retention_test), e.retention_samples)]
    if w.steer is not None:
        sets.append((len(w.steer_test), e.steer_samples))
    return max(evaluate.chunk_rows(p, n, w.mesh) for p, n in sets)


def evaluate_model(w: World, model: Model, params, *, base: Evaluation | None = None,
                   base_model: Model | None = None, seed: int = 0,
                   guide: sampler.Guide | None = None) -> Evaluation:  # fmt: skip
    """Every metric of the report for one model (the base's evaluation pairs with the others);
    with a `guide`, of `params` decoded under it (the module docstring)."""
    e, c = w.config.eval, w.config
    new_tokens = c.arm.max_new_tokens
    main = evaluate.sample(model.config, params, model.tokenizer, w.task, w.test, n=e.samples,
                           max_new_tokens=new_tokens, seed=seed, mesh=w.mesh, guide=guide)  # fmt: skip
    summary = evaluate.summarize(main)
    n = e.samples
    correct = main.answer_ok
    per_problem = {
        "pass@1": metrics.pass_at_k(n, correct.sum(1), 1).tolist(),
        "pass@large_k": metrics.pass_at_k(n, correct.sum(1), n).tolist(),
        "num_correct": correct.sum(1).tolist(),
        **solution_diversity(main.diversity_keys),
    }
    scalars = dict(summary["scalars"])
    scalars["pass@large_k"] = scalars.pop(f"pass@{n}")
    scalars["diversity"] = _est(per_problem["diversity"])
    scalars["solution_entropy"] = _est(per_problem["solution_entropy"])
    solution_sets = [w.task.solutions(p) for p in w.test]
    scalars["solution_set_coverage"] = _est(metrics.solution_set_coverage(main.canonical,
                                                                          solution_sets))  # fmt: skip
    # Spectrum Tuning's: distinct valid outputs per sample, JS from uniform over the solutions
    per_problem["yield"] = [metrics.distinct_ratios(row)["u_over_n"] for row in main.canonical]
    per_problem["js_from_uniform"] = [metrics.js_from_uniform(row, sols) for row, sols
                                      in zip(main.canonical, solution_sets)]  # fmt: skip
    scalars["yield"] = _est(per_problem["yield"])
    scalars["js_from_uniform"] = _est(per_problem["js_from_uniform"])

    # a guided model's retention is its base's: the guide is the task's (no `guide` here)
    add = evaluate.sample(model.config, params, model.tokenizer, w.retention, w.retention_test,
                          n=e.retention_samples, max_new_tokens=40, seed=seed + 1, mesh=w.mesh)  # fmt: skip
    per_problem["retention"] = add.answer_ok.mean(1).tolist()
    scalars["retention"] = _est(per_problem["retention"])

    if w.steer is not None:
        st = evaluate.sample(model.config, params, model.tokenizer, w.steer, w.steer_test,
                             n=e.steer_samples, max_new_tokens=new_tokens, seed=seed + 2,
                             mesh=w.mesh, guide=guide)  # fmt: skip
        comply = [[w.steer.complies(p, t) for t in row] for p, row in zip(w.steer_test, st.texts)]
        per_problem["steerability"] = np.mean(comply, axis=1).tolist()
        scalars["steerability"] = _est(per_problem["steerability"])
        scalars["steer_tv"] = _est([
            metrics.steer_distance([w.steer.compliant_canonical(p, t) for t in row],
                                   w.steer.requested_distribution(p))["tv"]
            for p, row in zip(w.steer_test, st.texts)
        ])  # fmt: skip
        per_problem["icl_steerability"] = in_context_steerability(w, model, params, seed + 3,
                                                                  guide)  # fmt: skip
        scalars["icl_steerability"] = _est(per_problem["icl_steerability"])

    if base is not None and base_model is not None:
        scalars.update({f"support_{k}": {"mean": v} for k, v in metrics.support_change(
            np.asarray(base.per_problem["num_correct"]), correct.sum(1)).items()})  # fmt: skip
        scalars["rank_bias"] = {"mean": rank_bias(base_model, main)}
        # KL(base || model) on the base's own samples
        bs = base.samples
        lp = sample_logprobs(model, params, bs, guide)
        scalars["kl_from_base"] = metrics.sequence_kl(bs.logprobs * bs.mask, lp, bs.mask).as_dict()
        if guide is not None:  # sequences the guide gives probability 0 (mean_ci drops them)
            scalars["kl_from_base"]["outside_guide"] = float(np.mean(~np.isfinite(lp).all(1)))
        if model.config.vocab_size == base_model.config.vocab_size:
            fp = sparse_footprint(w, base_model, model.config, params, bs, guide)
            per_problem.update({f"footprint_{k}": v for k, v in fp.per_problem.items()})
            return Evaluation(summary["curves"], scalars, per_problem, main, fp.summary)
    return Evaluation(summary["curves"], scalars, per_problem, main)


def _forced_once(model: Model, params, samples: evaluate.Samples, rows,
                 guide: sampler.Guide | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`forced_logprobs` [len(rows), M] of the sample `rows` (indices into `samples.tokens`), each
    distinct (problem, completion) teacher-forced once and its copies given its values; and
    each row's first copy."""
    first: dict = {}  # (problem, completion) -> the first of `rows` holding it
    heads = []
    for i in np.asarray(rows).tolist():
        key = (i // samples.n, samples.tokens[i][samples.mask[i] > 0].tobytes())
        heads.append(first.setdefault(key, i))
    heads = np.asarray(heads)
    distinct = np.unique(heads)
    prompts = _rows(samples)
    lp = forced_logprobs(model, params, [prompts[i] for i in distinct], samples.tokens[distinct],
                         samples.mask[distinct], guide=guide)  # fmt: skip
    return lp[np.searchsorted(distinct, heads)], heads


def sample_logprobs(model: Model, params, samples: evaluate.Samples,
                    guide: sampler.Guide | None = None) -> np.ndarray:  # fmt: skip
    """`forced_logprobs` [N, M] of every sample, each distinct (problem, completion) teacher-forced
    once and its copies given its values: the same numbers up to float rounding (a row's last
    bits depend on the batch's shapes), in a half to a quarter of the rows (a base's 24,576
    held-out samples held 11,569 distinct ones, a teacher's 6,020; seed 2, 2026-12-06)."""
    return _forced_once(model, params, samples, np.arange(len(samples.tokens)), guide)[0]


def rank_bias(base_model: Model, main: evaluate.Samples) -> float:
    """He et al.'s rank bias of a model's correct samples (`metrics.rank_bias`, per problem):
    the base's sequence logprob against the model's change of it. The base scores each distinct
    correct completion of a problem once, and its copies share that score and the model's
    logprob of the first copy: copies tie exactly, where scores computed per row would differ in
    their last bits (batch shapes) and rank the copies at random. Scoring only the distinct
    correct completions also saves most of the teacher forcing, which over every sample had cost
    as much as sampling them."""
    index = np.flatnonzero(np.asarray(main.answer_ok).reshape(-1))
    if not index.size:
        return float("nan")
    base_lp, heads = _forced_once(base_model, base_model.params, main, index)
    return metrics.rank_bias(base_lp.sum(1), np.asarray(main.seq_logprob).reshape(-1)[heads],
                             index // main.n)  # fmt: skip


def in_context_steerability(w: World, model: Model, params, seed: int,
                            guide: sampler.Guide | None = None) -> list[float]:  # fmt: skip
    """Per steering problem, the share of samples that comply with the requested first
    operation when the request is made only by examples: the plain prompt followed by
    `eval.icl_examples` compliant outputs, each closed by eos (`jaxpost.spectrum`)."""
    e, tok = w.config.eval, model.tokenizer
    contexts = spectrum.steer_contexts(w.steer, w.steer_test, examples=e.icl_examples, seed=seed)
    by_problem = dict(zip(w.steer_test, contexts))

    def encode(p):
        return spectrum.in_context_prompt(tok, w.task.render_prompt(p.base), by_problem[p])

    st = evaluate.sample(model.config, params, tok, w.steer, w.steer_test, n=e.steer_samples,
                         max_new_tokens=w.config.arm.max_new_tokens, seed=seed, encode=encode,
                         mesh=w.mesh, guide=guide)  # fmt: skip
    return [float(np.mean([w.steer.complies(p, t) for t in row]))
            for p, row in zip(w.steer_test, st.texts)]  # fmt: skip


def sparse_footprint(w: World, base_model: Model, config, params, base_samples: evaluate.Samples,
                     guide: sampler.Guide | None = None) -> footprint.Footprint:  # fmt: skip
    """`jaxpost.footprint` of a model against the base on the first `eval.footprint_samples`
    of the base's own samples of each held-out problem."""
    bs, k = base_samples, min(w.config.eval.footprint_samples, base_samples.n)
    rows = (np.arange(len(bs.prompts))[:, None] * bs.n + np.arange(k)).reshape(-1)
    prompts = [bs.prompts[i // bs.n] for i in rows]
    return footprint.footprint(base_model, base_model.params, config, params, prompts,
                               bs.tokens[rows], bs.mask[rows], k, guide=guide)  # fmt: skip
