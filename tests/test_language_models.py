"""Token-level distillation: text data split by work, the module on (N, L, V) logits, metrics,
vocabulary alignment and its refusals, Hugging Face models from configs, the recipe end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_factory import make_corpus

from kd_lightning import DistillationModule, KDError, LossMix
from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.loss.objectives import kd_loss
from kd_lightning.models import GPT
from kd_lightning.teacher import Teacher
from kd_lightning.vocab import check_same_tokenizer, check_vocabularies

pytest.importorskip("tokenizers", reason="text data needs the 'lm' extra (tokenizers)")
from kd_lightning.data import TextDataModule  # noqa: E402

VOCAB = 300


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus")


def text_data(corpus: Path, **kwargs) -> TextDataModule:
    settings = {
        "val_works": ["beta"],
        "test_works": ["gamma"],
        "vocab_size": VOCAB,
        "block_size": 16,
        "batch_size": 8,
    } | kwargs
    data = TextDataModule(str(corpus), **settings)
    data.setup()
    return data


def tiny_gpt(vocab: int = VOCAB, dim: int = 16, depth: int = 1, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab, context_length=16, dim=dim, depth=depth, heads=2)


# -- the data ---------------------------------------------------------------------------------------


def test_works_are_split_whole_and_blocks_predict_the_next_token(corpus: Path) -> None:
    data = text_data(corpus)
    tokenizer = data.tokenizer
    for split, work in (("val", "beta"), ("test", "gamma")):
        stream = tokenizer.encode((corpus / f"{work}.txt").read_text()).ids
        x, y = data.splits[split].inputs, data.splits[split].targets
        kept = y != IGNORE_INDEX
        assert y[kept].tolist() == stream + [
            tokenizer.token_to_id("<|endoftext|>")
        ]  # every token of the work, once, in order
        assert torch.equal(
            x[:, 1:][kept[:, 1:]], y[:, :-1][kept[:, 1:]]
        )  # the label of position i is the input at i + 1
        assert not kept[-1].all()  # the last block is padded with -100
    train = data.splits["train"]
    assert train.inputs.shape[1] == 16 and (train.targets != IGNORE_INDEX).all()
    assert torch.equal(
        text_data(corpus).splits["train"].inputs, train.inputs
    )  # the tokenizer and blocks are deterministic
    assert len(text_data(corpus, train_tokens=100).splits["train"]) == 100 // 16


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data_dir": "missing"}, "is not a folder"),
        ({"val_works": ["hamlet"]}, "choose among the files"),
        ({"test_works": ["beta"]}, "both a validation and a test work"),
        ({"vocab_size": 100}, "data.vocab_size must be an integer >= 257"),
        ({"num_classes": 10}, "must equal data.vocab_size"),
    ],
)
def test_bad_text_settings_are_one_line(corpus: Path, change: dict, message: str) -> None:
    settings = {"data_dir": str(corpus), "val_works": ["beta"], "test_works": ["gamma"], "vocab_size": VOCAB} | change
    with pytest.raises(KDError, match=message):
        TextDataModule(**settings).setup()


def test_a_folder_without_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("no text here")
    with pytest.raises(KDError, match="holds no .txt files"):
        TextDataModule(str(tmp_path), ["a"], ["b"]).setup()


# -- the module on tokens -------------------------------------------------------------------------


def token_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, VOCAB, (3, 16), generator=g)
    labels = torch.randint(0, VOCAB, (3, 16), generator=g)
    labels[0, :5] = IGNORE_INDEX
    attention_mask = torch.ones(3, 16, dtype=torch.long)
    attention_mask[2, 12:] = 0
    return {"inputs": inputs, "labels": labels, "attention_mask": attention_mask}


def test_the_token_loss_is_ce_and_kd_over_the_kept_tokens() -> None:
    student, teacher = tiny_gpt(seed=1), tiny_gpt(dim=32, seed=2)
    module = DistillationModule(
        student, teacher, num_classes=VOCAB, loss_mix=LossMix(temperature=2.0, alpha=0.7), task="tokens"
    )
    batch = token_batch()
    loss = module.training_step(batch, 0)
    keep = (batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()
    s, t = student(batch["inputs"]), teacher(batch["inputs"]).detach()
    ce = F.cross_entropy(s[keep], batch["labels"][keep])
    kd = kd_loss(s[keep], t[keep], 2.0)  # the kept tokens as rows
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kd)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_a_batch_without_kept_tokens_gives_zero_loss_not_nan() -> None:
    module = DistillationModule(tiny_gpt(), tiny_gpt(seed=3), num_classes=VOCAB, task="tokens")
    batch = token_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    assert module.training_step(batch, 0).item() == 0.0


def test_token_metrics_are_perplexity_accuracy_agreement_and_kl(corpus: Path) -> None:
    data = text_data(corpus)
    student, teacher = tiny_gpt(seed=1), tiny_gpt(dim=32, seed=2)
    module = DistillationModule(student, teacher, num_classes=VOCAB, task="tokens")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    x, y = data.splits["test"].inputs, data.splits["test"].targets
    keep = y != IGNORE_INDEX
    with torch.no_grad():
        s, t = student(x)[keep], teacher(x)[keep]
    assert metrics["test/ppl"] == pytest.approx(math.exp(F.cross_entropy(s, y[keep]).item()), rel=1e-4)
    assert metrics["test/teacher_ppl"] == pytest.approx(math.exp(F.cross_entropy(t, y[keep]).item()), rel=1e-4)
    assert metrics["test/acc"] == pytest.approx((s.argmax(-1) == y[keep]).float().mean().item(), abs=1e-6)
    assert metrics["test/agreement"] == pytest.approx((s.argmax(-1) == t.argmax(-1)).float().mean().item(), abs=1e-6)
    assert metrics["test/kl_t1"] == pytest.approx(kd_loss(s, t, 1.0).item(), rel=1e-4)
    assert "test/ece" not in metrics


def test_token_labels_out_of_range_are_refused() -> None:
    module = DistillationModule(tiny_gpt(), tiny_gpt(seed=3), num_classes=VOCAB, task="tokens")
    batch = token_batch()
    batch["labels"][1, 3] = VOCAB + 5
    with pytest.raises(KDError, match=f"a token label is {VOCAB + 5}, outside the vocabulary"):
        module.training_step(batch, 0)


def test_sequences_longer_than_the_context_are_refused() -> None:
    with pytest.raises(KDError, match="longer than the model's context of 16; set data.block_size=16"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


# -- vocabularies ------------------------------------------------------------------------------------


def padded_teacher(extra_rows: int, bias: float) -> GPT:
    """A teacher whose output head has ``extra_rows`` padding rows with bias ``bias`` (untied)."""
    teacher = tiny_gpt(VOCAB + extra_rows, dim=32, seed=2)
    teacher.head = torch.nn.Linear(32, VOCAB + extra_rows)
    with torch.no_grad():
        teacher.head.bias[VOCAB:] = bias
    return teacher


def test_vocabularies_padded_differently_are_compared_on_the_common_rows() -> None:
    student, teacher = tiny_gpt(seed=1), padded_teacher(20, bias=-1e4)
    batch = token_batch()
    module = DistillationModule(
        student, teacher, num_classes=VOCAB, task="tokens", loss_mix=LossMix(alpha=1.0, temperature=1.0)
    )
    loss = module.training_step(batch, 0)
    keep = batch["labels"] != IGNORE_INDEX
    keep &= batch["attention_mask"].bool()
    expected = kd_loss(student(batch["inputs"])[keep], teacher(batch["inputs"])[keep][:, :VOCAB].detach(), 1.0)
    torch.testing.assert_close(loss, expected)
    # a wider student: its padding rows are left out of the comparison (and still trained by CE)
    wide = DistillationModule(tiny_gpt(VOCAB + 20, seed=1), tiny_gpt(seed=2), num_classes=VOCAB, task="tokens")
    assert torch.isfinite(wide.training_step(batch, 0))


def test_a_teacher_that_uses_the_extra_rows_is_refused() -> None:
    module = DistillationModule(tiny_gpt(seed=1), padded_teacher(20, bias=5.0), num_classes=VOCAB, task="tokens")
    with pytest.raises(KDError, match="likely built for different tokenizers"):
        module.training_step(token_batch(), 0)


def test_the_padding_check_looks_at_the_teacher_that_is_distilled(make_cfg, corpus: Path, tmp_path: Path) -> None:
    """A padded head (teacher.model.vocab_size=400 for 300 tokens) trained here is distilled, live or recorded: its rows
    beyond the tokenizer are padding by construction (a freshly built teacher, checked before training, spread 1/4 of its
    probability there and was refused). Loaded from a checkpoint, the same teacher is checked, on its real weights."""
    from kd_lightning.run.train import train

    tiny = [
        "+recipe=lm_shakespeare",
        f"data.data_dir={corpus}",
        *TINY,
        "student.model.dim=16",
        "student.model.depth=1",
        "teacher.model.vocab_size=400",
        "trainer.limit_train_batches=2",
        "baseline=false",
    ]
    live = train(make_cfg(*tiny, output_dir=tmp_path / "live"))
    recorded = train(make_cfg(*tiny, "teacher.mode=recorded", output_dir=tmp_path / "recorded"))
    assert math.isfinite(live["distilled"]["test/ppl"]) and math.isfinite(recorded["distilled"]["test/ppl"])
    (trained,) = (tmp_path / "cache" / "trained_teachers").glob("*.pth")
    with pytest.raises(KDError, match=r"the teacher puts probability .* on its output rows 300-399, which the student"):
        train(make_cfg(*tiny, f"teacher.checkpoint={trained}", output_dir=tmp_path / "loaded"))


def test_a_model_narrower_than_the_tokenizer_is_refused() -> None:
    with pytest.raises(KDError, match="the student predicts 200 tokens but the tokenizer has 300"):
        check_vocabularies(torch.zeros(2, 200), torch.zeros(2, 300), VOCAB)


def test_different_tokenizers_are_refused(corpus: Path, tmp_path: Path) -> None:
    from kd_lightning.data.text import train_tokenizer

    ours = text_data(corpus).tokenizer
    check_same_tokenizer(ours, text_data(corpus).tokenizer)
    other = train_tokenizer(["completely different text " * 50, "with other words entirely " * 50], VOCAB)
    with pytest.raises(KDError, match="different tokenizers \\(token id"):
        check_same_tokenizer(ours, other)


# -- Hugging Face models built from configs -------------------------------------------------------------


def test_a_hugging_face_teacher_and_student_from_configs(corpus: Path) -> None:
    pytest.importorskip("transformers", reason="Hugging Face models need the 'lm' extra (transformers)")
    from kd_lightning.models import hf_causal_lm

    teacher = hf_causal_lm("gpt2", vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    student = hf_causal_lm(
        "llama",
        vocab_size=VOCAB + 12,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )  # 12 padding rows
    data = text_data(corpus)
    module = DistillationModule(student, teacher, num_classes=VOCAB, task="tokens")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    before = [p.clone() for p in teacher.parameters()]
    trainer.fit(module, datamodule=data)
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    assert (
        1 < metrics["test/ppl"] < 10 * VOCAB and 1 < metrics["test/teacher_ppl"] and 0 <= metrics["test/agreement"] <= 1
    )
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))  # the teacher never changes


def test_a_hugging_face_teacher_padded_with_live_rows_is_refused() -> None:
    pytest.importorskip("transformers", reason="Hugging Face models need the 'lm' extra (transformers)")
    from kd_lightning.models import hf_causal_lm

    # freshly initialised: its 20 extra rows get as much probability as any token, so they are not padding
    teacher = hf_causal_lm("gpt2", vocab_size=VOCAB + 20, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    module = DistillationModule(tiny_gpt(), teacher, num_classes=VOCAB, task="tokens")
    with pytest.raises(KDError, match=r"the teacher puts probability 0\.0\d+ on its output rows 300-319"):
        module.training_step(token_batch(), 0)


def test_hugging_face_models_get_the_attention_mask() -> None:
    pytest.importorskip("transformers", reason="Hugging Face models need the 'lm' extra (transformers)")
    from kd_lightning.models import hf_causal_lm, model_logits

    model = hf_causal_lm("gpt2", vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2).eval()
    batch = token_batch()
    batch["attention_mask"][0, 8:] = 0  # right padding: positions before it see no padding, so their logits agree
    with torch.no_grad():
        masked = model_logits(model, batch)
        plain = model(batch["inputs"]).logits
    torch.testing.assert_close(masked[0, :8], plain[0, :8])
    with pytest.raises(KDError, match="not a transformers model type"):
        hf_causal_lm("no-such-model")


# -- a recorded teacher for tokens ----------------------------------------------------------------


def live_logits(teacher: GPT, data: TextDataModule, split: str) -> torch.Tensor:
    with torch.no_grad():
        return teacher(data.splits[split].inputs)


def test_a_token_recording_keeps_the_top_k_and_bounds_the_rest(corpus: Path, tmp_path: Path) -> None:
    from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher

    data, teacher = text_data(corpus), tiny_gpt(dim=32, seed=2)
    record_teacher(teacher, data, tmp_path / "top8", {}, RecordingSettings(1, 8), accelerator="cpu", vocab_size=VOCAB)
    record_teacher(
        teacher, data, tmp_path / "full", {}, RecordingSettings(1, None), accelerator="cpu", vocab_size=VOCAB
    )
    top8, full = RecordedTeacher(tmp_path / "top8"), RecordedTeacher(tmp_path / "full")
    n = len(data.splits["val"])
    assert tuple(top8.arrays["val"]["topk_indices"].shape) == (n, 1, 16, 8)
    assert top8.arrays["val"]["topk_indices"].dtype == torch.int16  # 300 token ids
    assert top8.meta["bytes_per_position"] == 8 * 2 + 8 * 2 + 4  # values, indices, log-sum-exp per token
    batch = {"index": torch.arange(n)}
    p = live_logits(teacher, data, "val").softmax(-1)
    torch.testing.assert_close(full.logits(batch, "val").softmax(-1), p, atol=2e-3, rtol=0)  # float16 logits
    p_hat = top8.logits(batch, "val").softmax(-1)
    kept = p.topk(8, -1).indices
    torch.testing.assert_close(p_hat.gather(-1, kept), p.gather(-1, kept), atol=2e-3, rtol=0)
    tail_mass = 1 - p.gather(-1, kept).sum(-1)
    assert ((p - p_hat).abs().sum(-1) <= 2 * tail_mass + 2e-3).all()  # the stated bound, per token
    assert top8.meta["tail_mass"]["max"] >= float(tail_mass.max()) - 2e-3


class Killed(RuntimeError):
    pass


def test_a_killed_token_recording_resumes_and_matches_an_uninterrupted_one(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kd_lightning import teacher as recording
    from kd_lightning.teacher import recorder

    data, teacher = text_data(corpus, batch_size=4, eval_batch_size=4), tiny_gpt(dim=32, seed=2)
    settings = recording.RecordingSettings(
        1, 8, tail="sampled", tail_samples=4
    )  # the draws too must resume identically
    recording.record_teacher(teacher, data, tmp_path / "whole", {"k": 1}, settings, accelerator="cpu", vocab_size=VOCAB)
    monkeypatch.setattr(recorder, "PROGRESS_EVERY_S", 0.0)
    calls = {"n": 0}
    original = recorder._Recorder.predict_step

    def killed_after_three(self, batch, batch_idx):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Killed("killed part-way")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(recorder._Recorder, "predict_step", killed_after_three)
    with pytest.raises(Killed):
        recording.record_teacher(
            teacher, data, tmp_path / "resumed", {"k": 1}, settings, accelerator="cpu", vocab_size=VOCAB
        )
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial" / "progress.json").is_file()
    monkeypatch.setattr(recorder._Recorder, "predict_step", original)
    forwards = {"n": 0}
    teacher.register_forward_hook(lambda *args: forwards.__setitem__("n", forwards["n"] + 1))
    recording.record_teacher(
        teacher, data, tmp_path / "resumed", {"k": 1}, settings, accelerator="cpu", vocab_size=VOCAB
    )
    total_batches = sum(math.ceil(len(split) / 4) for split in data.splits.values())
    assert forwards["n"] == total_batches - 3 + 1  # the 3 recorded batches are skipped (+1: the example forward)
    whole, resumed = recording.RecordedTeacher(tmp_path / "whole"), recording.RecordedTeacher(tmp_path / "resumed")
    for split in data.splits:
        for name, array in whole.arrays[split].items():
            assert torch.equal(resumed.arrays[split][name], array), (split, name)
    assert resumed.meta["tail_mass"] == pytest.approx(whole.meta["tail_mass"])
    assert not (tmp_path / ".resumed.partial").exists()


def test_a_truncated_token_recording_is_named_with_the_fix(corpus: Path, tmp_path: Path) -> None:
    from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher

    record_teacher(
        tiny_gpt(dim=32, seed=2), text_data(corpus), tmp_path / "rec", {}, RecordingSettings(1, 8), accelerator="cpu"
    )
    path = tmp_path / "rec" / "train.topk_values.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KDError, match=f"missing or corrupt .*delete {tmp_path / 'rec'} to record the teacher again"):
        RecordedTeacher(tmp_path / "rec")


def test_a_corpus_that_is_not_text_in_its_encoding_or_too_short_is_refused_by_name(corpus: Path) -> None:
    """Read with errors='replace', random bytes or UTF-16 trained as if they were text; a split of no block trained
    zero steps and still wrote results."""
    work = corpus / "delta.txt"
    text = work.read_text()
    work.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    with pytest.raises(KDError, match=r"delta.txt is not utf-8 text \(.* at byte \d+\); set data.encoding"):
        text_data(corpus)
    work.write_text(text, encoding="utf-16")
    with pytest.raises(KDError, match=r"delta.txt is not utf-8 text"):
        text_data(corpus)
    with pytest.raises(KDError, match=r"delta.txt holds NUL characters"):
        text_data(corpus, encoding="latin-1")
    utf16 = make_corpus(corpus.parent / "utf16")
    for path in utf16.glob("*.txt"):
        path.write_text(path.read_text(), encoding="utf-16")
    assert len(text_data(utf16, encoding="utf-16").splits["train"]) == len(
        text_data(make_corpus(corpus.parent / "plain")).splits["train"]
    )
    with pytest.raises(KDError, match="data.encoding='klingon' is not a text encoding"):
        text_data(utf16, encoding="klingon")
    work.write_text(text)
    with pytest.raises(KDError, match=r"the train works \(.*\) give no block of data.block_size=100000 tokens"):
        text_data(corpus, block_size=100_000)


# -- the recipe from the command line ------------------------------------------------------------------

TINY = [
    "data.val_works=[beta]",
    "data.test_works=[gamma]",
    f"data.vocab_size={VOCAB}",
    "data.block_size=16",
    "teacher.model.dim=32",
    "teacher.model.depth=1",
    "trainer.max_epochs=1",
    "teacher.fit.max_epochs=1",
]


def test_the_recipe_runs_end_to_end_on_a_tiny_corpus(tmp_path: Path, corpus: Path) -> None:
    from test_cli import run_cli

    out = run_cli(
        tmp_path,
        "+recipe=lm_shakespeare",
        f"data.data_dir={corpus}",
        *TINY,
        "student.model.dim=16",
        "student.model.depth=1",
        "speed.chunk_rows=24",
        "hydra.run.dir=run",
    )  # every stage chunked
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for stage in ("teacher", "distilled", "baseline"):
        assert 1 < results[stage]["test/ppl"] < 2 * VOCAB
    assert results["ppl_ratio"] == pytest.approx(results["distilled"]["test/ppl"] / results["baseline"]["test/ppl"])
    assert "ppl" in out.stdout.splitlines()[-7] and "gain from KD" in out.stdout
    assert out.stdout.count("the chunked loss (24 tokens per block)") == 3  # teacher, distilled, alone
    log = out.stdout + out.stderr
    assert "logging interval" not in log and "Warning" not in out.stderr  # nothing of Lightning's about short epochs


def test_a_recorded_teacher_and_a_hugging_face_student_from_the_command_line(tmp_path: Path, corpus: Path) -> None:
    pytest.importorskip("transformers", reason="Hugging Face models need the 'lm' extra (transformers)")
    from test_cli import run_cli

    out = run_cli(
        tmp_path,
        "+recipe=lm_shakespeare",
        f"data.data_dir={corpus}",
        *TINY,
        "student=llama_student",
        "student.model.hidden_size=16",
        "student.model.intermediate_size=32",
        "student.model.num_hidden_layers=1",
        "teacher.mode=recorded",
        "teacher.recording.top_k=8",
        "teacher.recording.tail=sampled",
        "teacher.recording.tail_samples=4",
        "baseline=false",
        "hydra.run.dir=run",
    )
    assert out.returncode == 0, out.stderr
    assert "44 bytes per token; the top 8 hold" in out.stdout and "4 draws from the tail per token" in out.stdout
    results = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 1 < results["distilled"]["test/ppl"] < 2 * VOCAB and results["teacher"]["test/ppl"] > 1


def test_a_corpus_folder_without_text_is_one_line_from_the_command_line(tmp_path: Path) -> None:
    from test_cli import run_cli

    (tmp_path / "empty").mkdir()
    out = run_cli(tmp_path, "+recipe=lm_shakespeare", f"data.data_dir={tmp_path / 'empty'}", "hydra.run.dir=run")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: data.data_dir={tmp_path / 'empty'} holds no .txt files; point it at "
        "a folder of .txt files, one work each."
    ]


def test_the_student_shaped_tail_is_the_coarsened_kl() -> None:
    """Top-k exact, the tail mass m shared like the student's probabilities: forward KL against it is the KL of
    both distributions coarsened to the top k and one 'rest' class, and ‖p − p̂‖₁ ≤ 2m still holds."""
    from kd_lightning.teacher.format import student_shaped_tail

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 40, generator=g) * 2, torch.randn(5, 40, generator=g) * 2
    values, indices = teacher.topk(6, -1)
    log_p_hat = student_shaped_tail(values, indices, teacher.logsumexp(-1), student)
    p, p_hat, q = teacher.softmax(-1), log_p_hat.exp(), student.softmax(-1)
    torch.testing.assert_close(p_hat.sum(-1), torch.ones(5))
    torch.testing.assert_close(p_hat.gather(-1, indices), p.gather(-1, indices))  # the top k, exactly
    top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, indices, True)
    m, q_tail = (p * ~top).sum(-1), (q * ~top).sum(-1)
    torch.testing.assert_close(p_hat * ~top, (m / q_tail)[:, None] * q * ~top)  # the tail, shaped like the student's
    coarse = (p.gather(-1, indices) * (p.gather(-1, indices) / q.gather(-1, indices)).log()).sum(-1) + m * (
        m / q_tail
    ).log()
    torch.testing.assert_close(kd_loss(student, log_p_hat, 1.0, scale_by_t2=False), coarse.mean())
    assert ((p - p_hat).abs().sum(-1) <= 2 * m + 1e-6).all()


def test_the_sampled_tail_is_the_teacher_exactly_when_the_draws_match_and_in_expectation() -> None:
    """Top-k exact, the tail mass m shared over the recorded draws (m · count / S): with draws in the tail's exact
    proportions it is the teacher's distribution; over random draws its mean is (forward KL's gradient is unbiased)."""
    from kd_lightning.teacher.format import draw_from_tail, sampled_tail

    p = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05]])
    logits = p.log() + 1.5
    values, indices = logits.topk(2, -1)
    exact = sampled_tail(values, indices, logits.logsumexp(-1), torch.tensor([[2, 3, 2, 4, 3, 5]]), 6)
    torch.testing.assert_close(exact.exp(), p)
    unsampled = sampled_tail(values, indices, logits.logsumexp(-1), torch.tensor([[2, 2, 2, 2, 2, 2]]), 6)
    assert unsampled[0, 3:].eq(-math.inf).all() and unsampled.exp()[0, 2] == pytest.approx(0.3)  # all the tail mass

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 40, generator=g) * 2
    values, indices = teacher.topk(6, -1)
    draws = draw_from_tail(teacher.expand(2000, 3, 40), indices.expand(2000, 3, 6), 8, seed=1)
    assert not (draws[..., None] == indices[..., None, :]).any()  # never one of the top k
    p_hat = sampled_tail(
        values.expand(2000, 3, 6), indices.expand(2000, 3, 6), teacher.logsumexp(-1).expand(2000, 3), draws, 40
    ).exp()
    torch.testing.assert_close(p_hat.sum(-1), torch.ones(2000, 3))
    torch.testing.assert_close(
        p_hat.gather(-1, indices.expand(2000, 3, 6)), teacher.softmax(-1).gather(-1, indices).expand(2000, 3, 6)
    )
    torch.testing.assert_close(p_hat.mean(0), teacher.softmax(-1), atol=4e-3, rtol=0)  # 16,000 draws per row
    torch.testing.assert_close(draw_from_tail(teacher, indices, 8, seed=1), draw_from_tail(teacher, indices, 8, seed=1))


def test_training_from_a_top_k_recording_looks_the_teacher_up_once_per_step(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deferred teacher (top-k, tail shaped by the student or by the draws) is answered by complete() alone in
    training: no evenly-spread rebuild that is thrown away; validation still asks logits()."""
    from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher

    data = text_data(corpus)
    record_teacher(
        tiny_gpt(dim=32, seed=2),
        data,
        tmp_path / "rec",
        {},
        RecordingSettings(1, 8, tail="sampled", tail_samples=4),
        accelerator="cpu",
        vocab_size=VOCAB,
    )
    assert RecordedTeacher(tmp_path / "rec").meta["bytes_per_position"] == 8 * 2 + 8 * 2 + 4 + 4 * 2  # + 4 int16 draws
    for tail in ("student", "sampled"):
        teacher = RecordedTeacher(tmp_path / "rec", tail=tail)
        asked: list[str] = []
        monkeypatch.setattr(
            RecordedTeacher,
            "logits",
            lambda self, batch, split, original=RecordedTeacher.logits: (
                asked.append(split) or original(self, batch, split)
            ),
        )
        module = DistillationModule(tiny_gpt(), teacher, num_classes=VOCAB, task="tokens", loss_mix=LossMix(alpha=0.5))
        L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
        ).fit(module, datamodule=data)
        assert "train" not in asked and "val" in asked, tail
        assert math.isfinite(float(module.trainer.callback_metrics["train/loss"]))
        monkeypatch.undo()


