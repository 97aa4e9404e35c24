"""Three lm-eval tasks built from a local text file, for offline runs (tests, a machine without the hub):

    diffuse_cloze     multiple_choice: a sentence without its last word; the word against 3 last words of others (acc)
    diffuse_continue  generate_until: a sentence's first half; its second half, up to the period (exact_match)
    diffuse_text      loglikelihood_rolling: the paragraphs themselves (word/byte perplexity, bits per byte)

`write_local_tasks(text, folder)` writes the jsonl data and the yamls (`dataset_path: json` with absolute
`data_files`): `python -m diffuse.lm_eval tasks=[diffuse_cloze,…] task_dir=FOLDER builtin_tasks=false`. Every metric
here is computed by lm-eval itself (none goes through `evaluate.load`, which downloads).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from diffuse.errors import DiffuseError

TASKS = {
    "diffuse_cloze": """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_target: "{{gold}}"
doc_to_choice: "{{choices}}"
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "diffuse_continue": """output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs: {until: ["."], max_gen_toks: 32, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
    "diffuse_text": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
  - {metric: bits_per_byte}
""",
}


def sentences(text: str) -> list[str]:
    found = [s.strip() + "." for s in re.split(r"\.\s*", text) if len(s.strip().split()) >= 3]
    return list(dict.fromkeys(found))  # each distinct sentence once, in order


def write_local_tasks(text_path: str | Path, folder: str | Path, docs: int = 40, seed: int = 0) -> Path:
    text = Path(text_path).read_text(encoding="utf-8")
    found = sentences(text)
    endings = sorted({s.rsplit(" ", 1)[1] for s in found})
    if len(found) < 2 or len(endings) < 4:
        raise DiffuseError(f"{text_path} has too few distinct sentences for the local tasks (need 4 endings)")
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cloze, cont = [], []
    for s in (found * (docs // len(found) + 1))[:docs]:
        head, last = s.rsplit(" ", 1)
        choices = [last] + rng.sample([e for e in endings if e != last], 3)
        rng.shuffle(choices)
        cloze.append({"context": head, "choices": [" " + c for c in choices], "gold": choices.index(last)})
        words = s.rstrip(".").split(" ")
        cut = len(words) // 2
        cont.append({"context": " ".join(words[:cut]), "target": " " + " ".join(words[cut:])})
    paragraphs = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()][:docs]
    for name, rows in (("diffuse_cloze", cloze), ("diffuse_continue", cont), ("diffuse_text", paragraphs)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
                "test_split: test\n")
        (folder / f"{name}.yaml").write_text(head + TASKS[name] + "metadata:\n  version: 1.0\n", encoding="utf-8")
    return folder
