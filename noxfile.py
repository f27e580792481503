"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s demo`.

torch is installed first at 2.13.0 (the CPU build that CI uses); the package itself does not pin torch.
"""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"


@nox.session(python="3.11")
def tests(session):
    session.install(TORCH)
    session.install("-e", ".[all,test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python="3.11")
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "conversion", "benchmarks", "noxfile.py")


@nox.session(python="3.11")
def demo(session):
    """The main job: a reply from the default model."""
    session.install(TORCH)
    session.install("-e", ".[torch]")
    session.run("blenderbot-mb", "generate", *(session.posargs or ["Hello! How are you today?"]))


@nox.session(python="3.11")
def benchmark(session):
    session.install(TORCH)
    session.install("-e", ".[all,test]")
    session.run("python", "benchmarks/benchmark_generate.py", *session.posargs)


@nox.session(python="3.11")
def oracle_hf4(session):
    """Hugging Face's own tf_model.h5 / flax_model.msgpack from transformers 4.x, loaded by our backends.

    transformers 4.x (TF on tf-keras, Flax) lives in a second virtualenv: Keras 3 and it cannot share one."""
    session.install(TORCH)
    session.install("-e", ".[all,test]")
    hf4 = f"{session.create_tmp()}/hf4"
    session.run("python", "-m", "venv", hf4, external=True)
    session.run(f"{hf4}/bin/pip", "install", "-q", TORCH, external=True)
    session.run(f"{hf4}/bin/pip", "install", "-q", "transformers>=4.45,<5", "tensorflow-cpu", "tf-keras", "jax",
                "flax", "safetensors", "h5py", external=True)
    session.run("pytest", "-q", "tests/test_hf4_files.py", env={"BLENDERBOT_MB_HF4_PYTHON": f"{hf4}/bin/python"})


@nox.session(python="3.11")
def export_optimum(session):
    """The ONNX export loaded by Hugging Face optimum's ORTModelForSeq2SeqLM.

    optimum-onnx needs transformers 4.x: it is installed without dependencies into a folder that only the
    test's subprocess puts first on its path (torch and onnxruntime come from this session)."""
    session.install(TORCH)
    session.install("-e", ".[all,test]")
    site = f"{session.create_tmp()}/optimum"
    session.run("pip", "install", "-q", "--no-deps", "--target", site, "optimum-onnx==0.1.0", "optimum==2.1.0",
                "transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2")
    session.run("pytest", "-q", "tests/test_export_onnx.py", env={"BLENDERBOT_MB_OPTIMUM_PATH": site})


@nox.session(python="3.11")
def oracle_parlai(session):
    """The ParlAI converter against a real ParlAI TransformerGeneratorModel.

    parlai pins numpy, torch and protobuf versions this package does not use: it is installed without
    dependencies into a folder that only the test's subprocess puts on its path."""
    session.install(TORCH)
    session.install("-e", ".[all,test]")
    site = f"{session.create_tmp()}/parlai"
    session.run("pip", "install", "-q", "--no-deps", "--target", site, "parlai==1.7.2", "setuptools<81", "iopath",
                "portalocker")
    session.run("pytest", "-q", "tests/test_export_parlai.py", env={"BLENDERBOT_MB_PARLAI_PATH": site})