# -- the chunked loss inside the module (speed.chunk_rows) ------------------------------------------------


def plain_and_chunked_step(
    student: torch.nn.Module,
    teacher,
    batch: dict,
    chunk_rows: int | str = 5,
    loss_mix: LossMix | None = None,
    module_type: type = DistillationModule,
) -> dict[str, torch.Tensor]:
    """One training step with and without ``chunk_rows``: the same loss, logged terms and student gradients."""
    import copy

    results = []
    for rows in (None, chunk_rows):
        model = copy.deepcopy(student)
        module = module_type(
            model,
            teacher,
            num_classes=VOCAB,
            task="tokens",
            chunk_rows=rows,
            loss_mix=loss_mix or LossMix(temperature=2.0, alpha=0.7),
        )
        logged: dict[str, torch.Tensor] = {}
        module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), logged, {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_log, plain_grads), (chunked, chunked_log, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
    assert chunked_log.keys() == plain_log.keys()
    for name in plain_log:
        torch.testing.assert_close(
            torch.as_tensor(chunked_log[name]), torch.as_tensor(plain_log[name]), rtol=1e-5, atol=1e-7
        )
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    return plain_log


def test_the_chunked_step_is_the_plain_step_with_a_live_teacher_and_alone() -> None:
    batch = token_batch()
    plain_and_chunked_step(tiny_gpt(seed=1), tiny_gpt(dim=32, seed=2), batch)  # the teacher's logits made per block too
    plain_and_chunked_step(
        tiny_gpt(seed=1), None, batch, loss_mix=LossMix.task_only()
    )  # CE alone (teacher stage, baseline)


def test_chunk_rows_auto_is_the_plain_step_in_blocks_chosen_from_the_vocabulary(monkeypatch) -> None:
    from kd_lightning.loss import chunked
    from kd_lightning.loss.chunked import default_chunk_rows

    assert [default_chunk_rows(8192, vocab) for vocab in (2048, 8192, 32768, 131072)] == [1024, 512, 128, 32]
    assert default_chunk_rows(40, 32768) == 5  # at most 1/8 of the rows
    chosen = []
    monkeypatch.setattr(chunked, "default_chunk_rows", lambda rows, vocab: chosen.append((rows, vocab)) or 3)
    plain_and_chunked_step(tiny_gpt(seed=1), tiny_gpt(dim=32, seed=2), token_batch(), chunk_rows="auto")
    assert chosen == [(token_batch()["inputs"].numel(), VOCAB)]


def test_the_chunked_step_is_the_plain_step_from_a_recording(corpus: Path, tmp_path: Path) -> None:
    from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher

    data = text_data(corpus)
    record_teacher(
        tiny_gpt(dim=32, seed=2),
        data,
        tmp_path / "rec",
        {},
        RecordingSettings(1, 8, tail="sampled", tail_samples=4),
        accelerator="cpu",
        vocab_size=VOCAB,
    )
    train = data.splits["train"]
    batch = {
        "inputs": train.inputs[:3],
        "labels": train.targets[:3].clone(),
        "index": torch.arange(3),
        "attention_mask": torch.ones(3, 16, dtype=torch.long),
    }
    batch["labels"][0, :5] = IGNORE_INDEX
    batch["attention_mask"][2, 12:] = 0
    for tail in ("student", "sampled", "uniform"):
        plain_and_chunked_step(
            tiny_gpt(seed=1),
            RecordedTeacher(tmp_path / "rec", tail=tail),
            batch,
            loss_mix=LossMix(temperature=1.0, alpha=0.5),
        )


def test_the_chunked_step_with_hugging_face_models() -> None:
    pytest.importorskip("transformers", reason="Hugging Face models need the 'lm' extra (transformers)")
    from kd_lightning.models import hf_causal_lm

    teacher = hf_causal_lm("gpt2", vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    student = hf_causal_lm(
        "llama",
        vocab_size=VOCAB + 12,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
    )  # 12 padding rows
    plain_and_chunked_step(student, teacher.eval(), token_batch())


def fixed_teacher_logits(batch: dict) -> torch.Tensor:
    return 3 * torch.randn(*batch["inputs"].shape, VOCAB, generator=torch.Generator().manual_seed(5))


class FixedTeacher(Teacher):
    def logits(self, batch, split):
        return fixed_teacher_logits(batch)


class ThreeHooks(DistillationModule):
    """Overrides three hooks; each must take effect in the chunked step as in the plain one."""

    def task_loss(self, student_logits, batch):
        return 2.0 * super().task_loss(student_logits, batch)

    def distillation_loss(self, student_logits, teacher_logits, batch):
        return 3.0 * super().distillation_loss(student_logits, teacher_logits, batch)

    def teacher_forward(self, batch):
        return fixed_teacher_logits(batch)  # a plain tensor, also in the chunked step


def test_hooks_a_subclass_overrides_take_effect_in_the_chunked_step() -> None:
    batch = token_batch()
    ours = plain_and_chunked_step(tiny_gpt(seed=1), tiny_gpt(dim=32, seed=2), batch, module_type=ThreeHooks)
    plain = plain_and_chunked_step(tiny_gpt(seed=1), FixedTeacher(), batch)
    torch.testing.assert_close(ours["train/ce"], 2 * plain["train/ce"])
    torch.testing.assert_close(ours["train/kd"], 3 * plain["train/kd"])


class ScaledGPT(GPT):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(tokens)  # changes the logits after the head


def test_chunk_rows_refusals_are_one_line() -> None:
    with pytest.raises(KDError, match="speed.chunk_rows is for language models"):
        DistillationModule(tiny_gpt(), None, num_classes=VOCAB, chunk_rows=8)
    with pytest.raises(KDError, match="speed.chunk_rows must be a positive integer"):
        DistillationModule(tiny_gpt(), None, num_classes=VOCAB, task="tokens", chunk_rows=0)
    with pytest.raises(KDError, match=r"must be a positive integer, got 'fast' \(tokens per block\), auto or null"):
        DistillationModule(tiny_gpt(), None, num_classes=VOCAB, task="tokens", chunk_rows="fast")
    plain_lm = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
    module = DistillationModule(
        plain_lm, None, num_classes=VOCAB, task="tokens", chunk_rows=8, loss_mix=LossMix.task_only()
    )
    with pytest.raises(KDError, match="has neither hidden_states\\(\\) and head .* nor get_output_embeddings"):
        module.training_step(token_batch(), 0)
    torch.manual_seed(0)
    scaled = ScaledGPT(VOCAB, context_length=16, dim=16, depth=1, heads=2)
    module = DistillationModule(
        scaled, None, num_classes=VOCAB, task="tokens", chunk_rows=8, loss_mix=LossMix.task_only()
    )
    with pytest.raises(KDError, match="does not give its logits"):
        module.training_step(token_batch(), 0)


def test_a_top_k_recording_gives_the_teacher_s_exact_perplexity(corpus: Path, tmp_path: Path) -> None:
    """The evaluation splits keep the teacher's logit of every label: its perplexity and accuracy from a top-8
    recording are the live teacher's (up to float16 logits), not those of the evenly spread tail."""
    from kd_lightning.teacher import RecordedTeacher, RecordingSettings, record_teacher

    data, teacher = text_data(corpus), tiny_gpt(dim=32, seed=2)
    record_teacher(teacher, data, tmp_path / "top8", {}, RecordingSettings(1, 8), accelerator="cpu", vocab_size=VOCAB)
    top8 = RecordedTeacher(tmp_path / "top8")
    assert top8.meta["bytes_per_position"] == 8 * 2 + 8 * 2 + 4  # training's bytes: the label logits are val/test only
    x, y = data.splits["test"].inputs, data.splits["test"].targets
    keep = y != IGNORE_INDEX
    rebuilt = top8.logits({"index": torch.arange(len(x)), "labels": y}, "test")
    torch.testing.assert_close(rebuilt.softmax(-1).sum(-1), torch.ones(y.shape))
    live = live_logits(teacher, data, "test")
    live_nll = F.cross_entropy(live[keep], y[keep])
    assert F.cross_entropy(rebuilt[keep], y[keep]).item() == pytest.approx(live_nll.item(), rel=1e-3)
    spread = top8.logits({"index": torch.arange(len(x))}, "test")  # without labels: the tail spread evenly
    assert abs(F.cross_entropy(spread[keep], y[keep]).item() - live_nll.item()) > 1e-2
    assert torch.equal(rebuilt.argmax(-1), spread.argmax(-1))


def test_on_policy_distillation_of_running_text_is_refused_before_training(
    make_cfg, tmp_path: Path, corpus: Path
) -> None:
    from kd_lightning.run.train import train

    with pytest.raises(
        KDError,
        match=r"every training row of TextDataModule is learned from its first token \(running text "
        r"has no prompts\); use chat data",
    ):
        train(
            make_cfg(
                "+recipe=lm_shakespeare",
                f"data.data_dir={corpus}",
                *TINY,
                "distill.alpha=1",
                "distill.on_policy.fraction=1",
                output_dir=tmp_path / "run",
            )
        )
    assert not (tmp_path / "run").exists()  # refused before the run directory was written
