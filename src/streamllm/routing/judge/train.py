"""Training the complexity classifier from labelled queries (pure Python, deterministic).

`streamllm judge train` calls `train_classifier`: features are extracted, topic words that occur
in too few domains are dropped (what is left says what a query asks for, not what it is about,
and carries over to domains never seen), a multinomial logistic regression is fitted with
AdaGrad and L2, and a temperature is fitted on held-back training queries so that the
probabilities the router thresholds on mean what they say. The held-out split never enters.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamllm.config import COMPLEXITIES
from streamllm.routing.judge.features import extract
from streamllm.routing.judge.linear import LinearModel, softmax
from streamllm.routing.judge.metrics import evaluate


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    domain: str = ""


def load_examples(path: Path) -> list[Example]:
    """JSON Lines with `text` and `ground_truth` (or `label`); other fields are ignored."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            label = str(doc.get("ground_truth", doc.get("label", ""))).upper()
            text = doc["text"]
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: not a JSON object with 'text' and "
                             f"'ground_truth' ({e})") from None
        if label not in COMPLEXITIES or not isinstance(text, str):
            raise ValueError(f"{path}:{n}: ground_truth must be one of {', '.join(COMPLEXITIES)}")
        out.append(Example(text, label, str(doc.get("domain", ""))))
    return out


def _rank(text: str, salt: str = "") -> str:
    return hashlib.sha256((salt + text).encode()).hexdigest()


def split(examples: Sequence[Example], every: int = 5,
          salt: str = "heldout") -> tuple[list[Example], list[Example]]:
    """(train, held out): every `every`-th query of each domain and label, in hash order, is
    held out, so both parts keep the same mix and the choice never depends on file order."""
    groups: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for ex in examples:
        groups[(ex.domain, ex.label)].append(ex)
    train, held = [], []
    for key in sorted(groups):
        for i, ex in enumerate(sorted(groups[key], key=lambda e: _rank(e.text, salt))):
            (held if i % every == every - 1 else train).append(ex)
    return train, held


@dataclass(frozen=True)
class Params:
    # Chosen by leave-one-domain-out cross-validation on the training split (docs/judge.md).
    min_domains: int = 3  # a word must occur in this many domains to be a feature
    min_count: int = 2
    l2: float = 1e-4
    epochs: int = 15
    learning_rate: float = 0.2
    seed: int = 13


def select_features(docs: Sequence[Sequence[str]], domains: Sequence[str],
                    params: Params) -> set[str]:
    seen_in: dict[str, set[str]] = defaultdict(set)
    count: dict[str, int] = defaultdict(int)
    for feats, domain in zip(docs, domains):
        for f in feats:
            seen_in[f].add(domain)
            count[f] += 1
    n_domains = len(set(domains))
    need = min(params.min_domains, n_domains)
    return {
        f for f, ds in seen_in.items()
        # Shape features (#...) say nothing about topic: keep them whatever their spread.
        if count[f] >= params.min_count and (f.startswith("#") or len(ds) >= need)
    }


def fit(docs: Sequence[Sequence[str]], labels: Sequence[str], params: Params) -> LinearModel:
    """Multinomial logistic regression by AdaGrad on L2-normalised binary feature vectors."""
    index = {lb: i for i, lb in enumerate(COMPLEXITIES)}
    y = [index[lb] for lb in labels]
    weights: dict[str, list[float]] = {}
    grads: dict[str, list[float]] = {}
    bias, bias_g = [0.0, 0.0, 0.0], [1e-8, 1e-8, 1e-8]
    order = list(range(len(docs)))
    rng = random.Random(params.seed)
    lr, l2 = params.learning_rate, params.l2
    for _ in range(params.epochs):
        rng.shuffle(order)
        for i in order:
            feats = docs[i]
            if not feats:
                continue
            scale = 1.0 / math.sqrt(len(feats))
            scores = list(bias)
            for f in feats:
                w = weights.get(f)
                if w is not None:
                    for c in range(3):
                        scores[c] += w[c] * scale
            probs = softmax(scores)
            err = [probs[c] - (1.0 if c == y[i] else 0.0) for c in range(3)]
            for c in range(3):
                bias_g[c] += err[c] * err[c]
                bias[c] -= lr * err[c] / math.sqrt(bias_g[c])
            for f in feats:
                w = weights.setdefault(f, [0.0, 0.0, 0.0])
                g2 = grads.setdefault(f, [1e-8, 1e-8, 1e-8])
                for c in range(3):
                    g = err[c] * scale + l2 * w[c]
                    g2[c] += g * g
                    w[c] -= lr * g / math.sqrt(g2[c])
    return LinearModel(weights=weights, bias=bias)


