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
