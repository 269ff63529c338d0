"""The example scripts' runtime (``run_translation.py``, ``run_image_classification.py``) and the benchmarks'
task data: never imported by the library.

``runtime`` (arguments, the run's start, the train/evaluate/predict tail), ``launch`` (Hub checks, resume,
logging, process checks), ``output_folder``, ``folder_lock`` and ``data_checks`` (the output-folder guard and
its one-run lock, early data errors),
``translation_data`` and ``seq2seq_from_scratch`` (translation), ``image_data`` (image classification). They need
the ``examples`` extra: ``pip install 'labo-hf[examples]'``.
"""

from __future__ import annotations

import importlib.util

# Import name -> distribution of the packages the scripts need beyond the library's own dependencies.
EXTRA_PACKAGES = {
    "datasets": "datasets",
    "sacrebleu": "sacrebleu",
    "sentencepiece": "sentencepiece",
    "tokenizers": "tokenizers",
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
}

_missing = [dist for name, dist in EXTRA_PACKAGES.items() if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"labo_hf.examples needs {', '.join(sorted(_missing))}, from the examples extra: "
        "pip install 'labo-hf[examples]' (or pip install -e '.[examples]' in a clone)"
    )