def fit_temperature(model: LinearModel, docs: Sequence[Sequence[str]],
                    labels: Sequence[str]) -> float:
    """The temperature that minimises log loss on queries the model was not fitted on."""
    index = {lb: i for i, lb in enumerate(COMPLEXITIES)}
    scored = [(model.scores(d), index[lb]) for d, lb in zip(docs, labels)]

    def loss(t: float) -> float:
        return -sum(math.log(max(softmax([s / t for s in sc])[y], 1e-12)) for sc, y in scored)

    lo, hi = 0.05, 20.0
    for _ in range(60):  # golden-section search on log t: the loss is unimodal in practice
        a, b = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def _featurise(examples: Iterable[Example]) -> list[list[str]]:
    return [extract(ex.text) for ex in examples]


def _fit_filtered(train: Sequence[Example], docs: Sequence[Sequence[str]],
                  params: Params) -> LinearModel:
    keep = select_features(docs, [ex.domain for ex in train], params)
    filtered = [[f for f in d if f in keep] for d in docs]
    return fit(filtered, [ex.label for ex in train], params)


def predict(model: LinearModel, docs: Sequence[Sequence[str]]) -> list[str]:
    out = []
    for d in docs:
        scores = model.scores(d)
        out.append(COMPLEXITIES[max(range(3), key=lambda c: scores[c])])
    return out


def cross_validate(examples: Sequence[Example], params: Params) -> dict[str, Any]:
    """Leave one domain out: train on the others, score the domain left out. This is the
    estimate of how the judge does on a domain it has never seen."""
    docs = _featurise(examples)
    domains = sorted({ex.domain for ex in examples})
    per_domain: dict[str, float] = {}
    truth: list[str] = []
    pred: list[str] = []
    for held in domains:
        tr = [i for i, ex in enumerate(examples) if ex.domain != held]
        te = [i for i, ex in enumerate(examples) if ex.domain == held]
        model = _fit_filtered([examples[i] for i in tr], [docs[i] for i in tr], params)
        p = predict(model, [docs[i] for i in te])
        t = [examples[i].label for i in te]
        per_domain[held] = evaluate(t, p)["macro_f1"]
        truth += t
        pred += p
    overall = evaluate(truth, pred)
    return {"macro_f1": overall["macro_f1"], "accuracy": overall["accuracy"],
            "high_recall": overall["high_recall"], "cost_leak": overall["cost_leak"],
            "per_domain_macro_f1": per_domain}


def train_classifier(examples: Sequence[Example], params: Params = Params()) -> LinearModel:
    """The shipped model: fitted on all of `examples` (the training split), with its
    temperature fitted by refitting on four fifths and scoring the fifth left out."""
    fit_part, calib_part = split(examples, every=5, salt="calibration")
    calib_model = _fit_filtered(fit_part, _featurise(fit_part), params)
    temperature = fit_temperature(calib_model, _featurise(calib_part),
                                  [ex.label for ex in calib_part])
    docs = _featurise(examples)
    model = _fit_filtered(examples, docs, params)
    model.temperature = temperature
    model.weights = {f: w for f, w in model.weights.items() if any(abs(x) >= 1e-4 for x in w)}
    model.meta = {
        "trained_on": len(examples),
        "domains": sorted({ex.domain for ex in examples}),
        "params": params.__dict__,
        "features": len(model.weights),
    }
    return model
