"""Chat data: every assistant turn (its end-of-turn token included) supervised and nothing else, pad = EOS or not,
the last turn only when asked; bad conversations one line each; distilled end to end from a pretrained teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data_factory import make_corpus
from kd_lightning import KDError
from kd_lightning.data.batch import IGNORE_INDEX

pytest.importorskip("transformers", reason="chat data needs the 'lm' extra (transformers)")
from kd_lightning.data import ChatDataModule  # noqa: E402

from test_pretrained import save_llama, save_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TALK = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"},
        {"role": "assistant", "content": "A friend to this ground."}, {"role": "user", "content": "And what news?"},
        {"role": "assistant", "content": "The king is coming."}]


def write_chats(folder: Path, examples: list, splits=("train", "validation", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    return folder


@pytest.fixture()
def tokenizer_dir(tmp_path: Path) -> tuple[Path, int]:
    size = save_tokenizer(make_corpus(tmp_path / "corpus"), tmp_path / "tok")
    return tmp_path / "tok", size


def chat_data(tokenizer_dir, data_dir: Path, **settings) -> ChatDataModule:
    folder, size = tokenizer_dir
    data = ChatDataModule(str(data_dir), tokenizer=str(folder), vocab_size=size, chat_template=TEMPLATE, **{"max_length": 160} | settings)
    data.setup("fit")
    return data


def supervised_text(data: ChatDataModule, row: int = 0) -> list[str]:
    """The supervised stretches of one training row, decoded."""
    inputs, labels = data.splits["train"].inputs[row], data.splits["train"].targets[row]
    kept = (labels != IGNORE_INDEX).tolist()
    stretches, current = [], []
    for position, keep in enumerate(kept):
        if keep:
            current.append(int(labels[position]))
        elif current:
            stretches.append(data.tokenizer.decode(current))
            current = []
    if current:
        stretches.append(data.tokenizer.decode(current))
    assert torch.equal(inputs[1:][labels[:-1] != IGNORE_INDEX], labels[:-1][labels[:-1] != IGNORE_INDEX])  # labels are the next tokens
    return stretches


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_every_assistant_turn_and_its_end_of_turn_token_are_supervised_and_nothing_else(tokenizer_dir, tmp_path: Path,
                                                                                         pad_is_eos: bool) -> None:
    folder, _ = tokenizer_dir
    if pad_is_eos:  # trl#6357: masking the pad token masked every end of turn
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(folder)
    data = chat_data(tokenizer_dir, write_chats(tmp_path / "chats", [{"messages": TALK}]))
    assert supervised_text(data) == ["A friend to this ground.<|endoftext|>", "The king is coming.<|endoftext|>"]
    labels = data.splits["train"].targets[0]
    eos = data.tokenizer.eos_token_id
    assert int((labels == eos).sum()) == 2  # the two assistant turns' end: the system's and user's are not learned


def test_the_last_turn_only_prompt_completion_and_truncation(tokenizer_dir, tmp_path: Path, caplog) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}, {"prompt": "Who is it?", "completion": "Nobody."}])
    assert supervised_text(chat_data(tokenizer_dir, chats, supervise="last")) == ["The king is coming.<|endoftext|>"]
    data = chat_data(tokenizer_dir, chats)
    assert supervised_text(data, row=1) == ["Nobody.<|endoftext|>"]
    long, short = (len(data.encode(m, chats, 0)[0]) for m in (TALK, [{"role": "user", "content": "Who is it?"},
                                                                     {"role": "assistant", "content": "Nobody."}]))
    between = (long + short) // 2
    with pytest.raises(KDError, match=rf"train.jsonl: 1 of 2 conversations are longer than data.max_length={between} tokens "
                                      rf"\(the longest has {long}\); raise data.max_length, or cut them with data.truncation=right"):
        chat_data(tokenizer_dir, chats, max_length=between)
    with caplog.at_level("INFO", logger="kd_lightning"):
        cut = chat_data(tokenizer_dir, chats, max_length=between, truncation="right")
    assert f"1 of 2 conversations in train.jsonl cut to data.max_length={between} tokens" in caplog.text
    assert cut.splits["train"].inputs.shape == (2, between)


@pytest.mark.parametrize(("example", "message"), [
    ({"messages": [{"role": "narrator", "content": "Enter Hamlet."}, {"role": "assistant", "content": "Hm."}]},
     "has a message of role 'narrator'; the roles are system, user, assistant, tool"),
    ({"messages": []}, "is an empty conversation"),
    ({"messages": [{"role": "user", "content": "Hello?"}]}, "has no assistant turn: nothing to learn from"),
    ({"text": "Hello"}, "has neither messages nor prompt and completion"),
])
def test_bad_conversations_are_one_line_naming_the_example(tokenizer_dir, tmp_path: Path, example: dict, message: str) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}, example])
    with pytest.raises(KDError, match=rf"train.jsonl, example 1 {message}" if "has" in message or "is" in message else message):
        chat_data(tokenizer_dir, chats)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer_dir, tmp_path: Path) -> None:
    folder, size = tokenizer_dir
    data = ChatDataModule(str(write_chats(tmp_path / "chats", [{"messages": TALK}])), tokenizer=str(folder), vocab_size=size)
    with pytest.raises(KDError, match="has no chat template; set data.chat_template"):
        data.setup("fit")


def test_a_pretrained_teacher_distils_on_chat_data_end_to_end(make_cfg, tokenizer_dir, tmp_path: Path) -> None:
    from kd_lightning.train import train

    from transformers import AutoTokenizer

    folder, size = tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE  # a tokenizer with its template, as pretrained chat models ship
    tokenizer.save_pretrained(folder)
    save_llama(folder, size, max_position_embeddings=128)
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}, {"prompt": "Who is it?", "completion": "Nobody."}] * 4)
    results = train(make_cfg("teacher=hf", f"teacher.model.path={folder}", "data=chat", f"data.data_dir={chats}",
                             f"data.vocab_size={size}", "data.max_length=128",
                             "student=gpt_student", "student.model.dim=16", "student.model.depth=1", "trainer.max_epochs=1",
                             "baseline=false", "speed.chunk_rows=16", output_dir=tmp_path / "run"))
    assert math.isfinite(results["distilled"]["test/ppl"]) and results["teacher"]["test/ppl"] > 1
