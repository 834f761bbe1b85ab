"""An lm-eval few-shot sampler that returns the shots stored on the question itself (its `shots` field)."""

from lm_eval.api.samplers import ContextSampler

from serving.prompt_rule import listed


class ListedShots(ContextSampler):
    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if eval_doc is None:
            raise ValueError("listed shots need the question: set fewshot_split to the scored split")
        shots = eval_doc["shots"]
        if len(shots) < n:
            raise ValueError(f"example {eval_doc['id']}: {len(shots)} listed shots, {n} asked for")
        return listed(shots, n)  # the prompt rule's order: for retrieved shots the n nearest, nearest last
