"""The README's runnable examples and the Flax layers' docstring examples run and
give the results their comments state, so the documentation cannot drift from
the code."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from jax_roipool import linen, nnx

README = Path(__file__).resolve().parents[1] / "README.md"

# `expression.shape   # (2, 7, 7, 256)`: a line that states a result's shape.
SHAPE_LINE = re.compile(r"^(?P<expr>\S.*\.shape)\s*#\s*(?P<shape>\([\d, ]*\))\s*$")


def readme_block(first_line: str) -> str:
    """The README's one python block that begins with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README: {len(found)} python blocks begin with {first_line!r}"
    return found[0]


def with_shape_asserts(block: str) -> str:
    """``block`` with each shape-stating line turned into an assert of that shape."""
    lines = []
    for line in block.splitlines():
        match = SHAPE_LINE.match(line)
        if match:
            line = f"assert {match['expr']} == {match['shape']}, {line!r}"
        lines.append(line)
    return "\n".join(lines)


def test_shape_asserts_are_made_and_can_fail():
    checked = with_shape_asserts("jnp.zeros((2, 3)).shape   # (2, 4)")
    assert checked.startswith("assert ")
    with pytest.raises(AssertionError):
        exec(checked, {"jnp": jnp})


def test_readme_seed_example_prints_what_it_states():
    block = readme_block("import numpy as np, jax_roipool as jrp")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(block, {})
    # The comments from the print call on hold the stated output.
    stated = block[block.index("print("):]
    stated = " ".join(line.split("#", 1)[1] for line in stated.splitlines())
    assert printed.getvalue().split() == stated.split()
    assert stated.split() == ["[[0.85", "0.84]", "[0.97", "0.96]]"]


@pytest.mark.parametrize("first_line,names", [
    ("features = jnp.zeros((2, 50, 68, 256))", {}),
    # The comment's sizes: boxes of [3, 4] and [5, 4] over the same features.
    ("rois = jrp.boxes_to_rois([boxes_img0, boxes_img1])",
     {"features": jnp.zeros((2, 50, 68, 256)),
      "boxes_img0": jnp.zeros((3, 4)), "boxes_img1": jnp.ones((5, 4))}),
])
def test_readme_shapes_are_what_the_comments_state(first_line, names):
    block = readme_block(first_line)
    checked = with_shape_asserts(block)
    # Every line that states a shape is checked, none skipped by the pattern.
    assert checked.count("assert ") == block.count(".shape") >= 1
    exec(checked, {"jnp": jnp, "jrp": jrp, **names})


@pytest.mark.parametrize("module", [linen, nnx], ids=["linen", "nnx"])
def test_flax_docstring_example_runs(module):
    doc = module.RoIPool.__doc__
    example = textwrap.dedent(doc.split("Example::\n", 1)[1])
    names: dict = {}
    exec(example, names)
    # Both examples end with 2 images, 1 box each, 4 outputs per box.
    assert names["logits"].shape == (2, 1, 4)
    assert np.isfinite(np.asarray(names["logits"])).all()
