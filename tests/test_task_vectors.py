"""TaskVector: construction from state dicts, arithmetic, key checks and application."""
import pytest
import torch

from src.task_vectors import TaskVector


def state(seed, with_int=True):
    g = torch.Generator().manual_seed(seed)
    sd = {"model.a": torch.randn(3, 2, generator=g), "model.b": torch.randn(4, generator=g)}
    if with_int:
        sd["model.step"] = torch.tensor(7)  # integer buffer: skipped
    return sd


def test_from_state_dicts_is_lazy_and_skips_integer_buffers():
    pre, ft = state(0), state(1)
    tv = TaskVector(pre, ft)
    assert tv.keys() == ["model.a", "model.b"]
    assert torch.equal(tv.vector["model.a"], ft["model.a"] - pre["model.a"])
    ft["model.a"] += 1  # lazy: reads the checkpoint at access time
    assert torch.allclose(tv.vector["model.a"], ft["model.a"] - pre["model.a"])


def test_arithmetic_and_sum():
    a, b = TaskVector(state(0), state(1)), TaskVector(state(0), state(2))
    for key in a.vector:
        assert torch.allclose((a + b).vector[key], a.vector[key] + b.vector[key])
        assert torch.allclose((a - b).vector[key], a.vector[key] - b.vector[key])
        assert torch.allclose((-a).vector[key], -a.vector[key])
        assert torch.allclose((0.5 * a).vector[key], a.vector[key] * 0.5)
        assert torch.allclose((a * 2).vector[key], a.vector[key] * 2)
        assert torch.allclose(sum([a, b, a]).vector[key], 2 * a.vector[key] + b.vector[key])
        assert torch.allclose(TaskVector.mean([a, b]).vector[key], (a.vector[key] + b.vector[key]) / 2)


def test_key_mismatch_is_an_error_naming_the_keys():
    a = TaskVector(vector={"model.a": torch.ones(2), "model.b": torch.ones(2)})
    b = TaskVector(vector={"model.a": torch.ones(2), "model.c": torch.ones(2)})
    with pytest.raises(ValueError, match=r"model\.b.*model\.c"):
        a + b
    with pytest.raises(ValueError, match="model.b"):
        TaskVector(state(0), {k: v for k, v in state(1).items() if k != "model.b"})
    bad = state(1)
    bad["model.a"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape mismatch for 'model.a'"):
        TaskVector(state(0), bad)
    with pytest.raises(ValueError, match="needs either"):
        TaskVector(state(0))


def test_apply_to_state_dict_and_module():
    pre, ft = state(0), state(1)
    tv = TaskVector(pre, ft)
    out = tv.apply_to(pre, scaling_coef=1.0)
    assert torch.allclose(out["model.a"], ft["model.a"]) and torch.equal(out["model.step"], pre["model.step"])
    half = tv.apply_to(pre, scaling_coef=0.5)
    assert torch.allclose(half["model.b"], (pre["model.b"] + ft["model.b"]) / 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 3)

    module = Wrapper()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    delta = TaskVector(vector={"model.weight": torch.ones(3, 2), "model.bias": torch.zeros(3)})
    assert delta.apply_to(module, 0.3) is module
    assert torch.allclose(module.model.weight, base["model.weight"] + 0.3)
    with pytest.raises(KeyError, match="model.nope"):
        TaskVector(vector={"model.nope": torch.ones(1)}).apply_to(module)


def test_require_finite_checks_in_memory_vectors_now_and_lazy_ones_when_read(tmp_path):
    from src.task_vectors import check_finite, require_finite

    assert check_finite(torch.tensor([-3.0, 2.0]), "x") == 3.0
    good = TaskVector(vector={"model.a": torch.ones(2)})
    bad = TaskVector(vector={"model.a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match=r"task vector 1 key 'model.a' has 1 NaN and 0 inf values \(of 2\)"):
        require_finite([good, bad])
    # Finite checkpoint files whose difference overflows float32: caught when the key is read,
    # and the message names the fine-tuned file.
    torch.save({"model.a": torch.full((2,), -3e38), "model.b": torch.zeros(3)}, tmp_path / "zeroshot.pt")
    torch.save({"model.a": torch.full((2,), 3e38), "model.b": torch.ones(3)}, tmp_path / "finetuned.pt")
    (lazy,) = require_finite([TaskVector(str(tmp_path / "zeroshot.pt"), str(tmp_path / "finetuned.pt"))])
    assert torch.equal(lazy.vector["model.b"], torch.ones(3)) and lazy.shapes()["model.a"] == (2,)
    with pytest.raises(ValueError, match=r"task vector 0 \(.*finetuned.pt\) key 'model.a' has 0 NaN and 2 inf"):
        lazy.vector["model.a"]
