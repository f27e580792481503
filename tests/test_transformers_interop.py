"""Our PyTorch model inside the transformers ecosystem: its GenerationConfig, Seq2SeqTrainer with
predict_with_generate, peft LoRA, and the prepare_inputs_for_generation hook. The oracle each time is
transformers' own Blenderbot class, with the same weights, in the same harness."""

import numpy as np
import pytest
from helpers import hf_model, make_config, pad_after_eos, random_weights

from blenderbot_mb.errors import ConfigError
from blenderbot_mb.generation_config import GenerationConfig, as_generation_config
from blenderbot_mb.naming import tied_aliases

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from blenderbot_mb.torch import BlenderbotForCausalLM, BlenderbotForConditionalGeneration  # noqa: E402

LM = "BlenderbotForConditionalGeneration"


def pair(arch=LM, seed=0):
    """(ours, transformers') with the same random weights."""
    weights = random_weights(make_config(), arch, seed=seed)
    cls = BlenderbotForConditionalGeneration if arch == LM else BlenderbotForCausalLM
    ours = cls(make_config()).eval()
    missing, unexpected = ours.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= set(tied_aliases(ours.config, arch))
    return ours, hf_model(make_config(), weights, arch)


def torch_lm(weights):
    model = BlenderbotForConditionalGeneration(make_config()).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    return model


def hf_generation_config(**settings):
    return transformers.GenerationConfig(decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                         **settings)


def test_transformers_generation_config_converts():
    ours = as_generation_config(hf_generation_config(num_beams=3, max_new_tokens=5, no_repeat_ngram_size=2,
                                                     length_penalty=0.65, forced_eos_token_id=2))
    assert isinstance(ours, GenerationConfig)
    assert (ours.num_beams, ours.max_new_tokens, ours.no_repeat_ngram_size, ours.length_penalty) == (3, 5, 2, 0.65)
    assert (ours.decoder_start_token_id, ours.eos_token_id, ours.forced_eos_token_id) == (1, 2, 2)
    assert as_generation_config(ours) is ours and as_generation_config(None) is None
    with pytest.raises(ConfigError, match="num_beam_groups=2"):
        as_generation_config(transformers.GenerationConfig(num_beams=4, num_beam_groups=2, diversity_penalty=1.0))
    with pytest.raises(ConfigError, match="must be a GenerationConfig"):
        as_generation_config(42)
    model = BlenderbotForConditionalGeneration(make_config())
    model.generation_config = hf_generation_config(num_beams=2)
    assert isinstance(model.generation_config, GenerationConfig) and model.generation_config.num_beams == 2


def test_prepare_inputs_for_generation_drives_a_cached_greedy_loop():
    """A greedy loop over forward() fed by our hook gives transformers' greedy tokens."""
    ours, ref = pair()
    ids = torch.tensor([[5, 9, 33, 70, 2], [6, 7, 8, 2, 0]])
    mask = (ids != 0).long()
    ref.generation_config = hf_generation_config(max_length=9)
    expected = ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1)
    with torch.no_grad():
        encoder_outputs = ours.get_encoder()(ids, attention_mask=mask)
        tokens, past = torch.ones(2, 1, dtype=torch.long), None
        done = torch.zeros(2, dtype=torch.bool)
        while tokens.shape[1] < expected.shape[1]:
            step = ours.prepare_inputs_for_generation(tokens, past_key_values=past, attention_mask=mask,
                                                      use_cache=True, encoder_outputs=encoder_outputs)
            out = ours(**step)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, 0)
            done |= nxt == 2
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    np.testing.assert_array_equal(tokens, expected)


def test_causal_lm_prepare_inputs_for_generation():
    ours, ref = pair("BlenderbotForCausalLM")
    prompt = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        step = ours.prepare_inputs_for_generation(prompt, use_cache=True)
        first = ours(**step)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        step = ours.prepare_inputs_for_generation(torch.cat([prompt, nxt], 1), past_key_values=first.past_key_values,
                                                  use_cache=True)
        assert step["input_ids"].shape == (1, 1) and step["attention_mask"].shape == (1, 5)
        full = ref(torch.cat([prompt, nxt], 1)).logits[:, -1]
        np.testing.assert_allclose(ours(**step).logits[:, -1], full, atol=1e-5)


