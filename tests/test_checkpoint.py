"""Tests for minildm/checkpoint.py (safetensors round trips, refusing pickles without running them, corrupt
files, state-dict checks) and minildm/classifier.py (shapes, training on a trivially separable toy set,
save/load). The atomic writes they rely on are tested in test_atomic.py."""

import io
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from minildm.checkpoint import (
    check_state_dict,
    load_module_weights,
    load_weights,
    save_weights,
)
from minildm.classifier import ClassifierConfig, SmallClassifier, train_classifier

# --- safetensors round trip --------------------------------------------------------------------


def example_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "float32": torch.randn(3, 5, generator=g),
        "transposed": base.t(),  # non-contiguous
        "strided": base[:, ::2],  # non-contiguous
        "float16": torch.randn(7, generator=g).half(),
        "bfloat16": torch.randn(2, 2, generator=g).bfloat16(),
        "float64": torch.randn(2, generator=g).double(),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "with_grad": torch.randn(2, 3, generator=g, requires_grad=True),
        # Without this entry the header length is 640 = 0x280 and the file starts with 0x80, which
        # load_weights wrongly refuses as a pickle: see test_valid_safetensors_starting_with_0x80_loads.
        "float32_b": torch.zeros(1),
    }


def test_save_load_round_trip(tmp_path):
    tensors = example_tensors()
    save_weights(tensors, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t.detach()), name
        assert loaded[name].device.type == "cpu" and loaded[name].is_contiguous()
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_save_handles_tied_weights(tmp_path):
    """Two names for one tensor (tied weights) would make safetensors refuse shared memory: save copies."""
    shared = torch.randn(3, 3)
    save_weights({"encoder.embed": shared, "decoder.embed": shared, "view": shared[0]}, tmp_path / "t.safetensors")
    loaded = load_weights(tmp_path / "t.safetensors")
    assert torch.equal(loaded["encoder.embed"], shared) and torch.equal(loaded["view"], shared[0])


def small_module():
    # (Without the last Linear the header length is 384 = 0x180: see test_valid_safetensors_starting_with_0x80_loads.)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(3, 2),
                               torch.nn.Linear(2, 2))


def test_save_module_state_dict_and_load_into_fresh_module(tmp_path):
    torch.manual_seed(0)
    source = small_module()
    save_weights(source.state_dict(), tmp_path / "m.safetensors")
    torch.manual_seed(1)
    target = small_module()
    load_module_weights(target, tmp_path / "m.safetensors")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_module_weights_refuses_a_mismatch_before_changing_anything(tmp_path):
    save_weights({"weight": torch.zeros(2, 3), "bias": torch.zeros(5)}, tmp_path / "w.safetensors")
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="bias: expected shape"):
        load_module_weights(module, tmp_path / "w.safetensors")
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name])


# --- refusing pickles --------------------------------------------------------------------------


class MarkerPayload:
    """Unpickling this creates an empty file at `marker`: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_payload_is_live(tmp_path):
    """Control for the next test: plain unpickling of this payload does create the marker."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(MarkerPayload(marker), protocol=2)).close()
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt", "model"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, protocol, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": MarkerPayload(marker)}, protocol=protocol))
    with pytest.raises(ValueError) as info:
        load_weights(path)
    assert not marker.exists()
    if protocol >= 2 or name.endswith(".ckpt"):  # protocol 0 is plain text: refused as an unreadable file
        assert "pickle" in str(info.value)


def test_torch_save_files_are_refused_with_pickle_message(tmp_path):
    state = {"w": torch.randn(2, 2)}
    cases = {
        "model.pt": dict(),  # suffix and zip magic
        "zip_named.safetensors": dict(),  # zip magic ("PK") alone
        "legacy.safetensors": dict(_use_new_zipfile_serialization=False),  # bare pickle (0x80) alone
    }
    for name, kwargs in cases.items():
        torch.save(state, tmp_path / name, **kwargs)
        with pytest.raises(ValueError, match="pickle") as info:
            load_weights(tmp_path / name)
        assert "torch.load" in str(info.value)  # says how to convert a trusted file


def test_any_zip_or_pickle_suffix_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.txt", "hello")
    (tmp_path / "archive.safetensors").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        load_weights(tmp_path / "archive.safetensors")
    (tmp_path / "starts_with_0x80").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="pickle"):
        load_weights(tmp_path / "starts_with_0x80")
    for suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):  # even a real safetensors file under that name
        save_weights({"w": torch.zeros(2)}, tmp_path / f"real{suffix}")
        with pytest.raises(ValueError, match="pickle"):
            load_weights(tmp_path / f"real{suffix}")


def safetensors_bytes_starting_with(prefix, name_lengths):
    """Valid safetensors bytes whose 8-byte little-endian header length begins with the bytes `prefix`."""
    for n in name_lengths:
        data = safetensors_save({"w" * n: torch.zeros(2)})
        if data.startswith(prefix):
            return data
    raise AssertionError("no such header length found")


