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
