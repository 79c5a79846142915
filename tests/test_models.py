import pytest
import torch

from fedtune.models import (add_lora, check_lora_targets, find_layer_stack, head_modules, load_classifier,
                            load_tokenizer, load_trainable_state, make_student, same_tokenizer, trainable_state)


@pytest.fixture(params=["tiny_bert", "tiny_distilbert", "tiny_llama"])
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_student_keeps_every_other_block(model_dir):
    teacher = load_classifier(model_dir, num_labels=2, seed=0)
    student = make_student(teacher)
    _, _, teacher_blocks = find_layer_stack(teacher)
    _, _, student_blocks = find_layer_stack(student)
    assert len(student_blocks) == 2 and student.config.num_hidden_layers == 2
    for i, block in enumerate(student_blocks):  # student block i is a copy of teacher block 2i+1
        for (name, p), (_, q) in zip(block.named_parameters(), teacher_blocks[2 * i + 1].named_parameters()):
            assert torch.equal(p, q), name
    batch = {"input_ids": torch.tensor([[101, 2023, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert student(**batch).logits.shape == (1, 2)


@pytest.mark.parametrize("blocks, layers, kept", [
    ("even", 1, [3]), ("even", 2, [1, 3]), ("even", 3, [0, 1, 3]), ("even", 4, None),
    ("first", 1, [3]), ("first", 2, [0, 3]), ("first", 3, [0, 1, 3]), ("first", 4, None)])
def test_student_layers_keeps_the_chosen_blocks_ending_with_the_last(tiny_llama, blocks, layers, kept):
    teacher = load_classifier(tiny_llama, num_labels=2, seed=0)
    if kept is None:  # as many blocks as the teacher: not a student
        with pytest.raises(ValueError, match="student-layers=4"):
            make_student(teacher, layers, blocks)
        return
    student = make_student(teacher, layers, blocks)
    _, _, teacher_blocks = find_layer_stack(teacher)
    _, _, student_blocks = find_layer_stack(student)
    assert student.config.num_hidden_layers == len(student_blocks) == len(kept)
    for block, index in zip(student_blocks, kept):
        assert torch.equal(block.self_attn.q_proj.weight, teacher_blocks[index].self_attn.q_proj.weight)
    assert [m.layer_idx for m in student.modules() if hasattr(m, "layer_idx")] == list(range(len(kept)))


def test_lora_trains_adapters_and_the_whole_head(model_dir):
    model = add_lora(load_classifier(model_dir, num_labels=2, seed=0), r=4, alpha=8)
    names = list(trainable_state(model))
    heads = head_modules(model.base_model.model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    for head in heads:  # e.g. DistilBERT's pre_classifier too, which peft leaves frozen by default
        assert any(f"{head}.modules_to_save" in n for n in names), head
    assert all("lora_" in n or "modules_to_save" in n for n in names)


def test_lora_targets_wrap_exactly_the_named_layers_and_an_unknown_name_is_refused(tiny_bert):
    model = add_lora(load_classifier(tiny_bert, num_labels=2, seed=0), r=2, alpha=4,
                     targets="query, attention.output.dense")
    wrapped = {n.split(".lora_A")[0] for n in trainable_state(model) if ".lora_A" in n}
    assert wrapped == {f"base_model.model.bert.encoder.layer.{i}.{m}" for i in range(4)
                       for m in ("attention.self.query", "attention.output.dense")}
    check_lora_targets(tiny_bert, "query,value")  # a weightless copy: passes
    with pytest.raises(ValueError, match="lora-targets q_proj: no layer of model 'bert'"):
        check_lora_targets(tiny_bert, "query,q_proj")


def test_distilbert_head_includes_pre_classifier(tiny_distilbert):
    model = load_classifier(tiny_distilbert, num_labels=2, seed=0)
    assert head_modules(model) == ["pre_classifier", "classifier"]


def test_trainable_state_round_trip_and_strictness(tiny_bert):
    model = add_lora(load_classifier(tiny_bert, num_labels=2, seed=0), r=4, alpha=8)
    state = {k: torch.full_like(v, 0.5) for k, v in trainable_state(model).items()}
    load_trainable_state(model, state)
    assert all(torch.equal(v, state[k]) for k, v in trainable_state(model).items())
    with pytest.raises(ValueError, match="missing"):
        load_trainable_state(model, dict(list(state.items())[1:]))
    name = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**state, name: torch.zeros(3)})


def test_same_seed_gives_the_same_head(tiny_bert):
    a, b = (load_classifier(tiny_bert, 2, seed=3) for _ in range(2))
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_decoder_models_get_a_pad_token(tiny_llama):
    model = load_classifier(tiny_llama, num_labels=2, seed=0)
    assert model.config.pad_token_id is not None


def test_a_student_of_another_vocabulary_is_told_apart(tiny_bert, tiny_smollm, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(tmp_path)
    assert not same_tokenizer(tiny_bert, str(tmp_path)) and not same_tokenizer(tiny_smollm, tiny_bert)
    assert same_tokenizer(tiny_bert, tiny_bert)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_distilbert"])
def test_model_dropout_zero_makes_training_forward_passes_deterministic(fixture, request):
    path = request.getfixturevalue(fixture)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    own, off = load_classifier(path, 2, seed=0), load_classifier(path, 2, seed=0, dropout=0.0)
    own.train(), off.train()
    assert not torch.equal(own(**batch).logits, own(**batch).logits)  # the model's own dropout (0.1) is random
    assert torch.equal(off(**batch).logits, off(**batch).logits)
    off.eval()
    assert torch.allclose(off(**batch).logits, own.eval()(**batch).logits)  # the same weights: only dropout changed
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, torch.nn.Dropout))
    saved = {k: v for k, v in off.config.to_dict().items() if "dropout" in k and isinstance(v, float)}
    assert saved and set(saved.values()) == {0.0}  # a saved copy (a teacher) keeps it


def test_model_dropout_is_checked_and_changes_the_teacher_only_when_set(tmp_path):
    from fedtune.config import Settings
    from fedtune.teacher import teacher_dir

    with pytest.raises(ValueError, match="model-dropout=1.5"):
        Settings(model_dropout=1.5)
    assert teacher_dir(Settings(model_dropout=-1.0)) == teacher_dir(Settings())
    assert teacher_dir(Settings(model_dropout=0.0)) != teacher_dir(Settings())


def test_a_teacher_trained_in_bf16_is_not_reused_in_fp32():
    from fedtune.config import Settings
    from fedtune.teacher import teacher_dir, teacher_settings

    fp32, bf16 = Settings(precision="fp32"), Settings(precision="bf16")
    assert teacher_dir(fp32) != teacher_dir(bf16)
    assert teacher_settings(bf16)["precision"] == "bf16"
    assert "precision" not in teacher_settings(fp32)  # fp32 teachers keep the folders they had


def test_a_half_precision_checkpoint_trains_in_fp32(tiny_bert, tmp_path):
    """The GPU check carries the model in fp16 (half the bytes); training needs fp32 weights (autocast
    computes in bf16/fp16 where asked, the optimizer updates fp32)."""
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_bert, dtype=torch.float16).save_pretrained(tmp_path)
    load_tokenizer(tiny_bert).save_pretrained(tmp_path)
    model = load_classifier(str(tmp_path), 2, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    full = load_classifier(tiny_bert, 2, seed=0)
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(model.state_dict()[weight], full.state_dict()[weight].half().float())


def test_the_kd_student_follows_student_blocks(tiny_llama):
    from fedtune.config import Settings
    from fedtune.teacher import build_student

    teacher = load_classifier(tiny_llama, num_labels=2, seed=0)
    _, _, teacher_blocks = find_layer_stack(teacher)
    for blocks, kept in (("even", [1, 3]), ("first", [0, 3])):
        settings = Settings(task="sst2", model=str(tiny_llama), student_layers=2, student_blocks=blocks)
        _, _, student_blocks = find_layer_stack(build_student(settings, teacher))
        assert [next(i for i, t in enumerate(teacher_blocks) if torch.equal(b.mlp.up_proj.weight, t.mlp.up_proj.weight))
                for b in student_blocks] == kept
    with pytest.raises(ValueError, match="student-blocks='last'"):
        Settings(task="sst2", student_blocks="last")


def test_student_probe_lm_loss_is_the_token_weighted_mean_of_each_sentences_own_loss(tiny_llama):
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(__file__).parents[1] / "scripts" / "student_probe.py"
    spec = importlib.util.spec_from_file_location("student_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = load_tokenizer(tiny_llama)
    sentences = ["the cat sat on the mat", "a dog", "colourless green ideas sleep furiously"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for sentence in sentences:  # one at a time, no padding: transformers' own shifted loss
            ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
            total += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
        assert probe.lm_loss(model, tokenizer, sentences, batch_size=2) == pytest.approx(total / tokens, rel=1e-5)
