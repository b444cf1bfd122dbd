"""Preprocessed-input cache: bit-exact inputs, identical accuracy, keys that never read a stale entry."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import clip
from src import input_cache as ic
from src.datasets import registry
from src.datasets.folder_sets import ImageList
from src.datasets.registry import register_dataset
from src.eval import evaluate_tasks
from src.modeling import ClassificationHead

SIZE = 16


def preprocess(size: int = SIZE):
    """open_clip's evaluation transform (Resize bicubic, CenterCrop, RGB, ToTensor, Normalize)."""
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=clip.factory.OPENAI_MEAN, std=clip.factory.OPENAI_STD)


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        mode = ["RGB", "L", "RGBA", "P"][i % 4]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(img.convert(mode))
    return out


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_split_transform_rebuilds_the_float_input_bit_for_bit(device):
    full = clip.get_preprocess("ViT-B-32")[1]
    plan = ic.split_transform(full)
    assert plan is not None
    for img in random_images(8):
        want = full(img)
        pixels = plan.pixels(img)
        assert pixels.dtype == torch.uint8 and pixels.shape == want.shape
        got = plan.normalize(pixels[None].to(device))[0].cpu()
        assert torch.equal(got, want), (img.mode, (got - want).abs().max())


def test_emnist_orientation_commutes_with_the_split():
    """EMNIST's builder rotates and flips the transform's output: the uint8 pixels give the same input."""
    from src.datasets.torchvision_sets import EMNISTOrientation

    full = clip.get_preprocess("ViT-B-32")[1]
    plan = ic.split_transform(full)
    for img in random_images(4, seed=3):
        want = EMNISTOrientation(full)(img)
        assert torch.equal(plan.normalize(EMNISTOrientation(plan.pixels)(img)[None])[0], want)


def test_transforms_that_cannot_be_split_are_not_cached():
    norm = transforms.Normalize((0.5,) * 3, (0.25,) * 3)
    assert ic.split_transform(clip.get_preprocess("demo-micro")[1]) is None  # ToInput: no ToTensor + Normalize
    random_crop = transforms.Compose([transforms.RandomResizedCrop(8), transforms.ToTensor(), norm])
    assert ic.split_transform(random_crop) is None
    assert ic.split_transform(transforms.Compose([transforms.Lambda(lambda x: x), transforms.ToTensor(), norm])) is None
    assert ic.split_transform(transforms.Compose([transforms.ToTensor()])) is None
    assert ic.split_transform(None) is None
    # the description distinguishes settings that a repr omits (MaybeConvertMode's mode)
    a, b = preprocess(), preprocess()
    b.transforms[2].mode = "L"
    assert ic.split_transform(a).description != ic.split_transform(b).description


