"""MEND on the MiniLM fact checker, FEVER verdict flips (survey issue 6).

  python -m experiments.train_hypernet \
      --config=experiments/configs/mend_classifier_minilm_fever.py --workdir=runs/mend_fever

Same fact checker, edits, rewrites and other claims as the KnowledgeEditor
config; the editor networks are MEND's (keditjax/editors/mend_classifier.py,
recipe in keditjax/evaluation/fever_training.py).
"""

from keditjax.evaluation import fever_training


def get_config():
  return fever_training.mend_classifier_config()
