"""Hostile files and interrupted writes: every read stays inside the model folder, every write replaces a
folder whole (old model or new, never a mix), and each bad file gives one clear error and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import make_config, random_batch, random_weights, write_checkpoint

from blenderbot_mb.checkpoint import load_pretrained, read_weights, save_pretrained
from blenderbot_mb.convert import convert_checkpoint
from blenderbot_mb.errors import CheckpointError
from blenderbot_mb.fileio import TEMP_TAG

ARCH = "BlenderbotForConditionalGeneration"


@pytest.fixture
def model(tmp_path):
    config = make_config("tiny")
    weights = random_weights(config, seed=5)
    folder = write_checkpoint(tmp_path / "model", config, weights, max_shard_size="8KB")
    return folder, config, weights


def leftovers(folder) -> list[str]:
    """Temporary files and folders (of any writer) anywhere under `folder`."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files if TEMP_TAG in n]


def assert_refused(fn, match: str, out):
    with pytest.raises(CheckpointError, match=match) as e:
        fn()
    assert "\n" not in str(e.value).strip() or match == "does not match"
    assert not os.path.exists(out), "a refused conversion wrote its destination"
    assert not leftovers(os.path.dirname(out))


# ---------------------------------------------------------------------- confinement
def test_index_shard_names_must_be_plain_names(model, tmp_path):
    folder, config, _ = model
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    secret = tmp_path / "secret.safetensors"
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(os.path.join(folder, first), secret)
    for bad in ("../secret.safetensors", str(secret), "sub/../../secret.safetensors"):
        name = next(iter(index["weight_map"]))
        hostile = {**index, "weight_map": {**index["weight_map"], name: bad}}
        with open(index_path, "w") as f:
            json.dump(hostile, f)
        assert_refused(lambda: read_weights(folder, config, ARCH), "plain file name", str(tmp_path / "out"))
        assert_refused(lambda: convert_checkpoint(folder, tmp_path / "out"), "plain file name", str(tmp_path / "out"))


def test_symlinked_shard_pointing_out_is_refused(model, tmp_path):
    folder, config, _ = model
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(os.path.join(folder, shard), outside)
    os.symlink(outside, os.path.join(folder, shard))
    assert_refused(lambda: read_weights(folder, config, ARCH), "outside the model folder", str(tmp_path / "out"))
    # a symlink that stays inside the folder is fine
    os.replace(outside, os.path.join(folder, "real.bin"))
    os.remove(os.path.join(folder, shard))
    os.symlink("real.bin", os.path.join(folder, shard))
    read_weights(folder, config, ARCH)


def test_symlinked_tokenizer_file_pointing_out_is_not_copied(model, tmp_path):
    folder, _, _ = model
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    os.symlink(secret, os.path.join(folder, "vocab.json"))
    out = str(tmp_path / "out")
    assert_refused(lambda: convert_checkpoint(folder, out), "outside the model folder", out)


def test_fifo_config_does_not_hang(model, tmp_path):
    folder, _, _ = model
    os.remove(os.path.join(folder, "config.json"))
    os.mkfifo(os.path.join(folder, "config.json"))
    start = time.time()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_pretrained(folder, ARCH, "numpy")
    assert_refused(lambda: convert_checkpoint(folder, tmp_path / "out"), "not a regular file", str(tmp_path / "out"))
    assert time.time() - start < 5


def test_fifo_weights_file_does_not_hang(model, tmp_path):
    folder, config, _ = model
    for name in os.listdir(folder):
        if "safetensors" in name:
            os.remove(os.path.join(folder, name))
    os.mkfifo(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_weights(folder, config, ARCH)


@pytest.fixture
def h5_model(model, tmp_path):
    pytest.importorskip("h5py")
    folder, config, weights = model
    return convert_checkpoint(folder, tmp_path / "h5", to="tf"), config, weights


def _first_kernel(f):
    import h5py

    found = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and "fc1" in name else None)
    return found[0]


def test_h5_external_link_is_refused(h5_model, tmp_path):
    import h5py

    folder, config, _ = h5_model
    with h5py.File(tmp_path / "other.h5", "w") as g:
        g["data"] = np.ones((40, 16), np.float32)
    with h5py.File(os.path.join(folder, "tf_model.h5"), "r+") as f:
        name = _first_kernel(f)
        del f[name]
        f[name] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/data")
    out = str(tmp_path / "out")
    assert_refused(lambda: convert_checkpoint(folder, out), "ExternalLink", out)