class Counting(ImageList):
    """ImageList that counts decoded images (class attribute: DataLoader workers are not used here)."""

    decoded = 0

    def __getitem__(self, index):
        Counting.decoded += 1
        return super().__getitem__(index)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Registered task 'Toy': JPEG files of varied sizes, 3 classes; train 40 (Val = 4 of them), test 15."""
    registry._load_plugins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    rng = np.random.default_rng(1)
    samples = {}
    for split, n in (("train", 40), ("test", 15)):
        samples[split] = []
        for i, img in enumerate(random_images(n, seed=len(split))):
            label = int(rng.integers(0, 3))
            tint = Image.new("RGB", img.size, ((255, 0, 0), (0, 255, 0), (0, 0, 255))[label])
            img = Image.blend(img.convert("RGB"), tint, 0.5)
            path = tmp_path / "data" / split / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=90)
            samples[split].append((str(path), label))
    builds = []

    def build(split, transform, location):
        builds.append(split)
        return Counting(samples[split], transform)

    register_dataset("Toy", build, ["red", "green", "blue"], [lambda c: c])
    Counting.decoded = 0
    return tmp_path, samples, builds


def model():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 8))
    head = ClassificationHead(normalize=True, weights=torch.randn(3, 8))
    return encoder, {"Toy": head}


def run(cache, tasks=("Toy", "ToyVal"), pre=None, location=""):
    encoder, heads = model()
    return evaluate_tasks(encoder, list(tasks), heads, pre or preprocess(), location, device="cpu", batch_size=4,
                          num_workers=0, progress=False, input_cache=cache)


def entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cached_accuracy_is_identical_and_images_are_decoded_once(toy):
    tmp, samples, builds = toy
    plain = run(None)
    assert 0 < plain["Toy"] < 100  # a mix of right and wrong, so a wrong pairing would show
    cache = ic.InputCache(tmp / "cache", "all")
    Counting.decoded = 0
    first = run(cache)
    assert first == plain
    assert Counting.decoded == 15 + 4  # test split + the 4 Val images
    assert len(entries(tmp / "cache")) == 2 and not [e for e in entries(tmp / "cache") if e.startswith(".tmp")]
    n_builds = len(builds)
    assert run(cache) == plain and Counting.decoded == 19 and len(builds) == n_builds  # nothing rebuilt
    fresh = ic.InputCache(tmp / "cache", "all")  # a new process: reads the files, decodes nothing
    assert run(fresh) == plain and Counting.decoded == 19
    images = np.load(next((tmp / "cache").glob("ToyVal-*")) / "images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap) and images.shape == (4, 3, SIZE, SIZE)


def test_auto_stores_only_validation_splits_and_off_stores_nothing(toy):
    tmp, _, _ = toy
    plain = run(None)
    assert run(ic.InputCache(tmp / "auto", "auto")) == plain
    assert [e.split("-")[0] for e in entries(tmp / "auto")] == ["ToyVal"]
    assert run(ic.InputCache(tmp / "off", "off")) == plain
    assert entries(tmp / "off") == []
    with pytest.raises(ValueError, match="--input-cache"):
        ic.InputCache(tmp, "sometimes")


def test_changed_files_transform_or_split_never_read_a_stale_entry(toy):
    tmp, samples, _ = toy
    folder = tmp / "cache"
    run(ic.InputCache(folder, "all"))
    assert len(entries(folder)) == 2
    # another transform: new entries, and the accuracy of that transform
    bigger = preprocess(SIZE + 4)
    bigger.transforms.insert(2, transforms.CenterCrop(SIZE))
    want = run(None, pre=bigger)
    assert run(ic.InputCache(folder, "all"), pre=bigger) == want and len(entries(folder)) == 4
    # a test image replaced by another one: its split is decoded again
    path = samples["test"][0][0]
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Counting.decoded = 0
    assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == run(None, tasks=["Toy"])
    assert len(entries(folder)) == 5


def test_interrupted_or_concurrent_writes_leave_one_complete_entry(toy, monkeypatch):
    tmp, samples, _ = toy
    folder = tmp / "cache"
    original = Counting.__getitem__

    def failing(self, index):
        if index == 3:
            raise OSError("disk went away")
        return original(self, index)

    monkeypatch.setattr(Counting, "__getitem__", failing)
    with pytest.raises(OSError, match="disk went away"):
        run(ic.InputCache(folder, "all"), tasks=["Toy"])
    assert entries(folder) == []  # no partial entry, no temporary folder
    monkeypatch.setattr(Counting, "__getitem__", original)
    # two runs decoding the same split at once: both finish, one entry survives, complete
    plan = ic.split_transform(preprocess())
    split = registry.get_dataset("Toy", plan.pixels, "", num_workers=0)
    a, b = ic.InputCache(folder, "all"), ic.InputCache(folder, "all")
    la = a.split("Toy", "", plan, "cpu", 4, 0, lambda: split).loader
    lb = b.split("Toy", "", plan, "cpu", 4, 0, lambda: split).loader
    it_a, it_b = iter(la), iter(lb)
    batches_a = [next(it_a)]
    batches_b = list(it_b)  # b completes first
    batches_a += list(it_a)
    assert len(entries(folder)) == 1 and not entries(folder)[0].startswith(".tmp")
    assert all(torch.equal(x[0], y[0]) for x, y in zip(batches_a, batches_b))
    assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == run(None, tasks=["Toy"])


def test_a_damaged_entry_is_rebuilt(toy):
    tmp, _, _ = toy
    folder = tmp / "cache"
    plain = run(None, tasks=["Toy"])
    run(ic.InputCache(folder, "all"), tasks=["Toy"])
    images = next(folder.glob("Toy-*")) / "images.npy"
    images.write_bytes(images.read_bytes()[:200])  # truncated
    Counting.decoded = 0
    with pytest.warns(UserWarning, match="input cache .*rebuilding it"):
        assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == plain and Counting.decoded == 15
    assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == plain and Counting.decoded == 15


# ----------------------------------------------------------------------------- hardening: nothing read is trusted
def _entry(folder, name="Toy"):
    return next(folder.glob(f"{name}-*"))


def _rewrite_images(path, transform):
    """images.npy rewritten through ``transform(array) -> array`` (np.save: a consistent .npy file)."""
    images = np.load(path)
    np.save(path, transform(images))


@pytest.mark.parametrize("damage, said", [
    ("inverted pixels", "checksum"),
    ("zeroed labels", "checksum"),
    ("labels out of range", "label"),
    ("wrong image size in the header", "shape"),
])
def test_cached_entries_with_wrong_contents_are_rebuilt_and_said(toy, damage, said):
    tmp, _, _ = toy
    folder = tmp / "cache"
    plain = run(None, tasks=["Toy"])
    run(ic.InputCache(folder, "all"), tasks=["Toy"])
    entry = _entry(folder)
    if damage == "inverted pixels":
        raw = bytearray((entry / "images.npy").read_bytes())
        start = len(raw) - 15 * 3 * SIZE * SIZE
        raw[start:] = bytes(255 - b for b in raw[start:])
        (entry / "images.npy").write_bytes(bytes(raw))
    elif damage == "zeroed labels":
        np.save(entry / "labels.npy", np.zeros(15, np.int64))
    elif damage == "labels out of range":
        np.save(entry / "labels.npy", np.load(entry / "labels.npy") + 100)
    else:  # same bytes, another shape in the .npy header
        _rewrite_images(entry / "images.npy", lambda a: a.reshape(15, 3, SIZE // 2, SIZE * 2))
    Counting.decoded = 0
    with pytest.warns(UserWarning, match=rf"input cache .*{entry.name}.*{said}.*rebuil"):
        assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == plain
    assert Counting.decoded == 15  # decoded again, stored again
    assert entries(folder) == [entry.name]
    Counting.decoded = 0
    assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == plain and Counting.decoded == 0


def _no_space(*args, **kwargs):
    import errno
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["allocation", "first write", "last write"])
def test_a_full_disk_evaluates_without_the_cache_and_says_so(toy, monkeypatch, where):
    """The allocation (posix_fallocate) or a write (os.pwrite) fails with ENOSPC: the split is still evaluated,
    a warning says the cache was not written, and no entry nor temporary folder is left."""
    tmp, _, _ = toy
    folder = tmp / "cache"
    plain = run(None, tasks=["Toy"])
    if where == "allocation":
        monkeypatch.setattr(ic.os, "posix_fallocate", _no_space, raising=False)
    else:
        calls, write = [], os.pwrite

        def pwrite(fd, data, offset):
            calls.append(len(data))
            if where == "first write" or len(calls) > 5:  # 4 image batches, then labels/metadata
                _no_space()
            return write(fd, data, offset)

        monkeypatch.setattr(ic.os, "pwrite", pwrite)
    with pytest.warns(UserWarning, match=r"input cache not written.*No space left.*evaluated without it"):
        assert run(ic.InputCache(folder, "all"), tasks=["Toy"]) == plain
    assert entries(folder) == []  # nothing left behind: no entry, no .tmp- folder


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
@pytest.mark.parametrize("where", ["images.npy", "labels.npy", "meta.json", "entry"])
def test_special_files_in_the_cache_are_refused_before_any_work(toy, kind, where):
    import signal

    tmp, _, _ = toy
    folder = tmp / "cache"
    run(ic.InputCache(folder, "all"), tasks=["Toy"])
    entry = _entry(folder)
    target = entry if where == "entry" else entry / where
    if where == "entry":
        import shutil
        shutil.rmtree(entry)
    else:
        target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        os.symlink("/dev/zero", target)
    else:
        target.mkdir()
    if kind == "directory" and where == "entry":
        return  # an empty entry folder is an ordinary damaged entry (rebuilt)

    class Blocked(Exception):  # not an OSError, which a reader may catch and retry
        pass

    def hang(*_):
        raise Blocked("blocked on a special file")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    Counting.decoded = 0
    try:
        with pytest.raises(ValueError, match=rf"input cache .*{where if where != 'entry' else entry.name}.* not a "
                                             r"regular (file|folder).*remove it.*--input-cache off"):
            run(ic.InputCache(folder, "all"), tasks=["Toy"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert Counting.decoded == 0
    assert os.path.lexists(target)  # left for the user to look at


def test_a_cache_folder_that_is_a_file_is_refused_at_once(toy):
    tmp, _, _ = toy
    (tmp / "cache").write_text("not a folder")
    with pytest.raises(ValueError, match=r"input cache folder .*cache.* is not a folder.*--input-cache-dir"):
        ic.InputCache(tmp / "cache", "all")
