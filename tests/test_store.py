"""The ledger's storage layer: manifests, hashes, the write lock, safe loading and atomic writes."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from lifelong.errors import LedgerCorruptError, LedgerError, LedgerLockedError, UnsafeFileError
from lifelong.ledger.store import (
    MANIFEST,
    SCHEMA_VERSION,
    LedgerLock,
    check_file,
    file_entry,
    load_tensors,
    read_manifest,
    safetensors_metadata,
    save_tensors,
    sha256_file,
    verify,
    write_manifest,
)

# --- manifest ---------------------------------------------------------------------------------------


def test_manifest_round_trip_stamps_schema_version(tmp_path):
    manifest = {"base": {"name": "tiny-clip", "sha256": "ab" * 32},
                "changes": [{"kind": "learn", "loss": float("nan")}]}
    write_manifest(tmp_path, manifest)

    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert list(on_disk)[0] == "schema_version" and on_disk["schema_version"] == SCHEMA_VERSION
    back = read_manifest(tmp_path)
    assert back["base"] == manifest["base"] and back["schema_version"] == SCHEMA_VERSION
    assert back["changes"][0]["loss"] != back["changes"][0]["loss"]  # NaN survives the round trip


def test_newer_schema_version_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(LedgerError, match="upgrade lifelong") as info:
        read_manifest(tmp_path)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(info.value)
    assert f"up to version {SCHEMA_VERSION}" in str(info.value)


def test_missing_schema_version_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"changes": []}))
    with pytest.raises(LedgerError, match="no valid schema_version"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("make_dir", [True, False], ids=["empty-dir", "no-dir"])
def test_not_a_ledger_says_how_to_create_one(tmp_path, make_dir):
    root = tmp_path / "ledger"
    if make_dir:
        root.mkdir()
    with pytest.raises(LedgerError, match=r"not a ledger: .*lifelong init .* --model NAME") as info:
        read_manifest(root)
    assert not isinstance(info.value, LedgerCorruptError)
    assert str(root) in str(info.value)


def test_corrupt_manifest_names_the_file(tmp_path):
    write_manifest(tmp_path, {"changes": []})
    text = (tmp_path / MANIFEST).read_text()
    (tmp_path / MANIFEST).write_text(text[: len(text) // 2])  # a torn write by some other tool
    with pytest.raises(LedgerCorruptError, match="not valid JSON") as info:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(info.value)


# --- hashes -----------------------------------------------------------------------------------------


def test_file_entry_records_posix_path_hash_and_size(tmp_path):
    data = os.urandom(3 * 2**20 + 17)  # more than one 1 MiB read chunk
    (tmp_path / "changes" / "0001").mkdir(parents=True)
    (tmp_path / "changes" / "0001" / "patch.safetensors").write_bytes(data)

    entry = file_entry(tmp_path, os.path.join("changes", "0001", "patch.safetensors"))
    assert entry == {"path": "changes/0001/patch.safetensors",
                     "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert check_file(tmp_path, entry) == tmp_path / "changes" / "0001" / "patch.safetensors"


def _recorded_file(root, name, data):
    (root / name).write_bytes(data)
    return file_entry(root, name)


def test_modified_file_is_refused_naming_it(tmp_path):
    entry = _recorded_file(tmp_path, "patch.bin", bytes(range(256)) * 8)
    data = bytearray((tmp_path / "patch.bin").read_bytes())
    data[1000] ^= 0x01  # one bit, same size
    (tmp_path / "patch.bin").write_bytes(bytes(data))

    with pytest.raises(LedgerCorruptError, match="modified after it was recorded") as info:
        check_file(tmp_path, entry)
    assert "patch.bin" in str(info.value)


def test_truncated_file_is_refused(tmp_path):
    data = bytes(range(256)) * 8
    entry = _recorded_file(tmp_path, "patch.bin", data)
    (tmp_path / "patch.bin").write_bytes(data[: len(data) // 2])

    expected = f"truncated or extended: {len(data) // 2} bytes, recorded {len(data)}"
    with pytest.raises(LedgerCorruptError, match=expected) as info:
        check_file(tmp_path, entry)
    assert "patch.bin" in str(info.value)


def test_verify_lists_exactly_the_damaged_files(tmp_path):
    (tmp_path / "changes").mkdir()
    base = _recorded_file(tmp_path, "base.json", b'{"name": "tiny-clip"}')
    good = _recorded_file(tmp_path, "changes/good.bin", b"a" * 100)
    edited = _recorded_file(tmp_path, "changes/edited.bin", b"b" * 100)
    gone = _recorded_file(tmp_path, "changes/gone.bin", b"c" * 100)
    manifest = {"files": [base], "changes": [{"files": [good, edited]}, {"files": [gone]}]}
    (tmp_path / "changes" / "unlisted.bin").write_bytes(b"not recorded anywhere")
    assert verify(tmp_path, manifest) == []

    (tmp_path / "changes" / "edited.bin").write_bytes(b"B" * 100)
    (tmp_path / "changes" / "gone.bin").unlink()
    problems = verify(tmp_path, manifest)
    assert len(problems) == 2
    assert "edited.bin" in problems[0] and "modified" in problems[0]
    assert "gone.bin" in problems[1] and "missing" in problems[1]


# --- the write lock ---------------------------------------------------------------------------------


def test_second_lock_in_same_process_is_refused(tmp_path):
    with LedgerLock(tmp_path, command="lifelong learn"):
        with pytest.raises(LedgerLockedError) as info:
            with LedgerLock(tmp_path, command="lifelong edit"):
                pass
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and "`lifelong learn`" in message and str(tmp_path) in message
        assert "wait for it to finish" in message
    with LedgerLock(tmp_path):  # released on exit
        pass


_HOLD_LOCK = """
import sys, time
from lifelong.ledger.store import LedgerLock
with LedgerLock(sys.argv[1], command="lifelong learn"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_held_by_another_process_is_refused_until_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerLockedError) as info:
            with LedgerLock(tmp_path):
                pass
        assert f"pid {holder.pid}" in str(info.value) and "`lifelong learn`" in str(info.value)

        holder.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the flock
        assert holder.wait(timeout=30) == -signal.SIGKILL
        with LedgerLock(tmp_path, command="lifelong revert"):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()


