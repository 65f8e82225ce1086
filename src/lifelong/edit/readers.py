"""Readers for the two edit-data files the field shares, into `EditRequest`s.

EasyEdit ZsRE (`zsre_mend_eval.json`, `zsre_mend_eval_portability_gpt4.json`): a JSON list of
    {"subject", "src" (question), "alt" (new answer), "answers" [true answers], "rephrase" (question),
     "loc" ("nq question: ..."), "loc_ans", optional "portability": {"New Question", "New Answer"}}
  Records with an empty "alt" are skipped, as EasyEdit's ZsreDataset does.

CounterFact (ROME's `counterfact.json`, as EasyEdit reads it): a JSON list of
    {"case_id", "requested_rewrite": {"prompt" (with "{}" for the subject), "subject",
     "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts" [..],
     "neighborhood_prompts" [..] (their answer is target_true), optional "portability"}
  ("prompt_full" is used when a variant ships the filled prompt instead.)

EasyEdit's flat CounterFact (`counterfact-edit.json`, `counterfact-train.json`, read by its
CounterFactDataset): a JSON list of
    {"case_id", "prompt" (filled), "subject", "target_new", "ground_truth", "rephrase_prompt",
     "locality_prompt", "locality_ground_truth", optional "portability" as in ZsRE}

KnowEdit (EasyEdit's benchmark files, e.g. `ZsRE-test-all.json`, `counterfact-test-all.json`,
`recent_test.json`, read by its KnoweditDataset): a JSON list of
    {"subject" (or "concept"), "prompt" (or "text"), "target_new" (or "labels"), optional "ground_truth",
     optional "rephrase", "portability": {"Reasoning" | "Subject_Aliasing" | "Logical_Generalization" ...:
     [{"prompt", "ground_truth"}]}, "locality": {"Relation_Specificity" | "Forgetfulness": [...]}}
  A probe's "ground_truth" may be a string or a (nested) list of aliases: the first one is its answer, as
  EasyEdit unwraps it; probes with an empty answer are skipped, as there. Every portability and locality
  group is kept; the relation field names the file's kind ("knowedit").

EasyEdit joins prompt and answer with a space (`prompt + ' ' + target`); here every answer carries
its own leading space instead, so the same text is scored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lifelong.data.edit_requests import EditRequest, Probe
from lifelong.errors import DataFormatError


def _space(s: str) -> str:
    return " " + str(s).strip()


def _load_list(path: str | os.PathLike[str]) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _portability(record: dict) -> tuple[Probe, ...]:
    port = record.get("portability")
    if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
        return (Probe(port["New Question"], _space(port["New Answer"])),)
    return ()


def read_easyedit_zsre(path: str | os.PathLike[str], limit: int | None = None) -> list[EditRequest]:
    """EasyEdit's ZsRE JSON as requests (locality: the NQ question with its answer)."""
    out = []
    for i, r in enumerate(_load_list(path)):
        try:
            if not r["alt"]:
                continue
            rephrase = r.get("rephrase") or ()
            out.append(EditRequest(
                prompt=r["src"], target_new=_space(r["alt"]), subject=r.get("subject", ""),
                ground_truth=_space(r["answers"][0]) if r.get("answers") else "",
                paraphrases=(rephrase,) if isinstance(rephrase, str) else tuple(rephrase),
                locality=(Probe(r["loc"], _space(r["loc_ans"])),) if r.get("loc") else (),
                portability=_portability(r), relation="zsre", case_id=str(r.get("case_id", i))))
        except (KeyError, TypeError, IndexError) as e:
            raise DataFormatError(f"{path}: record {i} is not EasyEdit ZsRE (needs src, alt, answers, rephrase, "
                                  f"loc, loc_ans): {e!r}") from e
        if limit is not None and len(out) == limit:
            break
    return out


