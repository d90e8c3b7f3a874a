"""lm-evaluation-harness scores a local multiple-choice task against the live server with no local tokenizer
(`local-completions`, tokenizer_backend=remote): /tokenizer_info, /tokenize and echo+logprobs completions."""

import json

import pytest

DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " a banana", " seven"], "label": 0},
    {"question": "Two plus two equals", "choices": [" purple", " four", " the moon"], "label": 1},
    {"question": "The opposite of hot is", "choices": [" table", " Tuesday", " cold"], "label": 2},
    {"question": "Water is made of hydrogen and", "choices": [" oxygen", " cheese", " music"], "label": 0},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def runtime_choice(model, question: str, choices: list[str]) -> int:
    """The choice with the highest summed logprob of its tokens, scored directly on the runtime."""
    context = model.tokenizer(question)["input_ids"]
    scores = []
    for choice in choices:
        ids = model.tokenizer(question + choice)["input_ids"]
        logprobs = model.forward_full(ids).log_softmax(-1)
        scores.append(sum(logprobs[p - 1, ids[p]].item() for p in range(len(context), len(ids))))
    return max(range(len(choices)), key=scores.__getitem__)


def test_lm_eval_local_completions_with_remote_tokenizer(base_url, default_model, tmp_path, monkeypatch):
    import lm_eval  # a dev dependency: `make test` installs it
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=smollm2-135m-instruct-tptt,base_url={base_url}/v1/completions,"
                   "tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,max_retries=1",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    accuracy = results["results"]["tiny_mc"]["acc,none"]
    expected = sum(runtime_choice(default_model, d["question"], d["choices"]) == d["label"] for d in DOCS) / len(DOCS)
    assert accuracy == pytest.approx(expected)
    assert accuracy >= 0.5  # the model knows most of these


def test_ruler_through_the_server_continues_as_the_runtime_does_in_process(base_url, default_model, tmp_path,
                                                                          monkeypatch):
    """`tptt-eval --ruler`'s two paths on the same lm-eval samples: lm-eval's local-completions backend on the
    server, and the in-process wrapper the base model runs through, greedy, the same text."""
    from tptt_runtime.engine.engine import eos_token_ids
    from tptt_runtime.eval import ruler
    from tptt_runtime.eval.run import Converted
    from tptt_runtime.loading import base_directory

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    tokenizer_dir, context, new_tokens = str(base_directory("default")), 512, 12
    served = ruler.evaluate(ruler.served_lm(base_url, "smollm2-135m-instruct-tptt", context, new_tokens),
                            "converted", tokenizer_dir, ["niah_single_1"], context, 2, new_tokens)
    local = ruler.GreedyLM(Converted(default_model, "converted"), default_model.tokenizer,
                           eos_token_ids(default_model))
    in_process = ruler.evaluate(local, "converted", tokenizer_dir, ["niah_single_1"], context, 2, new_tokens)
    assert [r["answer"] for r in served] == [r["answer"] for r in in_process]  # lm-eval made the same samples
    assert [r["output"] for r in served] == [r["output"] for r in in_process]
    assert all(r["output"].strip() for r in served)
