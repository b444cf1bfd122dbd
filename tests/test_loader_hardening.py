"""Adversarial inputs for the checkpoint reader (issue 11): crafted pickles, zip archives,
safetensors headers and Hugging Face folders, each written by hand in tmp_path."""
import ast
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import clip
from clip import lazy_unpickle
from clip.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a tiny pickle assembler
def s(text: str) -> bytes:
    """BINUNICODE string."""
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def i(n: int) -> bytes:
    """BININT (signed 32-bit)."""
    return b"J" + struct.pack("<i", n)


def g(module: str, name: str) -> bytes:
    """GLOBAL module.name."""
    return b"c" + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def dct(**items: bytes) -> bytes:
    """EMPTY_DICT, then SETITEMS of the (string key, value) pairs."""
    return b"}(" + b"".join(s(k) + v for k, v in items.items()) + b"u"


def put(n: int) -> bytes:
    return b"q" + bytes([n])  # BINPUT


def get(n: int) -> bytes:
    return b"h" + bytes([n])  # BINGET


def tensor(key: str = "0", numel: int = 4, offset: int = 0, size=(4,), stride=(1,)) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()) over a float storage."""
    storage = tup(s("storage"), g("torch", "FloatStorage"), s(key), s("cpu"), i(numel)) + b"Q"  # BINPERSID
    return (g("torch._utils", "_rebuild_tensor_v2")
            + tup(storage, i(offset), tup(*map(i, size)), tup(*map(i, stride)), b"\x89", g("collections", "OrderedDict") + b")R")
            + b"R")


def module(name: str, **state: bytes) -> bytes:
    """An instance of class pkg.<name> (NEWOBJ) with the given state (BUILD)."""
    return g("pkg", name) + b")\x81" + dct(**state) + b"b"


def checkpoint(path: Path, body: bytes, storages: dict[str, bytes] | None = None,
               compress: int = zipfile.ZIP_STORED) -> Path:
    """A torch.save-like zip archive with data.pkl = PROTO 2 + body + STOP."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + body + b".", compress_type=compress)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


FOUR_FLOATS = {"0": struct.pack("<4f", 1, 2, 3, 4)}


