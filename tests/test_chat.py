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
from test_pretrained import save_llama, save_tokenizer  # noqa: E402

from kd_lightning.data import ChatDataModule  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TALK = [
    {"role": "system", "content": "Speak in verse."},
    {"role": "user", "content": "Who goes there?"},
    {"role": "assistant", "content": "A friend to this ground."},
    {"role": "user", "content": "And what news?"},
    {"role": "assistant", "content": "The king is coming."},
]


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
    data = ChatDataModule(
        str(data_dir), tokenizer=str(folder), vocab_size=size, chat_template=TEMPLATE, **{"max_length": 160} | settings
    )
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
    assert torch.equal(
        inputs[1:][labels[:-1] != IGNORE_INDEX], labels[:-1][labels[:-1] != IGNORE_INDEX]
    )  # labels are the next tokens
    return stretches


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_every_assistant_turn_and_its_end_of_turn_token_are_supervised_and_nothing_else(
    tokenizer_dir, tmp_path: Path, pad_is_eos: bool
) -> None:
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
    long, short = (
        len(data.encode(m, chats, 0)[0])
        for m in (TALK, [{"role": "user", "content": "Who is it?"}, {"role": "assistant", "content": "Nobody."}])
    )
    between = (long + short) // 2
    with pytest.raises(
        KDError,
        match=rf"train.jsonl: 1 of 2 conversations are longer than data.max_length={between} tokens "
        rf"\(the longest has {long}\); raise data.max_length, or cut them with data.truncation=right",
    ):
        chat_data(tokenizer_dir, chats, max_length=between)
    with caplog.at_level("INFO", logger="kd_lightning"):
        cut = chat_data(tokenizer_dir, chats, max_length=between, truncation="right")
    assert f"1 of 2 conversations in train.jsonl cut to data.max_length={between} tokens" in caplog.text
    assert cut.splits["train"].inputs.shape == (2, between)


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (
            {"messages": [{"role": "narrator", "content": "Enter Hamlet."}, {"role": "assistant", "content": "Hm."}]},
            "has a message of role 'narrator'; the roles are system, user, assistant, tool",
        ),
        ({"messages": []}, "is an empty conversation"),
        ({"messages": [{"role": "user", "content": "Hello?"}]}, "has no assistant turn: nothing to learn from"),
        ({"text": "Hello"}, "has neither messages nor prompt and completion"),
    ],
)
def test_bad_conversations_are_one_line_naming_the_example(
    tokenizer_dir, tmp_path: Path, example: dict, message: str
) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}, example])
    with pytest.raises(
        KDError, match=rf"train.jsonl, example 1 {message}" if "has" in message or "is" in message else message
    ):
        chat_data(tokenizer_dir, chats)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer_dir, tmp_path: Path) -> None:
    folder, size = tokenizer_dir
    data = ChatDataModule(
        str(write_chats(tmp_path / "chats", [{"messages": TALK}])), tokenizer=str(folder), vocab_size=size
    )
    with pytest.raises(KDError, match="has no chat template; set data.chat_template"):
        data.setup("fit")


@pytest.mark.parametrize(("mode", "packing"), [("live", False), ("recorded", True)])
def test_a_pretrained_teacher_distils_on_chat_data_end_to_end(
    make_cfg, tokenizer_dir, tmp_path: Path, mode: str, packing: bool
) -> None:
    from transformers import AutoTokenizer

    from kd_lightning.run.train import train

    folder, size = tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE  # a tokenizer with its template, as pretrained chat models ship
    tokenizer.save_pretrained(folder)
    save_llama(folder, size, max_position_embeddings=128)
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}, {"prompt": "Who is it?", "completion": "Nobody."}] * 4)
    results = train(
        make_cfg(
            "teacher=hf",
            f"teacher.model.path={folder}",
            "data=chat",
            f"data.data_dir={chats}",
            f"data.vocab_size={size}",
            "data.max_length=128",
            "student=gpt_student",
            "student.model.dim=16",
            "student.model.depth=1",
            "trainer.max_epochs=1",
            "baseline=false",
            "speed.chunk_rows=16",
            f"teacher.mode={mode}",
            f"data.packing={packing}",
            "data.batch_size=3",
            output_dir=tmp_path / "run",
        )
    )
    assert math.isfinite(results["distilled"]["test/ppl"]) and results["teacher"]["test/ppl"] > 1


SHORT_AND_LONG = [
    {"prompt": "Who is it?", "completion": "Nobody."},
    {"messages": TALK},
    {"prompt": "Speak.", "completion": "I will speak to thee of a king and a queen and a ghost."},
    {"prompt": "And?", "completion": "No."},
    {"messages": TALK[1:3]},
    {"prompt": "Well?", "completion": "Well."},
]


