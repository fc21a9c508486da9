"""GSM8K-style source: answer parsing, verifiers, local JSONL and TFDS (mock data only)."""

import os
from fractions import Fraction

import numpy as np
import pytest

from jaxpost import data
from jaxpost.tasks import Task
from jaxpost.tasks import gsm8k as g

RECORDS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "A shirt costs $1,200 and is discounted by $250. What does it cost?",
        "answer": "It costs 1,200 - 250 = <<1200-250=950>>950 dollars.\n#### 950",
    },
    {"question": "Half of 3?", "answer": "3/2 = <<3/2=1.5>>1.5\n#### 1.5"},
]


def _task(tmp_path):
    train, test = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
    data.write_jsonl(train, RECORDS[:2] + RECORDS[2:])  # the last one is also in test
    data.write_jsonl(test, RECORDS[2:])
    return g.GSM8K.from_jsonl(train, test)


def test_numbers_and_final_answer():
    assert g.parse_number("1,000") == g.parse_number("$1000") == g.parse_number("1000.00") == 1000
    assert g.parse_number("7.") == 7 and g.parse_number("abc") is None
    assert g.format_number(Fraction(3, 2)) == "1.5" and g.format_number(Fraction(4)) == "4"
    assert g.format_number(Fraction(-1, 3)) == "-1/3" and g.parse_number("-1/3") == Fraction(-1, 3)
    assert g.final_answer("#### 1/3") == Fraction(1, 3)
    assert g.final_answer("so 3 then 4\n#### 72 apples, not 9") == 72
    assert g.final_answer("The answer is 1,024.") == 1024
    assert g.final_answer("no digits") is None
    assert g.evaluate("(2+3)*4 - -1") == 21 and g.evaluate("1/0") is None
    assert g.evaluate("2**3") is None and g.evaluate("1.5*2") == 3


def test_verifiers(tmp_path):
    task = _task(tmp_path)
    assert isinstance(task, Task)
    p = task.test[0] if task.test[0].answer == "72" else task.train[0]
    assert p.answer == "72" and p.rationale.startswith("Natalia sold 48/2")
    reference = task.render_completion(p, "72")
    assert task.verify_answer(p, reference) and task.verify_chain(p, reference)
    assert task.canonical(p, reference) == "72" and task.solutions(p) == ["72"]
    assert task.verify_chain(p, "48/2 = 24, 48 + 24 = 72. The answer is 72.")
    wrong_step = "48/2 = <<48/2=25>>25, and 25+47 = 72.\n#### 72"
    assert task.verify_answer(p, wrong_step) and not task.verify_chain(p, wrong_step)
    assert not task.verify_chain(p, "48/0 = 72\n#### 72")  # division by zero
    for bad in ["", "####", "#### seventy-two", "#### 71", "<<<<>>>>", "=" * 1000, "1+" * 500]:
        assert not task.verify_answer(p, bad) and task.canonical(p, bad) is None
    half = next(q for q in task.test if q.answer == "1.5")
    assert task.verify_chain(half, task.render_completion(half, "1.5"))
    assert task.verify_answer(half, "#### 1.50")
    with pytest.raises(ValueError):
        task.render_completion(p, "71")


def test_jsonl_splits_are_disjoint_and_seeded(tmp_path):
    task = _task(tmp_path)
    assert len(task.train) == 2 and len(task.test) == 1
    assert not {q.question for q in task.train} & {q.question for q in task.test}
    assert task.prompts("train", 2, seed=0) == task.prompts("train", 2, seed=0)
    assert sorted(task.prompts("train", 2, seed=1), key=str) == sorted(task.train, key=str)
    assert task.render_prompt(task.test[0]) == "Question: Half of 3?\nAnswer:"
    with pytest.raises(ValueError):
        task.prompts("test", 2, seed=0)
    with pytest.raises(ValueError, match="numeric final answer"):
        g.problem_from_record({"question": "q", "answer": "no marker"})


def test_tfds_source_with_mock_data(tmp_path):
    os.environ["NO_GCE_CHECK"] = "true"
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    def as_dataset(self, *args, **kwargs):
        rows = [{**r, "annotation": "", "short_answer": r["answer"].rsplit(" ", 1)[-1]}
                for r in RECORDS]  # fmt: skip
        return tf.data.Dataset.from_generator(
            lambda: iter(rows),
            output_signature={k: tf.TensorSpec((), tf.string) for k in rows[0]},
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset, data_dir=str(tmp_path)):
        examples = data.tfds_examples("gsm8k", "train", data_dir=str(tmp_path))
        task = g.GSM8K.from_tfds(data_dir=str(tmp_path))
    assert [e["question"] for e in examples] == [r["question"] for r in RECORDS]
    assert isinstance(examples[0]["answer"], str)
    assert [p.answer for p in task.test] == ["72", "950", "1.5"]
    assert task.train == ()  # the mock serves the same rows for both splits: all held out
    for p in task.test:
        assert task.verify_chain(p, task.render_completion(p, p.answer))
    np.testing.assert_equal(len(examples), 3)


def test_reasoning_path_and_privileged_view(tmp_path):
    task = _task(tmp_path)
    p = next(q for q in (*task.train, *task.test) if q.answer == "72")
    reference = task.render_completion(p, "72")
    assert g.reasoning_path(reference) == "24;72|72"
    # the same steps in other words are one path; other steps or a bare answer are another
    assert g.reasoning_path("Half of 48 is 48/2 = 24; 48+24 = 72.\n#### 72") == "24;72|72"
    assert g.reasoning_path("24 + 48 = 72\n#### 72") == "72|72"
    assert g.reasoning_path("#### 72") == "|72"
    view = g.privileged_view(task, p)
    assert view.teacher_prompt == view.prefix + view.student_prompt
    assert view.student_prompt == task.render_prompt(p) and reference in view.prefix
