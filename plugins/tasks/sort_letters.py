"""The built-in task: sort a few letters.

A prompt is a short string of letters followed by ``=`` (``"dbca="``); the right answer is
the same letters in alphabetical order (``"abcd"``). The true reward is exact and cheap:

    reward = #(positions where the answer matches the sorted letters) / max(len(answer), len(target))

so 1.0 is a perfect answer, a wrong length is penalised and partial order earns partial
credit. A tiny model learns it from a few hundred demonstrations and RL then sharpens it.

Every data file of the task is generated deterministically by this module (run it as
``python -m rlfuse.plugins.tasks.sort_letters OUT_DIR``) and shipped in ``data/``:

* ``prompts_train.jsonl`` / ``prompts_eval.jsonl``: prompts (eval prompts never appear in any
  training file), each with its ``target`` column;
* ``sft.jsonl``: demonstrations (``prompt``, ``completion``) — correct answers;
* ``preferences.jsonl`` / ``preferences_eval.jsonl``: pairs of answers (the right one, a few
  random edits of it, or a degenerate one: a repeated letter, the prompt copied, an answer cut
  short or run on) labelled by a simulated labeller that prefers the answer with the higher
  true reward (ties dropped).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ALPHABET = "abcdefgh"
MIN_LEN, MAX_LEN = 3, 6
SEED = 1234


def target(prompt: str) -> str:
    letters = prompt.rstrip("=").strip()
    return "".join(sorted(letters))


def score(answer: str, want: str) -> float:
    """Fraction of positions right, over the longer of the two strings."""
    answer = answer.strip()
    n = max(len(answer), len(want))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(answer, want, strict=False)) / n


def reward(prompt: str, response: str, **columns: object) -> float:
    """The true task reward (a ``reward=rule`` function): uses the ``target`` column when the
    row has one, else recomputes it from the prompt."""
    want = columns.get("target")
    return score(response, str(want) if want is not None else target(prompt))


def _prompt(rng: random.Random) -> str:
    n = rng.randint(MIN_LEN, MAX_LEN)
    return "".join(rng.choice(ALPHABET) for _ in range(n)) + "="


def _degenerate(rng: random.Random, prompt: str, want: str) -> str:
    """A failure a policy drifts into when it optimises a learned reward: one letter repeated,
    the prompt copied unsorted, or the right answer cut short or run on."""
    op = rng.random()
    if op < 0.3:
        return rng.choice(ALPHABET) * rng.randint(1, 10)
    if op < 0.5:
        return prompt.rstrip("=")
    if op < 0.75:
        return want + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 5)))
    return want[: rng.randint(1, max(1, len(want) - 1))]


def _corrupt(rng: random.Random, want: str) -> str:
    """An imperfect answer: a few random edits of the right one."""
    s = list(want)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.4 and len(s) > 1:  # swap two positions
            i, j = rng.sample(range(len(s)), 2)
            s[i], s[j] = s[j], s[i]
        elif op < 0.6 and len(s) > 1:  # drop one
            s.pop(rng.randrange(len(s)))
        elif op < 0.8:  # insert a letter
            s.insert(rng.randrange(len(s) + 1), rng.choice(ALPHABET))
        else:  # replace one
            s[rng.randrange(len(s))] = rng.choice(ALPHABET)
    return "".join(s)


def generate(out_dir: str | Path, n_train: int = 4000, n_eval: int = 200, n_pairs: int = 3000) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    eval_prompts: list[str] = []
    seen: set[str] = set()
    while len(eval_prompts) < n_eval:
        p = _prompt(rng)
        if p not in seen:
            seen.add(p)
            eval_prompts.append(p)
    train_prompts = []
    while len(train_prompts) < n_train:
        p = _prompt(rng)
        if p not in seen:
            train_prompts.append(p)

    def dump(name: str, rows: list[dict]) -> None:
        with (out / name).open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")

    dump("prompts_train.jsonl", [{"prompt": p, "target": target(p)} for p in train_prompts])
    dump("prompts_eval.jsonl", [{"prompt": p, "target": target(p)} for p in eval_prompts])
    dump("sft.jsonl", [{"prompt": p, "completion": target(p)} for p in train_prompts])

    def pairs(prompts: list[str], n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            p = rng.choice(prompts)
            want = target(p)
            a = want if rng.random() < 0.3 else _corrupt(rng, want)
            b = _degenerate(rng, p, want) if rng.random() < 0.3 else _corrupt(rng, want)
            sa, sb = score(a, want), score(b, want)
            if sa == sb or a == b:
                continue  # the simulated labeller has no preference: skip
            chosen, rejected = (a, b) if sa > sb else (b, a)
            rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
        return rows

    dump("preferences.jsonl", pairs(train_prompts, n_pairs))
    eval_rng_prompts = eval_prompts
    dump("preferences_eval.jsonl", pairs(eval_rng_prompts, n_eval))


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data")
