"""Pretrained transformers models in: a teacher (or student) read with from_pretrained from a folder the test writes,
its tokenizer the run's, distilled from as it is; every problem with the folder one line before training."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from data_factory import make_corpus

from kd_lightning import KDError
from kd_lightning.run.train import train

pytest.importorskip("transformers", reason="pretrained models need the 'lm' extra (transformers)")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from kd_lightning.data.text import train_tokenizer  # noqa: E402
from kd_lightning.models import pretrained_causal_lm  # noqa: E402


def save_tokenizer(
    corpus: Path, folder: Path, vocab_size: int = 300, works: tuple[str, ...] = ("alpha", "delta", "epsilon")
) -> int:
    """A byte-level BPE tokenizer trained on ``works``, saved as a transformers tokenizer; its number of tokens."""
    bpe = train_tokenizer([(corpus / f"{work}.txt").read_text() for work in works], vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def save_llama(folder: Path, vocab_size: int, seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            **{
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 16,
                "bos_token_id": 0,
                "eos_token_id": 0,
            }
            | config
        )
    )
    model.save_pretrained(folder)
    return model


@pytest.fixture()
def teacher_dir(tmp_path: Path) -> tuple[Path, Path, int]:
    """``(corpus, a pretrained teacher's folder with its tokenizer, the tokenizer's size)``."""
    corpus = make_corpus(tmp_path / "corpus")
    size = save_tokenizer(corpus, tmp_path / "teacher")
    save_llama(tmp_path / "teacher", size)
    return corpus, tmp_path / "teacher", size


def run_settings(
    corpus: Path, teacher: Path, size: int, student: tuple[str, ...] = ("student.model.dim=16", "student.model.depth=1")
) -> list[str]:
    return [
        "+recipe=lm_shakespeare",
        f"data.data_dir={corpus}",
        "data.val_works=[beta]",
        "data.test_works=[gamma]",
        f"data.vocab_size={size}",
        "data.block_size=16",
        "teacher=hf",
        f"teacher.model.path={teacher}",
        *student,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "baseline=false",
    ]


def test_a_pretrained_teacher_is_distilled_from_as_it_is_with_its_tokenizer(
    make_cfg, teacher_dir, tmp_path: Path, caplog
) -> None:
    corpus, teacher, size = teacher_dir
    weights = (teacher / "model.safetensors").read_bytes()
    with caplog.at_level("INFO", logger="kd_lightning"):
        results = train(make_cfg(*run_settings(corpus, teacher, size), output_dir=tmp_path / "run"))
    assert f"teacher: pretrained, read from {teacher}; distilled from as it is" in caplog.text
    assert not (tmp_path / "run" / "teacher").exists() and not (tmp_path / "cache" / "trained_teachers").exists()
    assert math.isfinite(results["distilled"]["test/ppl"]) and results["teacher"]["test/ppl"] > 1
    # an untrained teacher: its perplexity on the test tokens is about the vocabulary's size
    assert 0.5 * size < results["teacher"]["test/ppl"] < 2 * size
    assert (teacher / "model.safetensors").read_bytes() == weights

    recorded = train(
        make_cfg(*run_settings(corpus, teacher, size), "teacher.mode=recorded", output_dir=tmp_path / "recorded")
    )
    assert recorded["teacher"]["test/ppl"] == pytest.approx(results["teacher"]["test/ppl"], rel=1e-2)  # float16 logits


def test_a_model_read_with_from_pretrained_trains_in_train_mode(teacher_dir) -> None:
    """from_pretrained returns eval mode, which Lightning 2.6 keeps for submodules: a student's dropout would be off."""
    _, teacher, _ = teacher_dir
    model = pretrained_causal_lm(str(teacher), dtype="bfloat16")
    assert model.training and all(module.training for module in model.modules())
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_pretrained_folders_are_one_line_before_training(make_cfg, teacher_dir, tmp_path: Path) -> None:
    corpus, teacher, size = teacher_dir

    def refused(*overrides: str, match: str) -> None:
        student = tuple(o for o in overrides if o.startswith("student")) or (
            "student.model.dim=16",
            "student.model.depth=1",
        )
        settings = run_settings(corpus, teacher, size, student)
        with pytest.raises(KDError, match=match) as error:
            train(
                make_cfg(
                    *settings, *(o for o in overrides if not o.startswith("student")), output_dir=tmp_path / "refused"
                )
            )
        assert "\n" not in str(error.value) and not (tmp_path / "refused").exists()

    refused(
        f"teacher.model.path={tmp_path / 'nowhere'}", match=r"teacher.model.path=.*nowhere: no such folder \(looked in "
    )
    refused("teacher.model.path=null", match="set teacher.model.path to the pretrained model")
    refused(
        "teacher.model.dtype=float64",
        match="teacher.model.dtype must be one of float32, bfloat16, float16, got 'float64'",
    )
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((teacher / "config.json").read_text())
    refused(f"teacher.model.path={tmp_path / 'config_only'}", match="holds a config.json but no weights")
    (tmp_path / "empty").mkdir()
    refused(f"teacher.model.path={tmp_path / 'empty'}", match=r"holds no model \(no config.json in ")

    # weights but no tokenizer
    save_llama(tmp_path / "bare", size)
    refused(
        f"teacher.model.path={tmp_path / 'bare'}",
        match=r"no tokenizer at .*bare.*: looked in the folder .*; the model "
        "folder needs its tokenizer files",
    )
    # model code of its own
    save_llama(tmp_path / "remote", size)
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    (tmp_path / "remote" / "config.json").write_text(
        json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "modeling.Mine"}})
    )
    refused(
        "student=hf",
        f"student.model.path={tmp_path / 'remote'}",
        match="ships its own model code, which runs only with trust_remote_code=true",
    )
    # a student whose folder has another tokenizer
    other = save_tokenizer(corpus, tmp_path / "other_student", works=("beta", "gamma"))
    save_llama(tmp_path / "other_student", other)
    refused(
        "student=hf",
        f"student.model.path={tmp_path / 'other_student'}",
        match="teacher and student use different tokenizers",
    )
    # a config.json that is not JSON, weights cut short (a download or a copy interrupted)
    shutil.copytree(teacher, tmp_path / "bad_config")
    (tmp_path / "bad_config" / "config.json").write_text("{not json")
    refused(
        f"teacher.model.path={tmp_path / 'bad_config'}",
        match=r"teacher.model.path=.*bad_config: its config.json is unreadable \(Expecting property name",
    )
    shutil.copytree(teacher, tmp_path / "cut_short")
    weights = (tmp_path / "cut_short" / "model.safetensors").read_bytes()
    (tmp_path / "cut_short" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    refused(
        f"teacher.model.path={tmp_path / 'cut_short'}",
        match=r"teacher.model.path=.*cut_short: model.safetensors is unreadable \(.*\): a file cut short",
    )
    # the run's vocabulary is the tokenizer's
    refused(
        f"data.vocab_size={size + 5}",
        match=rf"data.vocab_size={size + 5} but the tokenizer .* has {size} tokens; set "
        rf"data.vocab_size={size}",
    )


# -- a transformers model out --------------------------------------------------------------------


def test_export_format_hf_writes_a_model_plain_transformers_loads_with_the_same_logits(
    make_cfg, tmp_path: Path, capsys
) -> None:
    """The built-in GPT as GPT-2, the teacher stage too, and a pretrained (transformers) student as it is; the run's
    tokenizer beside each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd_lightning.checkpoints import load_weights
    from kd_lightning.models import GPT
    from kd_lightning.run.export import main as export_main

    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    train(
        make_cfg(
            "+recipe=lm_shakespeare",
            f"data.data_dir={corpus}",
            "data.val_works=[beta]",
            "data.test_works=[gamma]",
            "data.vocab_size=300",
            "data.block_size=16",
            "teacher.model.dim=32",
            "teacher.model.depth=1",
            "student.model.dim=16",
            "student.model.depth=1",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "baseline=false",
            output_dir=run,
        )
    )
    tokens = torch.randint(0, 300, (2, 16))
    for stage, width, depth, heads in (("distilled", 16, 1, 2), ("teacher", 32, 1, 4)):
        export_main([str(run / stage / "checkpoints" / "last.ckpt"), str(tmp_path / stage), "--format", "hf"])
        assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
        ours = load_weights(GPT(300, 16, width, depth, heads), run / stage / "checkpoints" / "last.ckpt").eval()
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / stage)
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "distilled")
    text = (corpus / "gamma.txt").read_text()[:200]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text and tokenizer.eos_token == "<|endoftext|>"
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id  # generate() stops at the end of a text

    # the trained teacher a later run reuses from the cache: the same model with --role teacher and the run's config
    (cached,) = (tmp_path / "cache" / "trained_teachers").glob("*.pth")
    export_main(
        [
            str(cached),
            str(tmp_path / "cached"),
            "--format",
            "hf",
            "--role",
            "teacher",
            "--config",
            str(run / ".hydra" / "config.yaml"),
        ]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(tmp_path / "cached")(tokens).logits,
            AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")(tokens).logits,
        )
    with pytest.raises(SystemExit):
        export_main([str(cached), str(tmp_path / "state.pt"), "--role", "teacher"])
    assert "--role is for --format hf" in capsys.readouterr().err

    # refused before anything is written: an existing folder, TorchScript with --format hf
    with pytest.raises(SystemExit):
        export_main(
            [str(run / "distilled" / "checkpoints" / "last.ckpt"), str(tmp_path / "distilled"), "--format", "hf"]
        )
    assert "already exists; choose another path or pass --overwrite" in capsys.readouterr().err


def test_a_pretrained_student_exports_as_it_is(make_cfg, teacher_dir, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kd_lightning.checkpoints import load_weights
    from kd_lightning.run.export import export_transformers

    corpus, teacher, size = teacher_dir
    save_llama(tmp_path / "student", size, seed=1)
    train(
        make_cfg(
            *run_settings(corpus, teacher, size, ("student=hf", f"student.model.path={tmp_path / 'student'}")),
            output_dir=tmp_path / "run",
        )
    )
    checkpoint = tmp_path / "run" / "distilled" / "checkpoints" / "last.ckpt"
    export_transformers(checkpoint, tmp_path / "out")
    trained = load_weights(pretrained_causal_lm(str(tmp_path / "student")), checkpoint).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokens = torch.randint(0, size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, trained(tokens).logits)
    assert not torch.equal(
        loaded.lm_head.weight, save_llama(tmp_path / "fresh", size, seed=1).lm_head.weight
    )  # it trained
    assert (tmp_path / "out" / "tokenizer.json").is_file()


# -- a student made from the teacher -------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_student_from_the_teacher_s_layers_keeps_their_weights(tmp_path: Path, family: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from kd_lightning.models import student_from_teacher

    if family == "llama":
        teacher = save_llama(tmp_path / "t", 64, num_hidden_layers=4)
        layers = lambda model: model.model.layers  # noqa: E731
    else:
        torch.manual_seed(0)
        teacher = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=4, n_head=2))
        teacher.save_pretrained(tmp_path / "t")
        layers = lambda model: model.transformer.h  # noqa: E731
    student = student_from_teacher(pretrained_causal_lm(str(tmp_path / "t")), keep_layers=[0, 3])
    assert student.training and len(layers(student)) == 2 and student.config.num_hidden_layers == 2
    for ours, theirs in ((layers(student)[0], layers(teacher)[0]), (layers(student)[1], layers(teacher)[3])):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    tokens = torch.randint(0, 64, (2, 8))
    assert student.eval()(tokens).logits.shape == (2, 8, 64)
    with torch.no_grad():  # generation's key/value cache is indexed by the new layer numbers
        student.generate(tokens[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    fresh = student_from_teacher(pretrained_causal_lm(str(tmp_path / "t")), keep_layers=[0, 3], init="fresh")
    assert fresh.training and {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
    assert not any(
        torch.equal(a, b) for a, b in zip(layers(fresh)[1].parameters(), layers(teacher)[3].parameters()) if a.std() > 0
    )
    with pytest.raises(KDError, match="student.model.init must be teacher .* or fresh .*, got 'random'"):
        student_from_teacher(pretrained_causal_lm(str(tmp_path / "t")), keep_layers=[0], init="random")


def test_student_from_teacher_end_to_end_and_its_refusals(make_cfg, teacher_dir, tmp_path: Path) -> None:
    from kd_lightning.models import GPT, student_from_teacher

    corpus, teacher, size = teacher_dir
    save_llama(teacher, size, num_hidden_layers=3)  # a deeper teacher in the same folder
    from_teacher = ("student=from_teacher", "student.model.keep_layers=[0,2]")
    results = train(make_cfg(*run_settings(corpus, teacher, size, from_teacher), output_dir=tmp_path / "run"))
    assert math.isfinite(results["distilled"]["test/ppl"])

    for keep, message in (
        ("[0,3]", r"keep_layers=\[0, 3\] must name distinct layers of the teacher's 3 \(0..2\); \[3\] are not"),
        ("[1,1]", "must name distinct layers"),
        ("null", "set student.model.keep_layers to a list of the teacher's layers"),
        ("2", r"set student.model.keep_layers to a list of the teacher's layers to keep, e.g. \[0, 2\] .*got 2\."),
    ):
        with pytest.raises(KDError, match=message):
            train(
                make_cfg(
                    *run_settings(corpus, teacher, size, ("student=from_teacher", f"student.model.keep_layers={keep}")),
                    output_dir=tmp_path / "refused",
                )
            )
    assert not (tmp_path / "refused").exists()
    with pytest.raises(KDError, match="student=from_teacher copies the layers of a pretrained teacher"):
        train(
            make_cfg(
                "+recipe=lm_shakespeare", f"data.data_dir={corpus}", *from_teacher, output_dir=tmp_path / "refused"
            )
        )
    with pytest.raises(KDError, match="student=from_teacher takes the decoder layers of a transformers causal LM"):
        student_from_teacher(GPT(64, 8, 16, 2, 2), keep_layers=[0])


def test_a_student_from_a_bfloat16_teacher_trains_float32_weights_and_says_so(tmp_path: Path, caplog) -> None:
    from kd_lightning.models import pretrained_causal_lm, student_from_teacher

    save_llama(tmp_path / "t", 64, num_hidden_layers=2)
    with caplog.at_level(logging.INFO, logger="kd_lightning.models.pretrained"):
        student = student_from_teacher(pretrained_causal_lm(str(tmp_path / "t"), dtype="bfloat16"), keep_layers=[1])
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert "the teacher is held in bfloat16, the student's weights in float32 (student.model.dtype)" in caplog.text
    held = student_from_teacher(pretrained_causal_lm(str(tmp_path / "t"), dtype="bfloat16"), [0], dtype="bfloat16")
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    with pytest.raises(KDError, match="student.model.dtype must be one of float32, bfloat16, float16, got 'half'"):
        student_from_teacher(pretrained_causal_lm(str(tmp_path / "t")), [0], dtype="half")


def test_teacher_fit_pretrained_is_true_or_false(make_cfg, teacher_dir) -> None:
    from conftest import settings_of

    corpus, teacher, size = teacher_dir
    with pytest.raises(KDError, match="teacher.fit.pretrained must be true or false, got 'yes'"):
        settings_of(make_cfg(*run_settings(corpus, teacher, size), "teacher.fit.pretrained=yes"))
