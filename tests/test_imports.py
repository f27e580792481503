import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_core_imports_no_framework():
    r = _run(
        """
        import sys
        import blenderbot_mb
        from blenderbot_mb import BlenderbotConfig, GenerationConfig, checkpoint, naming, convert, cli, hub
        from blenderbot_mb import tokenizer, conversation, data, default_model, presets
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'jax', 'flax', 'keras'))
        print(heavy)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("backend, module, extra", [("torch", "torch", "torch"), ("tf", "tensorflow", "tf"),
                                                    ("flax", "flax", "flax")])
def test_missing_backend_names_the_extra(backend, module, extra):
    # hide the framework from the import system, as if it were not installed
    r = _run(
        f"""
        import sys, importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == {module!r} else real(name, *a)
        sys.modules[{module!r}] = None
        try:
            import blenderbot_mb.{backend}
        except ImportError as e:
            from blenderbot_mb import MissingBackendError
            print(type(e).__name__, isinstance(e, MissingBackendError), e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "MissingBackendError True" in r.stdout
    assert f"blenderbot-mb[{extra}]" in r.stdout


def test_a_torch_reply_loads_no_compiler_and_no_distributed_checkpoints(tmp_path):
    """Importing the PyTorch backend, loading a checkpoint and replying on the CPU import neither
    torch._dynamo (the first random fill of a meta tensor would: from_pretrained builds the model on the meta
    device without torch.nn's initializations) nor torch.distributed.checkpoint (training's, imported when a
    run saves or resumes): together ~2 s of every `blenderbot-mb generate`. The loaded weights are the
    checkpoint's, and torch.nn's initializations work as before afterwards."""
    r = _run(
        f"""
        import sys
        import torch
        from blenderbot_mb import BlenderbotConfig
        from blenderbot_mb.torch import BlenderbotForConditionalGeneration
        config = BlenderbotConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32)
        torch.manual_seed(0)
        saved = BlenderbotForConditionalGeneration(config)
        saved.save_pretrained({str(tmp_path)!r})
        loaded = BlenderbotForConditionalGeneration.from_pretrained({str(tmp_path)!r})
        same = all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))
        loaded.generate(torch.tensor([[5, 6, 7, 2]]), max_new_tokens=3)
        fresh = torch.nn.Linear(4, 4).weight
        print(same, torch.count_nonzero(fresh).item() > 0, len(saved.state_dict()) == len(loaded.state_dict()))
        print(sorted(m for m in ('torch._dynamo', 'torch.distributed.checkpoint') if m in sys.modules))
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["True True True", "[]"]