def small_module_state_dict_hitting_0x80():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(3, 2))
    return {k: v.contiguous() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("case", ["0x80 synthetic", "0x80 small module", "PK synthetic"])
def test_valid_safetensors_starting_with_0x80_loads(tmp_path, case):
    if case == "0x80 synthetic":
        data = safetensors_bytes_starting_with(b"\x80", range(1, 600))
    elif case == "0x80 small module":
        data = safetensors_save(small_module_state_dict_hitting_0x80())
    else:  # a 19280-byte header: rare, but a big model's header is tens of kilobytes
        data = safetensors_bytes_starting_with(b"PK", range(19150, 19300))
    assert struct.unpack("<Q", data[:8])[0] % 256 in (0x80, 0x50) and data[8:9] == b"{"
    (tmp_path / "model.safetensors").write_bytes(data)
    loaded = load_weights(tmp_path / "model.safetensors")
    expected = safetensors_load(data)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)


# --- corrupt and missing files -----------------------------------------------------------------


def test_truncated_and_garbage_files_are_value_errors(tmp_path):
    save_weights({"a": torch.randn(10, 10), "b": torch.arange(7)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated_data": data[:-13],  # tensor bytes missing
        "truncated_header": data[:20],  # header cut in the middle
        "only_length": data[:8],
        "tiny": data[:3],
        "empty": b"",
        "garbage": b"hello, this is not a weights file at all" * 3,
        "huge_header_length": struct.pack("<Q", 10**12) + b"{}",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="truncated or corrupted"):
            load_weights(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path)  # a folder is not a weights file


# --- check_state_dict --------------------------------------------------------------------------


def test_check_state_dict_reports_every_mismatch_at_once():
    expected = {
        "conv.weight": torch.zeros(4, 3, 3, 3),
        "conv.bias": torch.zeros(4),
        "norm.weight": torch.zeros(4),
        "norm.bias": torch.zeros(4),
        "fc.weight": torch.zeros(2, 4),
    }
    found = {
        "conv.weight": torch.zeros(4, 1, 3, 3),  # shape
        "conv.bias": torch.zeros(4, dtype=torch.float16),  # dtype
        "norm.weight": torch.zeros(4),  # fine
        "fc.weight": torch.zeros(2, 4),  # fine
        "extra.weight": torch.zeros(1),  # unexpected
    }  # norm.bias missing
    with pytest.raises(ValueError) as info:
        check_state_dict(expected, found, "unet.safetensors")
    message = str(info.value)
    assert "unet.safetensors" in message
    assert "missing tensors: norm.bias" in message
    assert "unexpected tensors: extra.weight" in message
    assert "conv.weight: expected shape (4, 3, 3, 3), found (4, 1, 3, 3)" in message
    assert "conv.bias: expected dtype torch.float32, found torch.float16" in message
    assert "norm.weight" not in message and "fc.weight" not in message
    check_state_dict(expected, dict(expected), "same")  # no error


def test_check_state_dict_shortens_long_lists():
    expected = {f"layer{i:02d}": torch.zeros(1) for i in range(15)}
    with pytest.raises(ValueError, match=r"missing tensors: layer00, .*layer09 \.\.\.") as info:
        check_state_dict(expected, {}, "x")
    assert "layer10" not in str(info.value)


# --- classifier --------------------------------------------------------------------------------


def make_classifier(seed=0, in_channels=1, class_names=()):
    torch.manual_seed(seed)
    config = ClassifierConfig(in_channels=in_channels, num_classes=2, width=8, feature_dim=16,
                              class_names=list(class_names))
    return SmallClassifier(config)


def bright_and_dark(n=16, seed=0):
    """n bright and n dark 8x8 images with a little noise; label 1 = bright."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2 * n, 1, 8, 8, generator=g) * 0.1
    images[:n] += 0.8
    images[n:] -= 0.8
    labels = torch.tensor([1] * n + [0] * n)
    return images, labels


def test_classifier_shapes_and_errors():
    model = make_classifier(in_channels=3)
    x = torch.randn(4, 3, 8, 12)
    features = model.features(x)
    assert features.shape == (4, 16) and (features >= 0).all()  # after ReLU
    assert model(x).shape == (4, 2)
    torch.testing.assert_close(model(x), model.head(features))
    for bad in (torch.randn(4, 1, 8, 8), torch.randn(3, 8, 8)):
        with pytest.raises(ValueError, match="expected images of shape"):
            model.features(bad)
    assert model.predict(torch.zeros(0, 3, 8, 8)).shape == (0,)


def test_train_classifier_separates_bright_from_dark():
    model = make_classifier()
    images, labels = bright_and_dark()
    losses = train_classifier(model, images, labels, steps=40, batch_size=16, lr=5e-3, progress=False)
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert not model.training
    test_images, test_labels = bright_and_dark(seed=1)
    assert model.accuracy(test_images, test_labels) == 1.0
    assert torch.equal(model.predict(test_images), test_labels)


def test_train_classifier_errors():
    model = make_classifier()
    images, labels = bright_and_dark(n=2)
    with pytest.raises(ValueError, match="labels"):
        train_classifier(model, images, labels[:-1], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_classifier(model, images, labels, steps=0, progress=False)


def test_predict_keeps_training_mode():
    model = make_classifier().train()
    model.predict(torch.zeros(2, 1, 8, 8))
    assert model.training


def test_classifier_save_load_round_trip(tmp_path):
    model = make_classifier(seed=3, class_names=["dark", "bright"]).eval()
    model.save(tmp_path / "clf")
    assert sorted(os.listdir(tmp_path / "clf")) == ["classifier.json", "classifier.safetensors"]
    loaded = SmallClassifier.load(tmp_path / "clf")
    assert loaded.config == model.config and loaded.config.class_names == ["dark", "bright"]
    assert not loaded.training
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.features(x), model.features(x))
