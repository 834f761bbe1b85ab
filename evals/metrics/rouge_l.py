"""ROUGE-L F-measure: longest-common-subsequence overlap for free-text answers.

A local `evaluate` module around rouge_score, because the hub's `rouge` cannot load offline.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions and references: lists of strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, per_item=False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        result = {"rougeL": sum(scores) / len(scores) if scores else 0.0}
        if per_item:  # the gate pairs systems item by item
            result["rougeL_items"] = scores
        return result
