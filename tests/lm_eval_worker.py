"""Runs lm-evaluation-harness (``local-completions`` with the remote tokenizer) against a
mullama server, offline, in a process of its own (the harness and its dependencies
stay out of the test process and its warning filters).

Usage: python lm_eval_worker.py BASE_URL TASK_DIR BATCH_SIZE OUT_JSON
Writes the task metrics and, per sample, the request arguments and responses.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    base_url, task_dir, batch_size, out = sys.argv[1:5]
    # nothing may be downloaded: the tasks' data are local files
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.chdir(task_dir)  # the task YAMLs name their data files relative to it

    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": "mullama", "base_url": f"{base_url}/v1/completions", "tokenizer_backend": "remote",
                    "tokenized_requests": True, "max_retries": 1, "num_concurrent": 1, "max_length": 512},
        tasks=["mullama_mc", "mullama_gen"],
        batch_size=int(batch_size),
        task_manager=TaskManager(include_path=task_dir),
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = {}
    for task, items in results["samples"].items():
        samples[task] = [{"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"],
                          "filtered_resps": s["filtered_resps"]} for s in items]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"results": results["results"], "samples": samples}, f, default=str)


if __name__ == "__main__":
    main()
