"""A method's state file (``Method.save``/``Method.load``): loaded only into the method that wrote it,
tensor for tensor, each of its exact shape and dtype."""

from __future__ import annotations

import re

import pytest

from blocklora.io import read_tensors, write_tensors


@pytest.fixture
def coop_state(make_method, tmp_path):
    method, _ = make_method("coop", {"n_ctx": 4})
    path = tmp_path / "coop.safetensors"
    method.save(path)
    return make_method, path


def test_a_state_tensor_of_another_shape_or_dtype_is_refused_not_broadcast(coop_state):
    make_method, path = coop_state
    tensors, meta = read_tensors(path)
    for wrong in (tensors["ctx"][0].contiguous(), tensors["ctx"].double()):  # (width,) would broadcast
        write_tensors(path, {"ctx": wrong}, meta)
        fresh, _ = make_method("coop", {"n_ctx": 4})
        before = fresh.context.ctx.detach().clone()
        with pytest.raises(
            ValueError, match=re.escape(f"cannot be loaded into coop: ctx has shape {tuple(wrong.shape)}")
        ):
            fresh.load(path)
        assert fresh.context.ctx.equal(before)


def test_a_state_file_missing_a_tensor_or_its_method_is_refused(coop_state):
    make_method, path = coop_state
    tensors, meta = read_tensors(path)
    write_tensors(path, {"other": tensors["ctx"]}, meta)
    fresh, _ = make_method("coop", {"n_ctx": 4})
    with pytest.raises(ValueError, match=r"missing \['ctx'\], unexpected \['other'\]"):
        fresh.load(path)
    write_tensors(path, tensors, {k: v for k, v in meta.items() if k != "method"})
    with pytest.raises(ValueError, match="does not say which method wrote it"):
        fresh.load(path)