def test_h5_external_storage_is_refused(h5_model, tmp_path):
    import h5py

    folder, config, weights = h5_model
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones((16, 40), np.float32).tobytes())  # any local file's bytes would do
    with h5py.File(os.path.join(folder, "tf_model.h5"), "r+") as f:
        name = _first_kernel(f)
        shape, dtype = f[name].shape, f[name].dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
    out = str(tmp_path / "out")
    assert_refused(lambda: convert_checkpoint(folder, out), "external storage", out)


def test_h5_chunked_dataset_without_data_is_refused(h5_model, tmp_path):
    import h5py

    folder, _, _ = h5_model
    with h5py.File(os.path.join(folder, "tf_model.h5"), "r+") as f:
        name = _first_kernel(f)
        del f[name]
        # 20 GiB of fill values if read: refused from the header, before any allocation
        f.create_dataset(name, shape=(80_000, 65_536), dtype=np.float32, chunks=(64, 64))
    out = str(tmp_path / "out")
    assert_refused(lambda: convert_checkpoint(folder, out), "holds 0 bytes|shape", out)


# ---------------------------------------------------------------------- whole folders
def test_written_files_follow_the_umask(model, tmp_path):
    folder, config, weights = model
    old = os.umask(0o027)
    try:
        out = convert_checkpoint(folder, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o640, name


def test_save_replaces_other_formats_and_keeps_other_files(model, tmp_path):
    folder, config, weights = model
    out = tmp_path / "out"
    pytest.importorskip("h5py")
    save_pretrained(str(out), config, weights, weights_format="tf")
    (out / "notes.txt").write_text("mine")
    other = random_weights(config, seed=9)
    save_pretrained(str(out), config, other)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    np.testing.assert_array_equal(read_weights(str(out), config, ARCH)["model.shared.weight"],
                                  other["model.shared.weight"])


def test_convert_refuses_non_empty_destination_unless_forced(model, tmp_path):
    folder, config, weights = model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty.*--force"):
        convert_checkpoint(folder, out)
    assert os.listdir(out) == ["keep.txt"]
    convert_checkpoint(folder, out, force=True)
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    # a failing forced conversion leaves the old destination whole
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    os.truncate(os.path.join(folder, sorted(n for n in os.listdir(folder) if n.startswith("model-"))[0]), 100)
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(folder, out, force=True)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert not leftovers(tmp_path)


def _check_written_into_mount_point(model, out, tmp_path):
    """Writes into a mount point (which no rename can replace) fill it in place: save keeps other files and
    leaves no temporary behind, convert refuses its non-empty contents without force, and with force
    leaves only the new model; the weights read back are the ones written."""
    folder, config, weights = model
    pytest.importorskip("h5py")
    (out / "lost+found").mkdir()  # an ext4 volume's own folder: neither content nor removed
    convert_checkpoint(folder, out, to="flax")
    assert sorted(os.listdir(out)) == ["config.json", "flax_model.msgpack", "lost+found"]
    save_pretrained(str(out), config, weights, weights_format="tf")
    (out / "notes.txt").write_text("mine")
    other = random_weights(config, seed=9)
    save_pretrained(str(out), config, other)
    assert sorted(os.listdir(out)) == ["config.json", "lost+found", "model.safetensors", "notes.txt"]
    np.testing.assert_array_equal(read_weights(str(out), config, ARCH)["model.shared.weight"],
                                  other["model.shared.weight"])
    with pytest.raises(CheckpointError, match="not empty.*--force"):
        convert_checkpoint(folder, out, to="tf")
    convert_checkpoint(folder, out, to="tf", force=True)
    assert sorted(os.listdir(out)) == ["config.json", "lost+found", "tf_model.h5"]
    np.testing.assert_allclose(read_weights(str(out), config, ARCH)["model.shared.weight"],
                               weights["model.shared.weight"])
    assert not leftovers(out) and not leftovers(tmp_path)


def test_write_into_a_mount_point(model, tmp_path, monkeypatch):
    """A container's volume or a mounted disk (simulated: os.path.ismount says so for the folder)."""
    out = tmp_path / "volume"
    out.mkdir()
    import errno

    from blenderbot_mb import fileio

    real_ismount, real_rename, real_exchange = os.path.ismount, os.rename, fileio._exchange
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(out) or real_ismount(p))

    def busy(rename):  # as the kernel answers a rename of a mount point
        def checked(a, b):
            if str(out) in (os.fspath(a), os.fspath(b)):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), os.fspath(b))
            return rename(a, b)
        return checked

    monkeypatch.setattr(os, "rename", busy(real_rename))
    monkeypatch.setattr(fileio, "_exchange", busy(real_exchange))
    _check_written_into_mount_point(model, out, tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="mounts a tmpfs (root, Linux)")
