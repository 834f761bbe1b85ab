"""Per-field F1 for structured JSON answers: partial credit where exact match gives none.

A local `evaluate` module: hub metrics cannot load offline, and no hub metric scores JSON fields.
Each reply and reference is parsed as a JSON object; their (key, value) pairs are compared.
A reply that is not a JSON object scores 0 on every field.
"""

import json

import datasets
import evaluate


def _pairs(text):
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        start, end = str(text).find("{"), str(text).rfind("}")
        try:
            obj = json.loads(str(text)[start : end + 1]) if 0 <= start < end else None
        except json.JSONDecodeError:
            obj = None
    if not isinstance(obj, dict):
        return None
    return {(str(k), json.dumps(v, sort_keys=True)) for k, v in obj.items()}


def field_scores(prediction, reference):
    """(F1 over key/value pairs, {field: 1.0 if right else 0.0}) for one reply."""
    ref, pred = _pairs(reference) or set(), _pairs(prediction)
    fields = {k: 0.0 for k, _ in ref}
    if not pred or not ref:
        return 0.0, fields
    hits = ref & pred
    for key, _ in hits:
        fields[key] = 1.0
    precision, recall = len(hits) / len(pred), len(hits) / len(ref)
    f1 = 0.0 if not hits else 2 * precision * recall / (precision + recall)
    return f1, fields


class JsonFieldF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions and references: lists of JSON-object strings",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, per_item=False):
        per_field, f1s = {}, []
        for prediction, reference in zip(predictions, references):
            f1, fields = field_scores(prediction, reference)
            f1s.append(f1)
            for key, hit in fields.items():
                per_field.setdefault(key, []).append(hit)
        result = {"field_f1": sum(f1s) / len(f1s) if f1s else 0.0}
        result.update({f"field_acc_{k}": sum(v) / len(v) for k, v in sorted(per_field.items())})
        if per_item:  # the gate pairs systems item by item
            result["field_f1_items"] = f1s
        return result