# --- safe loading -----------------------------------------------------------------------------------


class _MakesMarker:
    """Unpickling this calls os.mkdir(marker): the stand-in for code an attacker ships in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _malicious_file(tmp_path, suffix):
    marker = tmp_path / "MARKER"
    path = tmp_path / f"model{suffix}"
    payload = {"weight": torch.ones(2, 2), "extra": _MakesMarker(marker)}
    if suffix == ".pt":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path, marker


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_pickled_code_is_not_run(tmp_path, suffix):
    path, marker = _malicious_file(tmp_path, suffix)
    with pytest.raises(UnsafeFileError, match="--trust-pickle") as info:
        load_tensors(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_trust_pickle_runs_the_code_so_the_payload_is_real(tmp_path, suffix):
    # Guards the test above: the same file does run code once the user opts in.
    path, marker = _malicious_file(tmp_path, suffix)
    with pytest.raises(LedgerError, match="not a flat dict of tensors"):  # "extra" unpickled to None
        load_tensors(path, trust_pickle=True)
    assert marker.is_dir()


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_plain_checkpoint_loads_weights_only(tmp_path, wrapper):
    tensors = {"layer.weight": torch.randn(3, 4), "layer.bias": torch.arange(3.0)}
    torch.save(tensors if wrapper is None else {wrapper: tensors, "epoch": 3}, tmp_path / "model.pt")
    loaded = load_tensors(tmp_path / "model.pt")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def test_trusted_plain_pickle_of_tensors_loads(tmp_path):
    with open(tmp_path / "model.pkl", "wb") as f:
        pickle.dump({"w": torch.arange(4.0)}, f)
    assert torch.equal(load_tensors(tmp_path / "model.pkl", trust_pickle=True)["w"], torch.arange(4.0))


def test_damaged_files_are_reported_as_damaged_not_unsafe(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    torch.save({"w": torch.ones(100)}, tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(100)})
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])

    for name in ["garbage.pt", "cut.pt", "cut.safetensors"]:
        with pytest.raises(LedgerCorruptError) as info:
            load_tensors(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(LedgerCorruptError, match="cut.safetensors"):
        safetensors_metadata(tmp_path / "cut.safetensors")


def test_unsupported_suffix_and_non_tensor_content_are_refused(tmp_path):
    (tmp_path / "model.npz").write_bytes(b"x")
    with pytest.raises(LedgerError, match=r"unsupported suffix '\.npz'.*\.safetensors"):
        load_tensors(tmp_path / "model.npz")
    torch.save({"encoder": {"w": torch.ones(1)}}, tmp_path / "nested.pt")
    with pytest.raises(LedgerError, match="nested.pt is not a flat dict of tensors: entry 'encoder'"):
        load_tensors(tmp_path / "nested.pt")


# --- writing tensors --------------------------------------------------------------------------------


def _bits(t):
    return t.contiguous().view(torch.uint8)


def test_save_load_round_trip_is_bit_exact_with_metadata(tmp_path):
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(5, 7, generator=gen)
    noisy[0, 0] = float("nan")
    tensors = {
        "f32": noisy,
        "bf16": torch.randn(4, 6, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(8, generator=gen).half(),
        "i64": torch.randint(-(2**40), 2**40, (9,), generator=gen),
        "mask": torch.rand(3, 3, generator=gen) > 0.5,
        "transposed": torch.randn(3, 5, generator=gen).t(),  # not contiguous
    }
    metadata = {"method": "lora", "config": json.dumps({"rank": 4})}
    path = save_tensors(tmp_path / "patch.safetensors", tensors, metadata)

    loaded = load_tensors(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(_bits(loaded[name]), _bits(t)), name
    assert safetensors_metadata(path) == metadata
    assert safetensors_metadata(save_tensors(tmp_path / "plain.safetensors", {"w": torch.ones(1)})) == {}


_KILLED_WRITE = """
import os, signal, sys, torch
from lifelong.ledger.store import save_tensors

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

setattr(os, sys.argv[2], die)  # "fsync": killed after the temp file is written; "replace": just before the rename
save_tensors(sys.argv[1], {"w": torch.full((1000,), 7.0)})
print("not killed")
"""


@pytest.mark.parametrize("killed_in", ["fsync", "replace"])
def test_write_killed_midway_leaves_previous_file_intact(tmp_path, killed_in):
    target = save_tensors(tmp_path / "patch.safetensors", {"w": torch.zeros(1000)})
    old_hash = sha256_file(target)

    command = [sys.executable, "-c", _KILLED_WRITE, str(target), killed_in]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "not killed" not in result.stdout

    assert sha256_file(target) == old_hash
    assert torch.equal(load_tensors(target)["w"], torch.zeros(1000))
    # SIGKILL left no chance to remove the temp file; it sits beside the target, which a reader never
    # confuses with the target (it is not listed in any manifest). It proves the new bytes were written.
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".patch.safetensors.")