def test_each_batch_is_padded_to_its_longest_row_and_training_batches_are_grouped_by_length(
    tokenizer_dir, tmp_path: Path, caplog
) -> None:
    chats = write_chats(tmp_path / "chats", SHORT_AND_LONG * 20)
    with caplog.at_level("INFO", logger="kd_lightning"):
        grouped = chat_data(tokenizer_dir, chats, batch_size=4)
    lengths = grouped.splits["train"].fields["length"]
    assert (
        "chat data: 120 training conversations, padding " in caplog.text
        and "if padded to data.max_length=160" in caplog.text
    )
    for batch in grouped.val_dataloader():
        assert batch["inputs"].shape[1] == int(lengths[batch["index"]].max()) == batch["labels"].shape[1]
        assert "length" not in batch
        whole = grouped.splits["val"]
        assert torch.equal(batch["labels"], whole.targets[batch["index"], : batch["labels"].shape[1]])
        assert (
            whole.targets[batch["index"], batch["labels"].shape[1] :] == IGNORE_INDEX
        ).all()  # nothing learned is cut

    def padding(data: ChatDataModule) -> int:
        return sum(batch["inputs"].numel() - int(lengths[batch["index"]].sum()) for batch in data.train_dataloader())

    shuffled = chat_data(tokenizer_dir, chats, batch_size=4, group_by_length=False)
    assert padding(grouped) < padding(shuffled) / 2
    order = list(grouped.train_dataloader().sampler)
    assert sorted(order) == list(range(120)) and order == list(
        grouped.train_dataloader().sampler
    )  # an epoch, the same each time


def test_packed_rows_keep_each_conversation_its_positions(tokenizer_dir, tmp_path: Path) -> None:
    chats = write_chats(tmp_path / "chats", SHORT_AND_LONG)
    plain, packed = (chat_data(tokenizer_dir, chats, max_length=128, packing=packing) for packing in (False, True))
    rows, lengths = packed.splits["train"], plain.splits["train"].fields["length"]
    assert len(rows) < len(lengths)
    starts = (rows.fields["position_ids"] == 0).nonzero().tolist()
    seen = []
    for row, start in starts:  # each conversation appears whole, in order, its positions from 0
        if start >= int(rows.fields["length"][row]):
            continue  # the padding at the row's end
        n = int(lengths[len(seen)])
        assert rows.fields["position_ids"][row, start : start + n].tolist() == list(range(n))
        assert torch.equal(rows.inputs[row, start : start + n], plain.splits["train"].inputs[len(seen), :n])
        assert torch.equal(rows.targets[row, start : start + n], plain.splits["train"].targets[len(seen), :n])
        seen.append(n)
    assert len(seen) == len(lengths) and int(rows.fields["length"].sum()) == int(lengths.sum())