def test_write_into_a_real_mount_point(model, tmp_path):
    """The same on a real tmpfs mount (was: "cannot write ...: Device or resource busy" from the rename)."""
    out = tmp_path / "volume"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(out)], capture_output=True).returncode != 0:
        pytest.skip("this machine does not let the tests mount a tmpfs")
    try:
        _check_written_into_mount_point(model, out, tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


def test_destination_that_is_a_file(model, tmp_path):
    folder, _, _ = model
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        convert_checkpoint(folder, tmp_path / "file", force=True)


def test_stale_temporaries_of_a_dead_writer_are_removed(model, tmp_path):
    folder, _, _ = model
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out{TEMP_TAG}{pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    convert_checkpoint(folder, tmp_path / "out")
    assert not stale.exists()


# ---------------------------------------------------------------------- killed and concurrent writers
def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blenderbot_mb.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _logits(folder):
    torch = pytest.importorskip("torch")
    from blenderbot_mb.torch import BlenderbotForConditionalGeneration

    model = BlenderbotForConditionalGeneration.from_pretrained(folder)
    batch = random_batch(model.config, batch=2, src_len=6, tgt_len=4)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items() if k != "labels"}).logits.numpy()


@pytest.fixture
def two_models(tmp_path):
    """Two models of the same shape (big enough that writing takes a noticeable part of a conversion)."""
    config = make_config("tiny", vocab_size=4000, d_model=256, encoder_ffn_dim=1024, decoder_ffn_dim=1024)
    a = write_checkpoint(tmp_path / "a", config, random_weights(config, seed=1))
    b = write_checkpoint(tmp_path / "b", config, random_weights(config, seed=2))
    return a, b


def test_killed_convert_leaves_old_or_new_model(two_models, tmp_path):
    pytest.importorskip("h5py")
    a, b = two_models
    old, new = _logits(a), _logits(b)
    dst = tmp_path / "dst"
    start = time.time()
    assert _cli("convert", b, str(tmp_path / "full"), "--to", "tf").wait() == 0
    duration = time.time() - start
    rng = np.random.default_rng(0)
    outcomes = set()
    for fraction in [0.7, 0.85, 0.95, 1.0, *rng.uniform(0.5, 1.0, 1)]:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(a, dst)
        proc = _cli("convert", b, str(dst), "--to", "tf", "--force")
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = set(os.listdir(dst))
        logits = _logits(str(dst))
        if np.allclose(logits, old, atol=1e-6):
            assert names == set(os.listdir(a)), names
            outcomes.add("old")
        else:
            np.testing.assert_allclose(logits, new, atol=1e-5)
            assert names == {"config.json", "tf_model.h5"}, names
            outcomes.add("new")
    # the next run removes what the killed ones left behind
    assert _cli("convert", a, str(dst), "--force").wait() == 0
    assert not leftovers(tmp_path)
    np.testing.assert_allclose(_logits(str(dst)), old, atol=1e-6)
    assert outcomes  # which outcomes occur depends on timing; each one seen was whole


def test_concurrent_converts_give_one_whole_model(two_models, tmp_path):
    a, b = two_models
    dst = str(tmp_path / "dst")
    procs = [_cli("convert", src, dst, "--force") for src in (a, b)]
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    logits = _logits(dst)
    assert any(np.allclose(logits, _logits(src), atol=1e-6) for src in (a, b))
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert not leftovers(tmp_path)


def test_hub_snapshot_symlinks_into_its_blobs_are_followed(model, tmp_path):
    """A hub cache snapshot links each file to ../../blobs/<hash>: inside the repository's cache, so allowed;
    a link leaving the repository's cache is not."""
    folder, config, weights = model
    repo = tmp_path / "hub" / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, name in enumerate(sorted(os.listdir(folder))):
        shutil.copy(os.path.join(folder, name), blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    loaded = load_pretrained(str(snapshot), ARCH, "numpy")[1]
    np.testing.assert_array_equal(loaded["model.shared.weight"], weights["model.shared.weight"])
    os.remove(snapshot / "config.json")
    os.symlink(os.path.join(folder, "config.json"), snapshot / "config.json")  # outside models--org--name
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_pretrained(str(snapshot), ARCH, "numpy")