def safetensors_file(path: Path, header, data: bytes = b"\0" * 64) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_assembler_builds_a_readable_checkpoint(tmp_path):
    """The helpers above make files the reader accepts, so the refusals below are about one fault each."""
    body = dct(**{"model.w": tensor(size=(2, 2), stride=(2, 1)), "model.b": tensor(offset=2, size=(2,))})
    sd = clip.load_state_dict(checkpoint(tmp_path / "ok.pt", body, FOUR_FLOATS))
    assert torch.equal(sd["model.w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(sd["model.b"], torch.tensor([3.0, 4.0]))
    rec = module("Lin", _parameters=dct(weight=tensor()), _buffers=b"}", _modules=b"}")
    net = module("Net", _parameters=b"}", _buffers=b"}", _modules=dct(fc=rec))
    assert list(clip.load_state_dict(checkpoint(tmp_path / "net.pt", net, FOUR_FLOATS))) == ["model.fc.weight"]


# ----------------------------------------------------------------------------- item 2: module layout
def _clip_imports(path: Path) -> set[str]:
    """clip modules imported anywhere in a file, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("clip."):
                found.add(node.module.split(".")[1])
            elif node.module == "clip":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("clip."))
    return found


def test_clip_modules_import_as_a_dag():
    modules = {p.stem: p for p in (ROOT / "clip").glob("*.py") if p.stem != "__init__"}
    graph = {m: _clip_imports(p) & set(modules) - {m} for m, p in modules.items()}
    order, left = [], dict(graph)
    while left:  # peel modules whose imports are all placed
        ready = [m for m, deps in left.items() if deps <= set(order)]
        assert ready, f"import cycle among clip modules: { {m: sorted(d) for m, d in left.items()} }"
        order += sorted(ready)
        for m in ready:
            del left[m]
    assert graph["lazy_unpickle"] == set()
    assert graph["checkpoint"] == {"lazy_unpickle"}
    # the security boundary reads no file and imports nothing that could
    tree = ast.parse((ROOT / "clip" / "lazy_unpickle.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "_compat_pickle", "codecs", "collections", "io", "math", "pickle", "typing",
                        "torch"}, imported


# ----------------------------------------------------------------------------- item 3: BUILD
def _defaults() -> dict:
    return {k: (getattr(f, "__defaults__", None), getattr(f, "__kwdefaults__", None), getattr(f, "__name__", None))
            for k, f in lazy_unpickle.SAFE_GLOBALS.items()}


def test_build_cannot_change_an_allow_listed_function(tmp_path):
    before = _defaults()
    for module_, name in [("_codecs", "encode"), ("torch._tensor", "_rebuild_from_type_v2")]:
        state = tup(b"N", dct(__defaults__=tup(s("utf-16")), __name__=s("evil")))  # (None, slot state)
        path = checkpoint(tmp_path / f"{name}.pt", g(module_, name) + state + b"b")
        with pytest.raises(CheckpointError, match=r"BUILD") as err:
            clip.load_state_dict(path)
        assert f"{module_}.{name}" in str(err.value)
    assert _defaults() == before  # nothing changed for the rest of the process


def test_refused_callable_keeps_its_real_name(tmp_path):
    """BUILD cannot rename a refused function to an innocent-looking alias before it is called."""
    body = g("mypkg.util", "run_me") + tup(b"N", dct(name=s("builtins.len"))) + b"b" + b")R"
    with pytest.raises(CheckpointError, match=r"mypkg\.util\.run_me") as err:
        clip.load_state_dict(checkpoint(tmp_path / "alias.pt", body))
    assert "builtins.len" not in str(err.value)


def test_calls_that_could_blow_up_are_refused(tmp_path):
    # str() of a list: with shared, nested lists its repr grows exponentially with the pickle size
    nested = b"]" + put(0) + b"(" + get(0) * 4 + b"e"
    with pytest.raises(CheckpointError, match=r"builtins\.str.*not a number or string"):
        clip.load_state_dict(checkpoint(tmp_path / "str.pt", g("builtins", "str") + tup(nested) + b"R"))
    # a nested tuple as a dict key: hashing a deeply nested one crashes the interpreter
    key = b")" + b"\x85" * 3  # (((),),)
    with pytest.raises(CheckpointError, match=r"dict key is a tuple"):
        clip.load_state_dict(checkpoint(tmp_path / "key.pt", b"}" + key + i(1) + b"s"))
    # NEWOBJ on an allow-listed type other than a record
    with pytest.raises(CheckpointError, match=r"torch\.Size with NEWOBJ"):
        clip.load_state_dict(checkpoint(tmp_path / "newobj.pt", g("torch", "Size") + tup(tup(i(1))) + b"\x81"))


# ----------------------------------------------------------------------------- item 4: malformed structures
def test_module_that_contains_itself(tmp_path):
    body = g("pkg", "Net") + b")\x81" + put(0) + dct(_parameters=b"}", _modules=b"}(" + s("me") + get(0) + b"u") + b"b"
    with pytest.raises(CheckpointError, match=r"cyclic\.pt.*contains itself"):
        clip.load_state_dict(checkpoint(tmp_path / "cyclic.pt", body))


@pytest.mark.parametrize("bad", [b"]" + i(1) + b"a", s("weights"), dct(w=i(3))])
def test_parameters_not_a_dict_of_tensors(tmp_path, bad):
    body = module("Net", _parameters=bad, _buffers=b"}", _modules=b"}")
    with pytest.raises(CheckpointError, match=r"params\.pt.*_parameters.*malformed"):
        clip.load_state_dict(checkpoint(tmp_path / "params.pt", body))


@pytest.mark.parametrize("header, what", [
    ([1, 2], "JSON list"),
    ({"w": 5}, "not an object"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, "shape"),
    ({"__metadata__": [1], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "__metadata__"),
])
def test_malformed_safetensors_headers(tmp_path, header, what):
    path = safetensors_file(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{what}"):
        clip.load_state_dict(path)


def _hf_folder(folder: Path, config, index=None, shard: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"vision_model.post_layernorm.weight": torch.ones(4)}, folder / shard)
    return folder


def test_hf_json_must_be_objects(tmp_path, monkeypatch):
    cfg = {"model_type": "clip_vision_model"}
    assert "model.visual.ln_post.weight" in clip.load_state_dict(_hf_folder(tmp_path / "ok", cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: holds a JSON list"):
        clip.load_state_dict(_hf_folder(tmp_path / "cfg", [cfg]))
    with pytest.raises(CheckpointError, match=r"index\.json: holds a JSON list"):
        clip.load_state_dict(_hf_folder(tmp_path / "index", cfg, index=["model.safetensors"]))
    with pytest.raises(CheckpointError, match=r"vision_config is a list"):
        clip.load_state_dict(_hf_folder(tmp_path / "vision", {"model_type": "clip", "vision_config": [1]}))
    monkeypatch.setattr(clip.hf, "MAX_JSON_BYTES", 10)
    with pytest.raises(CheckpointError, match=r"config\.json: \d+ bytes, more than the 10 allowed"):
        clip.load_state_dict(tmp_path / "ok")
    monkeypatch.undo()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        clip.load_state_dict(tmp_path / "broken")


# ----------------------------------------------------------------------------- item 5: wrong bytes read silently
def test_safetensors_offsets_must_not_be_negative_or_overlap(tmp_path):
    data = struct.pack("<4f", 1, 2, 3, 4)
    neg = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}
    with pytest.raises(CheckpointError, match=r"neg\.safetensors.*data_offsets"):
        clip.load_state_dict(safetensors_file(tmp_path / "neg.safetensors", neg, data))
    over = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match=r"over\.safetensors.*overlap"):
        clip.load_state_dict(safetensors_file(tmp_path / "over.safetensors", over, data))
    past = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    with pytest.raises(CheckpointError, match=r"past\.safetensors.*truncated"):
        clip.load_state_dict(safetensors_file(tmp_path / "past.safetensors", past, data))


@pytest.mark.parametrize("view, what", [
    (dict(offset=-2, size=(2,), stride=(1,)), "storage offset is negative"),
    (dict(offset=3, size=(4,), stride=(-1,)), "negative"),
    (dict(offset=0, size=(2, 2), stride=(-2, 1)), "negative"),
    (dict(offset=2, size=(3,), stride=(1,)), "past the end"),
    (dict(offset=0, size=(2,), stride=(1, 1)), "mismatched"),
])
def test_views_must_lie_inside_their_storage(tmp_path, view, what):
    """Refused when the file is opened, before any tensor is read."""
    path = checkpoint(tmp_path / "view.pt", dct(**{"model.w": tensor(**view)}), FOUR_FLOATS)
    with pytest.raises(CheckpointError, match=rf"view\.pt.*{what}"):
        clip.load_state_dict(path)


def test_hf_index_cannot_point_outside_the_folder(tmp_path):
    outside = _hf_folder(tmp_path / "elsewhere", {"model_type": "clip_vision_model"})
    cfg = {"model_type": "clip_vision_model"}
    for i_, shard in enumerate(["../elsewhere/model.safetensors", str(outside / "model.safetensors"),
                                "sub/../../elsewhere/model.safetensors"]):
        folder = _hf_folder(tmp_path / f"hf{i_}", cfg, index={"weight_map": {"w": shard}}, shard="unused.safetensors")
        with pytest.raises(CheckpointError, match=r"outside the folder"):
            clip.load_state_dict(folder)
    # a shard in a subfolder is fine
    folder = _hf_folder(tmp_path / "sub", cfg, index={"weight_map": {"w": "part/model.safetensors"}})
    (folder / "part").mkdir()
    (folder / "model.safetensors").rename(folder / "part" / "model.safetensors")
    assert len(clip.load_state_dict(folder)) == 1


# ----------------------------------------------------------------------------- item 6: resource bounds
def test_data_pkl_size_is_bounded_before_inflating(tmp_path, monkeypatch):
    monkeypatch.setattr(clip.checkpoint, "MAX_PICKLE_BYTES", 100_000)
    body = dct(pad=s("x" * 200_000), **{"model.w": tensor()})  # compresses to a few hundred bytes
    path = checkpoint(tmp_path / "big.pt", body, FOUR_FLOATS, compress=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 5_000
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: (opened.append(getattr(name, "filename", name)), real_open(self, name, *a, **k))[1])
    with pytest.raises(CheckpointError, match=r"big\.pt.*data\.pkl is \d+ bytes uncompressed, more than the 100000"):
        clip.load_state_dict(path)
    assert "archive/data.pkl" not in opened  # refused from the zip header, nothing inflated


@pytest.mark.parametrize("params", [dct(w=tensor()), b"}"], ids=["tensors", "modules only"])
def test_shared_modules_cannot_expand_to_many_keys(tmp_path, params):
    """A module record shared 20 times at each of 4 levels: 160,000 keys (or modules to walk) from a 1 KB pickle."""
    body = module("Leaf", _parameters=params, _buffers=b"}", _modules=b"}") + put(0)
    for level in range(1, 5):
        children = b"}(" + b"".join(s(f"m{j}") + get(level - 1) for j in range(20)) + b"u"
        body += b"0" + module(f"L{level}", _parameters=b"}", _buffers=b"}", _modules=children) + put(level)
    path = checkpoint(tmp_path / "wide.pt", body, FOUR_FLOATS)
    assert len((tmp_path / "wide.pt").read_bytes()) < 2_000
    with pytest.raises(CheckpointError, match=r"wide\.pt: more than 100000 modules and tensors"):
        clip.load_state_dict(path)


def test_module_nesting_depth_is_bounded(tmp_path):
    body = module("Leaf", _parameters=dct(w=tensor()), _buffers=b"}", _modules=b"}") + put(0)
    for level in range(1, 101):  # a chain 100 modules deep
        body += b"0" + module("M", _parameters=b"}", _modules=b"}(" + s("c") + get(0) + b"u") + put(0)
    with pytest.raises(CheckpointError, match=r"deep\.pt: modules nested more than 64 deep"):
        clip.load_state_dict(checkpoint(tmp_path / "deep.pt", body, FOUR_FLOATS))


COPIES = b"]" + put(0) + b"(" + i(1) * 300 + b"e" + b"0" + (g("builtins", "list") + tup(get(0)) + b"R0") * 3 + get(0)


@pytest.mark.parametrize("body", [
    b"]" + put(0) + b"(" + get(0) * 600 + b"e" + b"0" + get(0) + b"(" + get(0) * 600 + b"e",  # memo references
    COPIES,  # list(L) three times: each copy counts its items
], ids=["references", "copies"])
def test_operation_count_is_bounded(tmp_path, monkeypatch, body):
    monkeypatch.setattr(lazy_unpickle, "MAX_OPERATIONS", 1_000)
    with pytest.raises(CheckpointError, match=r"ops\.pt.*more than 1000 objects or items"):
        clip.load_state_dict(checkpoint(tmp_path / "ops.pt", body))


def test_expanded_views_are_bounded(tmp_path):
    huge = dict(numel=1, size=(100_000, 100_000), stride=(0, 0))  # 40 GB if materialised
    path = checkpoint(tmp_path / "expand.pt", dct(**{"model.w": tensor(**huge)}), {"0": struct.pack("<f", 1)})
    with pytest.raises(CheckpointError, match=r"expand\.pt.*repeats its 1 stored elements"):
        clip.load_state_dict(path)
    # a small expanded view, as torch.save writes for tensor.expand(), still reads
    torch.save({"model.b": torch.tensor([2.0]).expand(5)}, tmp_path / "small.pt")
    assert torch.equal(clip.load_state_dict(tmp_path / "small.pt")["model.b"], torch.full((5,), 2.0))


def test_compressed_storage_is_inflated_only_on_access(tmp_path, monkeypatch):
    path = checkpoint(tmp_path / "deflated.pt", dct(**{"model.w": tensor()}), compress=zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", FOUR_FLOATS["0"])
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: (opened.append(getattr(name, "filename", name)), real_open(self, name, *a, **k))[1])
    sd = clip.load_state_dict(path)
    assert "archive/data/0" not in opened
    assert torch.equal(sd["model.w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


@pytest.mark.parametrize("kind", ["legacy", "raw", "tar"])
def test_old_formats_say_what_they_are_and_how_to_convert(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "legacy":
        torch.save({"model.w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
        what = r"legacy torch checkpoint \(torch < 1\.6"
    elif kind == "raw":
        path.write_bytes(pickle.dumps({"model.w": [1.0, 2.0]}, protocol=2))
        what = r"raw pickle"
    else:
        (tmp_path / "pickle").write_bytes(pickle.dumps({}, protocol=2))
        with tarfile.open(path, "w") as t:
            t.add(tmp_path / "pickle", arcname="pickle")
        what = r"tar-format torch checkpoint"
    for load in (clip.load_state_dict, clip.read_head):
        with pytest.raises(CheckpointError, match=rf"{kind}\.pt: this is a {what}.*torch\.save\(.*safetensors") as err:
            load(path)
        assert "not a safetensors file" not in str(err.value)


def test_copyreg_extension_codes_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"extension codes"):
        clip.load_state_dict(checkpoint(tmp_path / "ext.pt", b"\x82\x01"))  # EXT1 code 1


def test_protocol_1_module_pickle_reads_but_object_is_not_callable(tmp_path):
    """Protocol 0/1 pickles rebuild objects with copyreg._reconstructor(cls, object, state)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    torch.save(net, tmp_path / "p1.pt", pickle_protocol=1)
    sd = clip.load_state_dict(tmp_path / "p1.pt")
    assert torch.equal(sd["model.0.weight"], net[0].weight.detach())
    with pytest.raises(CheckpointError, match=r"calls builtins\.object"):
        clip.load_state_dict(checkpoint(tmp_path / "obj.pt", g("builtins", "object") + b")R"))