def one_step(data: ChatDataModule, student_kind: str, size: int) -> tuple[dict[str, torch.Tensor], float]:
    """The student's weights after one SGD step on every training row in one batch, and the logged loss."""
    from functools import partial

    import lightning as L

    from kd_lightning import DistillationModule, LossMix
    from kd_lightning.models import GPT
    from kd_lightning.models.gpt import hf_causal_lm

    def model() -> torch.nn.Module:
        if student_kind == "gpt":
            return GPT(size, 128, 16, 2, 2)
        return hf_causal_lm(
            "llama",
            vocab_size=size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )

    torch.manual_seed(0)
    student, teacher = model(), model()
    module = DistillationModule(
        student,
        teacher,
        num_classes=size,
        task="tokens",
        loss_mix=LossMix(temperature=2.0, alpha=0.5),
        optimizer=partial(torch.optim.SGD, lr=1.0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    data.batch_size = len(data.splits["train"])
    trainer.fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.student.state_dict().items()}, float(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("student_kind", ["gpt", "llama"])
def test_the_packed_step_equals_the_unpacked_step(tokenizer_dir, tmp_path: Path, student_kind: str) -> None:
    chats = write_chats(tmp_path / "chats", SHORT_AND_LONG)
    size = tokenizer_dir[1]
    plain, plain_loss = one_step(chat_data(tokenizer_dir, chats, max_length=128), student_kind, size)
    packed, packed_loss = one_step(chat_data(tokenizer_dir, chats, max_length=128, packing=True), student_kind, size)
    assert packed_loss == pytest.approx(plain_loss, rel=1e-6)
    for name in plain:
        torch.testing.assert_close(packed[name], plain[name], atol=1e-6, rtol=1e-6, msg=name)


class IgnoresPositions(torch.nn.Module):
    """Takes position_ids, but attends across the whole row: packing would mix its examples."""

    def __init__(self, size: int) -> None:
        super().__init__()
        from kd_lightning.models import GPT

        self.gpt = GPT(size, 64, 16, 1, 2)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.gpt(tokens)


def test_packing_is_refused_for_a_model_that_would_mix_the_examples(tokenizer_dir) -> None:
    from kd_lightning.models import GPT
    from kd_lightning.models.outputs import check_packing
    from kd_lightning.models.pretrained import pretrained_causal_lm

    size = tokenizer_dir[1]
    check_packing(GPT(size, 64, 16, 1, 2), "student")
    for attention in ("sdpa", "eager"):
        save_llama(tokenizer_dir[0] / attention, size, attn_implementation=attention)
        check_packing(pretrained_causal_lm(str(tokenizer_dir[0] / attention), attn_implementation=attention), "teacher")
    with pytest.raises(
        KDError,
        match=r"the student \(IgnoresPositions\) does not keep attention inside each packed example.*"
        "set data.packing=false",
    ):
        check_packing(IgnoresPositions(size), "student")
    with pytest.raises(KDError, match=r"data.packing=true needs models that take position_ids; the teacher \(Linear\)"):
        check_packing(torch.nn.Linear(2, 2), "teacher")


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_parquet_files_and_a_saved_dataset_dict_read_as_the_jsonl_files_do(
    tokenizer_dir, tmp_path: Path, form: str
) -> None:
    datasets = pytest.importorskip("datasets", reason="parquet and saved data sets are read with the datasets package")
    examples = [{"messages": TALK}, {"messages": TALK[1:3]}]
    reference = chat_data(tokenizer_dir, write_chats(tmp_path / "jsonl", examples))
    splits = datasets.DatasetDict(
        {split: datasets.Dataset.from_list(examples) for split in ("train", "validation", "test")}
    )
    folder = tmp_path / form
    if form == "parquet":
        folder.mkdir()
        for split, dataset in splits.items():
            dataset.to_parquet(str(folder / f"{split}.parquet"))
    else:
        splits.save_to_disk(str(folder))
    data = chat_data(tokenizer_dir, folder)
    for split in ("train", "val", "test"):
        assert torch.equal(data.splits[split].inputs, reference.splits[split].inputs)
        assert torch.equal(data.splits[split].targets, reference.splits[split].targets)


def test_a_saved_dataset_without_the_three_splits_is_refused(tokenizer_dir, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="saved data sets are read with the datasets package")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": TALK}])}).save_to_disk(
        str(tmp_path / "saved")
    )
    with pytest.raises(KDError, match=r"must be a DatasetDict with splits train, validation and test, got \['train'\]"):
        chat_data(tokenizer_dir, tmp_path / "saved")


PLAY = """THE TRAGEDY OF A TEST

ACT I.

Scene I. A platform.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,
and unfold yourself.
[Exit.]

Fran.
Long live the king!

FIRST WITCH.
When shall we meet again?

Scene II. A heath.

THESEUS
What say you, Hermia?

HERMIA
So is Lysander.
"""


def test_the_plays_converter_answers_each_speech_with_the_next_split_by_work(tmp_path: Path) -> None:
    from kd_lightning.data.plays import convert, main

    corpus = tmp_path / "plays"
    corpus.mkdir()
    for work in ("alpha", "beta", "gamma"):
        (corpus / f"{work}_gut.txt").write_text(PLAY)
    (corpus / "sonnets_gut.txt").write_text(
        "I\n\nFrom fairest creatures we desire increase,\nThat thereby beauty's rose might never die,\n"
    )
    counts = convert(corpus, tmp_path / "chats", validation=("beta",), test=("gamma",))
    assert counts == {"train": 3, "validation": 3, "test": 3}  # the sonnets have no speeches
    train = [json.loads(line) for line in (tmp_path / "chats" / "train.jsonl").read_text().splitlines()]
    assert [e["speakers"] for e in train] == [
        ["Ber", "Fran"],
        ["Fran", "FIRST WITCH"],
        ["THESEUS", "HERMIA"],
    ]  # a new scene, a new exchange
    assert train[0]["messages"] == [
        {"role": "user", "content": "Who's there?"},
        {"role": "assistant", "content": "Nay, answer me: stand,\nand unfold yourself."},
    ]  # no stage direction
    assert {e["work"] for e in train} == {"alpha"}
    assert (
        convert(corpus, tmp_path / "short", max_chars=21, validation=("beta",), test=("gamma",))["train"] == 1
    )  # THESEUS, HERMIA
    with pytest.raises(
        KDError, match="no conversations for the train split: its works have no speeches of at most 5 characters"
    ):
        convert(corpus, tmp_path / "shorter", max_chars=5, validation=("beta",), test=("gamma",))
    with pytest.raises(KDError, match=r"has no hamlet to hold out; name works it has \(alpha, beta, gamma, sonnets\)"):
        convert(corpus, tmp_path / "none", validation=("hamlet",), test=("gamma",))
    with pytest.raises(SystemExit, match="error: .* holds no .txt files"):
        main([str(tmp_path / "chats"), str(tmp_path / "out")])


# -- chat files as careless hands write them: one line naming the file and the fix, nothing passed over --

ASSISTANT_FIRST = [
    {"role": "assistant", "content": "Who's there?"},
    {"role": "user", "content": "Nay, answer me."},
    {"role": "assistant", "content": "Long live the king!"},
]


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"messages": ASSISTANT_FIRST}, r"train.jsonl, example 1 starts with an assistant turn"),
        (
            {"messages": "Who goes there?"},
            r"train.jsonl, example 1: messages must be a list of \{role, content\} "
            r"messages, got str",
        ),
    ],
)
def test_a_conversation_of_the_wrong_shape_is_named(tokenizer_dir, tmp_path: Path, example: dict, message: str) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}, example])
    with pytest.raises(KDError, match=message):
        chat_data(tokenizer_dir, chats)


