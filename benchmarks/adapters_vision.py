"""Seeing through adapters: the multimodal LLaMA-Adapter vs a BLIP-2-style bridge at equal trainable parameters,
beside the CLIP-style model's zero-shot and linear-probe accuracy on the same test images.

The task (adapt.seeing.image_questions): "What is shown in this image?" about real images that install offline,
answered by the class name: Fashion-MNIST (10 garments), MNIST (10 digits, "seven"), openclipart-png animals
(5 kinds); 25 answers in all, each source's fixed train/test split, `--train-per-source` and `--test-per-source`
images of each (seeded, class proportions kept). The image tower is the embedded vlm's frozen EfficientNet-Lite0
(ImageNet weights) at 112 px: its pooled feature (1280) feeds the multimodal adapter, its 4x4 feature map before
the pool (16 tokens of 1280) the bridge; both computed once per image and cached on disk. The LM is the embedded
SmolLM2-135M-Instruct, frozen. The multimodal adapter: K=10 prompts in each of the top L=8 layers plus the
projection (785,096 parameters); the bridge: 8 queries, 1 block, its width sized to the nearest parameter count
(adapt.seeing.equal_budget). Both train the same steps on the same seeded batches, then answer every test image
greedily; the score is the exact match of the answer's first line with the class name (metrics.instructions,
SQuAD normalisation) and `contains` (the name as whole words in it).

The same modules also learn two questions about data.captioned's rendered capital letters (A B C E G K R S in 6 type
styles and 4 inks, 32 px, dark ink on white): "What colour is the letter?" (black, red, green, blue) and "Which letter
is this?", both asked about each of the same `--train-per-source` training renders and `--test-per-source` test
renders (captioned's test split: other draws of size, rotation and offset), so only the question tells which answer
is wanted. And "How many digits are there?" about as many scenes of 1 to 4 real MNIST digits on a 2 x 2 grid
(adapt.seeing.counting_pool; "one" to "four"). Training batches mix the four question types; each type is scored on
its own test questions.

Beside them, on the same test images, per question type: the untouched LM (the same question, no image: what it
says without seeing), CLIP-style zero-shot of the embedded dual encoder over the type's answers (its
prompt-ensembled class embeddings of the 25 class names, of "red letter" ... -> "a photo of a red letter.", of
"letter A" ...), and a linear probe (scikit-learn logistic regression, standardised features, C=1) on the same
pooled features the adapter reads, trained on the same training images and that type's answers.

Per module: score (top level: the "what is shown" questions; `per_question`: each type), seconds per training step
(mean after the first), peak RSS during training and its rise over the start, trainable parameters, patch bytes (the
module's tensors as safetensors), first and last tenth of the losses.
Each trained module is saved (safetensors) into --save, with one test image per source as PNG, for
`lifelong chat --adapter FILE --image PNG "What is shown in this image?"` (a letter: "What colour is the letter?").

    OMP_NUM_THREADS=1 python benchmarks/adapters_vision.py        # ~15 min on one thread of a busy 2-core machine

One torch thread whatever the environment says. Writes benchmarks/results/adapters_vision.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lifelong.adapt.instruct import TrainSettings
from lifelong.adapt.seeing import (
    KINDS,
    QUESTIONS,
    count_for,
    equal_budget,
    image_questions,
    question_features,
    question_prompt,
    save_vision_module,
    score_answers,
    train_seeing,
    vision_fingerprint,
)
from lifelong.adapt.seeing import answer_images as answer
from lifelong.config import ModelConfig
from lifelong.families.lm import build_lm
from lifelong.families.vlm import build_vlm
from lifelong.metrics.editing import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters_text import write_record  # noqa: E402  (the text half's helpers)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "adapters_vision.json"
SAVE = ROOT / "runs" / "adapters_vision"


def per_source(predictions: list[str], answers: list[str], sources: list[str]) -> dict:
    out = {}
    for name in dict.fromkeys(sources):
        idx = [i for i, s in enumerate(sources) if s == name]
        out[name] = score_answers([predictions[i] for i in idx], [answers[i] for i in idx])
    return out


def samples(predictions: list[str], answers: list[str], sources: list[str], keep: int = 3) -> list[dict]:
    out, seen = [], {}
    for p, a, s in zip(predictions, answers, sources):
        if seen.get(s, 0) < keep:
            seen[s] = seen.get(s, 0) + 1
            out.append({"source": s, "reference": a, "prediction": p})
    return out


def pick(values, idx: list[int]) -> list:
    return [values[i] for i in idx]


# what CLIP's zero-shot calls each question type's answers: its templates then read "a photo of a red letter."
ZERO_SHOT_NAMES = {"what": "{}", "colour": "{} letter", "letter": "letter {}", "count": "{} digits"}


def zero_shot_name(kind: str, answer: str) -> str:
    return "one digit" if (kind, answer) == ("count", "one") else ZERO_SHOT_NAMES[kind].format(answer)


def clip_baselines(vlm, train, test, train_pooled, test_pooled) -> dict:
    """Per question type: zero-shot over the type's answers, and a logistic-regression probe on the pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = {}
    for kind in dict.fromkeys(test.kinds):
        tr, te = train.of_kind(kind), test.of_kind(kind)
        names = test.choices[kind]
        truth, sources = pick(test.answers, te), pick(test.sources, te)
        with torch.no_grad():
            class_emb = vlm.class_embeddings([zero_shot_name(kind, n) for n in names])
            # the pooled feature is the trunk's output: the dual encoder's image embedding is its projection
            image_emb = torch.nn.functional.normalize(vlm.image_projection(test_pooled[te]), dim=-1)
            zero_shot = [names[i] for i in (image_emb @ class_emb.T).argmax(1).tolist()]
        scaler = StandardScaler().fit(train_pooled[tr].numpy())
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_pooled[tr].numpy()),
                                                              pick(train.answers, tr))
        probed = list(probe.predict(scaler.transform(test_pooled[te].numpy())))
        acc = lambda pred: float(np.mean([p == a for p, a in zip(pred, truth)]))  # noqa: E731
        by_source = lambda pred: {  # noqa: E731
            s: float(np.mean([p == a for p, a, t in zip(pred, truth, sources) if t == s]))
            for s in dict.fromkeys(sources)}
        out[kind] = {"zero_shot": {"accuracy": acc(zero_shot), "per_source": by_source(zero_shot),
                                   "class_names": [zero_shot_name(kind, n) for n in names]},
                     "linear_probe": {"accuracy": acc(probed), "per_source": by_source(probed)}}
    # the top level keeps the "what is shown" questions' numbers, as before the letter questions came
    return {"zero_shot": out["what"]["zero_shot"] | {"templates": list(vlm.templates)},
            "linear_probe": out["what"]["linear_probe"] | {
                "classifier": "sklearn LogisticRegression(C=1, max_iter=2000) on standardised features"},
            "per_question": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-per-source", type=int, default=400)
    parser.add_argument("--test-per-source", type=int, default=60)
    parser.add_argument("--adapter-len", type=int, default=10)
    parser.add_argument("--adapter-layers", type=int, default=8, help="with --adapter-len, sets the budget")
    parser.add_argument("--num-queries", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--chat", action="store_true", help="prompts through the chat template (2-3x the tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--save", type=Path, default=SAVE, help="folder for the trained modules and sample images")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    started = time.time()
    load_before = os.getloadavg()

    train = image_questions("train", args.train_per_source, seed=args.seed)
    test = image_questions("test", args.test_per_source, seed=args.seed)
    kinds_asked = list(dict.fromkeys(test.kinds))  # question types: "what", "colour", "letter"
    by_kind = {q: test.of_kind(q) for q in kinds_asked}
    vision = ModelConfig(name="embedded", resolution=112)
    vlm = build_vlm(vision)
    tower = vision_fingerprint(vlm)
    t0 = time.perf_counter()
    train_pooled, train_spatial = question_features(vlm, train)
    test_pooled, test_spatial = question_features(vlm, test)
    feature_seconds = time.perf_counter() - t0
    counts = {q: (len(train.of_kind(q)), len(by_kind[q]), len(test.choices[q])) for q in kinds_asked}
    print(f"(training, test) questions and answers per type: {counts}; features {tuple(train_pooled.shape[1:])} "
          f"pooled, {tuple(train_spatial.shape[1:])} spatial ({feature_seconds:.0f} s, cached after the first run)",
          flush=True)
    baselines = clip_baselines(vlm, train, test, train_pooled, test_pooled)
    for q, b in baselines["per_question"].items():
        print(f"{q:6s} CLIP-style zero-shot {b['zero_shot']['accuracy']:.3f}, linear probe "
              f"{b['linear_probe']['accuracy']:.3f}", flush=True)
    args.save.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(test.sources):  # one test image per source, to try by hand
        i = test.sources.index(name)
        Image.fromarray(test.image(i)).save(args.save / f"{name}-{test.answers[i].replace(' ', '_')}.png")

    lm, tok = build_lm(args.model)
    results = {"untouched_lm": {}, "modules": {}}
    for q in kinds_asked:
        blind = generate(lm, tok, [question_prompt(tok, QUESTIONS[q], args.chat)], max_new_tokens=args.max_new_tokens,
                         batch_size=1)[0].strip()  # the same for every image: it sees none
        results["untouched_lm"][q] = {"prediction": blind, **score_answers([blind] * len(by_kind[q]),
                                                                           pick(test.answers, by_kind[q]))}
        print(f"untouched LM, no image, {QUESTIONS[q]!r}: {blind!r}", flush=True)
    results["untouched_lm"] |= results["untouched_lm"]["what"]  # the top level: the "what" question, as before
    specs = equal_budget(lm.config.hidden_size, train_pooled.shape[-1], args.adapter_len, args.adapter_layers,
                         args.num_queries, args.blocks)
    budget = count_for(specs["multimodal-adapter"], lm.config.hidden_size, train_pooled.shape[-1])
    for kind in kinds:
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, chat=args.chat, seed=args.seed)
        t0 = time.perf_counter()
        run = train_seeing(lm, tok, specs[kind], train_pooled, train_spatial, train.answers, settings,
                           questions=train.questions)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_question, sampled = {}, []
        for q, idx in by_kind.items():
            predictions = answer(lm, tok, run.module, test_pooled[idx], test_spatial[idx], question=QUESTIONS[q],
                                 chat=args.chat, max_new_tokens=args.max_new_tokens)
            answers, sources = pick(test.answers, idx), pick(test.sources, idx)
            per_question[q] = score_answers(predictions, answers) | {
                "per_source": per_source(predictions, answers, sources)}
            sampled += [{"question": QUESTIONS[q]} | x for x in samples(predictions, answers, sources)]
        eval_seconds = time.perf_counter() - t0
        file = save_vision_module(args.save / f"{kind}.safetensors", run, kind, lm, args.model, vision, tower,
                                  args.chat, questions=[QUESTIONS[q] for q in kinds_asked])
        what = per_question["what"]
        results["modules"][kind] = {"exact_match": what["exact_match"], "contains": what["contains"]} | run.summary()
        results["modules"][kind] |= {
            "per_source": what["per_source"], "per_question": per_question,
            "samples": sampled, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds, "budget_ratio": run.trainable / budget, "losses": run.losses,
            "saved": str(file.relative_to(ROOT) if file.is_relative_to(ROOT) else file)}
        scores = "  ".join(f"{q} {v['exact_match']:.3f}" for q, v in per_question.items())
        print(f"{kind:19s} exact {scores}  trainable {run.trainable:,}  {run.seconds_per_step:.3f} s/step  peak "
              f"{run.peak_mb:.0f} MiB (+{run.delta_mb:.0f})  patch {run.patch_bytes:,} B  loss "
              f"{run.summary()['loss_first']:.3f} -> {run.summary()['loss_last']:.3f}", flush=True)
        if hasattr(run.module, "detach"):
            run.module.detach()  # the multimodal adapter's hooks off: the next module sees the bare LM
        del run

    write_record(args.out, {
        "question": QUESTIONS["what"], "questions": {q: QUESTIONS[q] for q in kinds_asked}, "chat_template": args.chat,
        "train_items": len(train.of_kind("what")), "test_items": len(by_kind["what"]),  # the "what" questions
        "train_questions": {q: len(train.of_kind(q)) for q in kinds_asked},
        "test_questions": {q: len(by_kind[q]) for q in kinds_asked},
        "answers": list(test.choices["what"]), "choices": {q: list(test.choices[q]) for q in kinds_asked},
        "sources": {s: len({m for m, t in zip(test.images, test.sources) if t == s})  # test images per source
                    for s in dict.fromkeys(test.sources)},
        "budget": budget, "specs": {k: asdict(v) for k, v in specs.items()},
        "feature_seconds": feature_seconds, "baselines": baselines, "results": results,
    }, started, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
