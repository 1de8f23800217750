"""Learned output-length predictors: labels from the served model, rankers, baselines, probe.

Importing this package registers the learned predictors by name in ``rankserve.predict`` (which
does not import this layer); torch and the weights load when one is first built.
"""

from __future__ import annotations

from pathlib import Path

from rankserve.predict import Predictor, register_learned

#: The MiniLM text models over the prompt (what ``rankserve train`` trains).
TEXT_MODEL_KINDS = ("ranker", "classifier", "regressor")
#: Predictors that read the prompt text through a trained model (need rankserve[model]); the probe
#: then refines from the served model's hidden states.
LEARNED_NAMES = (*TEXT_MODEL_KINDS, "probe")


def _factory(name: str):
    def build(labels: str | None, weights: str | Path | None) -> Predictor:
        from rankserve.learn.predictors import make_learned_predictor  # torch, on first use only

        return make_learned_predictor(name, labels, weights)

    return build


for _name in LEARNED_NAMES:
    register_learned(_name, _factory(_name))