def read_counterfact(path: str | os.PathLike[str], limit: int | None = None) -> list[EditRequest]:
    """ROME/EasyEdit CounterFact JSON as requests (locality: neighborhood prompts -> target_true)."""
    out = []
    for i, r in enumerate(_load_list(path)):
        try:
            rw = r["requested_rewrite"]
            subject = rw["subject"]
            prompt = rw["prompt"].format(subject) if "prompt" in rw else rw["prompt_full"]
            true = _space(rw["target_true"]["str"])
            neighbors = [n["prompt"] if isinstance(n, dict) else n for n in r.get("neighborhood_prompts", [])]
            out.append(EditRequest(
                prompt=prompt, target_new=_space(rw["target_new"]["str"]), subject=subject, ground_truth=true,
                paraphrases=tuple(r.get("paraphrase_prompts", ())),
                locality=tuple(Probe(n, true) for n in neighbors), portability=_portability(r),
                relation=str(rw.get("relation_id", "")), case_id=str(r.get("case_id", i))))
        except (KeyError, TypeError, IndexError) as e:
            raise DataFormatError(f"{path}: record {i} is not CounterFact (needs requested_rewrite.prompt/subject/"
                                  f"target_new.str/target_true.str): {e!r}") from e
        if limit is not None and len(out) == limit:
            break
    return out


def read_easyedit_counterfact(path: str | os.PathLike[str], limit: int | None = None) -> list[EditRequest]:
    """EasyEdit's flat CounterFact JSON as requests (locality: locality_prompt -> locality_ground_truth)."""
    out = []
    for i, r in enumerate(_load_list(path)):
        try:
            rephrase = r.get("rephrase_prompt") or ()
            out.append(EditRequest(
                prompt=r["prompt"], target_new=_space(r["target_new"]), subject=r["subject"],
                ground_truth=_space(r["ground_truth"]) if r.get("ground_truth") else "",
                paraphrases=(rephrase,) if isinstance(rephrase, str) else tuple(rephrase),
                locality=(Probe(r["locality_prompt"], _space(r["locality_ground_truth"])),)
                if r.get("locality_prompt") else (),
                portability=_portability(r), relation="counterfact", case_id=str(r.get("case_id", i))))
        except (KeyError, TypeError) as e:
            raise DataFormatError(f"{path}: record {i} is not EasyEdit CounterFact (needs prompt, subject, target_new; "
                                  f"rephrase_prompt, locality_prompt, locality_ground_truth): {e!r}") from e
        if limit is not None and len(out) == limit:
            break
    return out


def _first(value):
    """A KnowEdit answer or prompt: a string, or the first string of a (nested) list."""
    while isinstance(value, list):
        if not value:
            return ""
        value = value[0]
    return value if isinstance(value, str) else ""


def _knowedit_probes(groups) -> tuple[Probe, ...]:
    if not isinstance(groups, dict):
        return ()
    probes = []
    for items in groups.values():
        for item in items or ():
            prompt, answer = _first(item["prompt"]), _first(item["ground_truth"])
            if prompt and answer.strip():
                probes.append(Probe(prompt, _space(answer)))
    return tuple(probes)


def read_knowedit(path: str | os.PathLike[str], limit: int | None = None) -> list[EditRequest]:
    """KnowEdit JSON as requests: every portability group (reasoning, subject aliasing, logical
    generalisation) as portability probes, every locality group (relation specificity, forgetfulness) as
    locality probes, "rephrase" (when present) as the paraphrase."""
    out = []
    for i, r in enumerate(_load_list(path)):
        try:
            target = _first(r["target_new"] if "target_new" in r else r["labels"])
            rephrase = r.get("rephrase") or ()
            out.append(EditRequest(
                prompt=_first(r["prompt"] if "prompt" in r else r["text"]), target_new=_space(target),
                subject=r["subject"] if "subject" in r else r.get("concept", ""),
                ground_truth=_space(_first(r["ground_truth"])) if _first(r.get("ground_truth")) else "",
                paraphrases=(rephrase,) if isinstance(rephrase, str) else tuple(rephrase),
                locality=_knowedit_probes(r.get("locality")), portability=_knowedit_probes(r.get("portability")),
                relation="knowedit", case_id=str(r.get("case_id", i))))
        except (KeyError, TypeError) as e:
            raise DataFormatError(f"{path}: record {i} is not KnowEdit (needs subject, prompt, target_new; portability "
                                  f"and locality as {{group: [{{prompt, ground_truth}}]}}): {e!r}") from e
        if limit is not None and len(out) == limit:
            break
    return out