def test_duplicate_json_keys_that_make_an_assistant_turn_first_are_named(tokenizer_dir, tmp_path: Path) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}])
    line = '{"messages": [{"role": "user", "role": "assistant", "content": "Hm."}, {"role": "user", "content": "?"}]}\n'
    (chats / "train.jsonl").write_text(json.dumps({"messages": TALK}) + "\n" + line)
    with pytest.raises(KDError, match=r"example 1 starts with an assistant turn"):
        chat_data(tokenizer_dir, chats)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_an_empty_split_file_is_named_as_empty(tokenizer_dir, tmp_path: Path, split: str) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}])
    (chats / f"{split}.jsonl").write_text("\n")
    with pytest.raises(KDError, match=rf"{split}.jsonl holds no examples"):
        chat_data(tokenizer_dir, chats)


def test_a_broken_line_of_a_jsonl_file_is_named_by_its_line(tokenizer_dir, tmp_path: Path) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}])
    lines = [json.dumps({"messages": TALK})] * 4 + ['{"messages": [{"role": "user", "content": "Hi"}']
    (chats / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(KDError, match=r"train.jsonl, line 5 is not valid JSON \(.*\); fix or remove that line"):
        chat_data(tokenizer_dir, chats)


def test_two_files_for_one_split_are_refused(tokenizer_dir, tmp_path: Path) -> None:
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}])
    (chats / "train.json").write_text(json.dumps([{"messages": TALK}]))
    with pytest.raises(KDError, match=r"has train.jsonl and train.json for one split; keep one of them"):
        chat_data(tokenizer_dir, chats)


def test_a_split_whose_every_reply_is_empty_is_refused(tokenizer_dir, tmp_path: Path) -> None:
    silent = [dict(m, content="") if m["role"] == "assistant" else m for m in TALK]
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}])
    (chats / "train.jsonl").write_text(json.dumps({"messages": silent}) * 1 + "\n")
    with pytest.raises(KDError, match=r"train.jsonl: every assistant reply is empty"):
        chat_data(tokenizer_dir, chats)


def test_without_data_vocab_size_the_tokenizer_s_size_is_taken_and_recorded(tokenizer_dir, tmp_path: Path) -> None:
    from test_cli import run_cli
    from transformers import AutoTokenizer

    folder, size = tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    save_llama(folder, size, max_position_embeddings=128)
    chats = write_chats(tmp_path / "chats", [{"messages": TALK}] * 4)
    out = run_cli(
        tmp_path,
        "teacher=hf",
        f"teacher.model.path={folder}",
        "data=chat",
        f"data.data_dir={chats}",
        "data.max_length=128",
        "student=gpt_student",
        "student.model.dim=16",
        "student.model.depth=1",
        "baseline=false",
        "trainer.fast_dev_run=true",
        "hydra.run.dir=run",
    )
    assert out.returncode == 0, out.stderr
    assert f"data.vocab_size: {size}, the number of tokens of the tokenizer {folder}" in out.stdout + out.stderr
    assert f"vocab_size: {size}" in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
