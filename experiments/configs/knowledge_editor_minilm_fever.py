"""KnowledgeEditor on the MiniLM fact checker, FEVER claims (survey issue 6).

  python -m experiments.fact_check_edit --output_dir=runs/fever
  python -m experiments.train_hypernet \
      --config=experiments/configs/knowledge_editor_minilm_fever.py

The fact checker (all-MiniLM-L6-v2 + a linear head; blocks >= 4 fine-tuned)
is trained on the FEVER train split and cached; the hypernetwork is trained
on verdict flips of `pool` train claims (and their `fever.TRAIN_RULES`
rewrites), validated on `valid_pool` dev claims. Fields and defaults:
`fever_training.knowledge_editor_config()`; `editor` holds the
`KnowledgeEditorHParams` (targets: the last block's FFN output and the head).
"""

import ml_collections

from keditjax.evaluation import fever_training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  return fever_training.knowledge_editor_config()