def test_data_collator_for_seq2seq_gets_decoder_inputs(tokenizer_folder):
    from transformers.models.blenderbot.modeling_blenderbot import shift_tokens_right

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=BlenderbotForConditionalGeneration(make_config()))
    batch = collator([{"input_ids": [5, 6, 2], "labels": [7, 8, 9, 2]}, {"input_ids": [5, 2], "labels": [7, 2]}])
    np.testing.assert_array_equal(batch["decoder_input_ids"], shift_tokens_right(batch["labels"], 0, 1))


def _dataset(n=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        src = rng.integers(4, 128, 3 + i % 4).tolist() + [2]
        rows.append({"input_ids": src, "attention_mask": [1] * len(src),
                     "labels": rng.integers(4, 128, 2 + i % 3).tolist() + [2]})
    return rows


def _collate(rows):
    width, label_width = max(len(r["input_ids"]) for r in rows), max(len(r["labels"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
            "attention_mask": torch.tensor([r["attention_mask"] + [0] * (width - len(r["input_ids"])) for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (label_width - len(r["labels"])) for r in rows])}


def test_seq2seq_trainer_predict_with_generate(tmp_path):
    pytest.importorskip("accelerate")
    results = []
    for model in pair():
        args = transformers.Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / type(model).__module__), per_device_eval_batch_size=4, report_to=[],
            predict_with_generate=True, generation_config=hf_generation_config(max_length=10), use_cpu=True,
            disable_tqdm=True)
        trainer = transformers.Seq2SeqTrainer(model=model, args=args, data_collator=_collate)
        results.append(trainer.predict(_dataset()))
    ours, ref = results
    assert ours.predictions.shape == ref.predictions.shape
    np.testing.assert_array_equal(ours.predictions, ref.predictions)
    np.testing.assert_allclose(ours.metrics["test_loss"], ref.metrics["test_loss"], rtol=1e-5)


def test_peft_lora_wrap_forward_and_generate():
    peft = pytest.importorskip("peft")
    ours, ref = pair()
    lora = dict(task_type=peft.TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                init_lora_weights=False)  # random A and B, so the adapter changes the outputs
    ours, ref = peft.get_peft_model(ours, peft.LoraConfig(**lora)), peft.get_peft_model(ref, peft.LoraConfig(**lora))
    peft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = _collate(_dataset(n=3))
    out, expected = ours(**batch), ref(**batch)
    np.testing.assert_allclose(out.logits.detach(), expected.logits.detach(), atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    ref.base_model.model.generation_config = hf_generation_config(max_length=8)
    ours.base_model.model.generation_config = hf_generation_config(max_length=8)
    with torch.no_grad():
        ids = ours.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expected_ids = ref.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    np.testing.assert_array_equal(ids, expected_ids)


@pytest.mark.parametrize("backend", ["tf", "flax"])
def test_tf_and_flax_models_take_a_transformers_generation_config(backend):
    pytest.importorskip("tensorflow" if backend == "tf" else "flax")
    if backend == "tf":
        from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration as Model
    else:
        from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration as Model
    model = Model(make_config())
    model.generation_config = hf_generation_config(num_beams=3, no_repeat_ngram_size=2)
    assert isinstance(model.generation_config, GenerationConfig)
    assert (model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size) == (3, 2)


@pytest.mark.parametrize("backend", ["torch", "tf", "flax"])
def test_generate_takes_a_transformers_generation_config(backend):
    """generate(generation_config=<transformers'>) gives transformers' own tokens for those settings."""
    weights = random_weights(make_config(), seed=3)
    ref = hf_model(make_config(), weights)
    settings = dict(num_beams=2, max_length=9, no_repeat_ngram_size=2, forced_eos_token_id=2)
    ids = np.array([[5, 9, 33, 70, 2], [6, 7, 8, 2, 0]])
    mask = (ids != 0).astype(np.int64)
    expected = ref.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            generation_config=hf_generation_config(**settings)).numpy()
    if backend == "torch":
        model = torch_lm(weights)
        out = model.generate(torch.from_numpy(ids), torch.from_numpy(mask), generation_config=hf_generation_config(
            **settings))
    elif backend == "tf":
        pytest.importorskip("tensorflow")
        from blenderbot_mb.tf import TFBlenderbotForConditionalGeneration

        model = TFBlenderbotForConditionalGeneration(make_config())
        model.load_weights_dict(weights)
        out = model.generate(ids, mask, generation_config=hf_generation_config(**settings))
    else:
        pytest.importorskip("flax")
        import jax.numpy as jnp

        from blenderbot_mb.checkpoint_msgpack import params_from_tensors
        from blenderbot_mb.flax import FlaxBlenderbotForConditionalGeneration

        params = params_from_tensors({k: jnp.asarray(v) for k, v in weights.items()}, make_config(), LM)
        model = FlaxBlenderbotForConditionalGeneration(make_config(), _do_init=False, params=params)
        out = model.generate(ids, mask, generation_config=hf_generation_config(**settings)).sequences
    np.testing.assert_array_equal(pad_after_eos(np.asarray(out)), pad_after_eos(expected))


def test_seq2seq_trainer_trains_as_transformers_model_does(tmp_path):
    """Seq2SeqTrainer.train() (which counts floating-point operations with num_parameters), here with activation
    checkpointing on: the same losses as transformers' own class from the same weights, and the same weights
    after training."""
    pytest.importorskip("accelerate")
    runs = []
    for model in pair():
        args = transformers.Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / type(model).__module__), per_device_train_batch_size=3, num_train_epochs=2,
            report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0,
            learning_rate=1e-3, activation_checkpointing=True)
        trainer = transformers.Seq2SeqTrainer(model=model, args=args, data_collator=_collate,
                                              train_dataset=_dataset())
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model.state_dict()))
    assert runs[0][0][0] != runs[0][0][-1] and len(runs[0][0]) == 4  # it trained: 2 epochs of 2 updates
    (our_loss, our_state), (their_loss, their_state) = runs
    np.testing.assert_allclose(our_loss, their_loss, rtol=1e-4)
    for name, value in our_state.items():
        np.testing.assert_allclose(value.numpy(), their_state[name].numpy(), atol=1e-5, err_msg=name)


