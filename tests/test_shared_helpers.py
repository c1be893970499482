"""Helpers the tree has once: atomic writes, progress bars, state-dict prefixes and shape checks."""
import pytest

from microdit.files import TMP_MARK, atomic_path
from microdit.models.state_dict import shape_mismatches, strip_prefixes
from microdit.progress import Progress


def test_strip_prefixes_only_at_the_start():
    assert strip_prefixes("module._orig_mod.blocks.0.w1") == "blocks.0.w1"
    assert strip_prefixes("_orig_mod.module.x") == "x"
    # str.replace would also rewrite the middle of a name
    assert strip_prefixes("blocks.0.submodule.w") == "blocks.0.submodule.w"
    assert strip_prefixes("model.dit.x", ("dit.", "model.dit.")) == "x"


def test_shape_mismatches():
    differ, missing, extra = shape_mismatches({"a": (2, 3), "b": (4,), "c": (1,)}, {"a": (3, 2), "c": (1,), "z": (5,)})
    assert (differ, missing, extra) == (["a"], ["b"], ["z"])


def test_atomic_path_replaces_or_leaves_the_target(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(f"*{TMP_MARK}*"))
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_progress_disabled_is_silent(capsys):
    bar = Progress(3, desc="x", unit="it", enabled=False)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""