def test_parameter_counts_and_generation_flags():
    ours, ref = pair()
    for kwargs in ({}, dict(exclude_embeddings=True), dict(only_trainable=True)):
        assert ours.num_parameters(**kwargs) == ref.num_parameters(**kwargs), kwargs
    ours.get_input_embeddings().weight.requires_grad_(False)
    ref.get_input_embeddings().weight.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == ref.num_parameters(only_trainable=True)
    assert BlenderbotForConditionalGeneration.can_generate() and BlenderbotForCausalLM.can_generate()
    from blenderbot_mb.torch import BlenderbotModel

    assert not BlenderbotModel.can_generate() and ours.main_input_name == "input_ids"
    config = ours.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (
        ref.config.hidden_size, ref.config.num_attention_heads, ref.config.num_hidden_layers)


def test_a_transformers_config_is_taken(tmp_path):
    """A transformers BlenderbotConfig given to the constructor or from_pretrained(config=...) is converted."""
    ours, ref = pair()
    ours.save_pretrained(tmp_path)
    model = BlenderbotForConditionalGeneration.from_pretrained(tmp_path, config=ref.config)
    converted = model.config.to_dict()
    assert all(converted[k] == v for k, v in ours.config.to_dict().items())
    assert BlenderbotForConditionalGeneration(ref.config).config.d_model == ref.config.d_model
    with pytest.raises(ConfigError, match="must be a BlenderbotConfig .* got transformers.*BartConfig"):
        BlenderbotForConditionalGeneration(transformers.BartConfig())
