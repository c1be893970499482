"""benches/make_digit_folder.py: the small captioned folder the demo recipe is tried on."""
import numpy as np
import pytest
from PIL import Image

from benches.make_digit_folder import NAMES, make_folder


def test_digit_folder_classes_captions_and_determinism(tmp_path):
    assert make_folder(tmp_path / "a", 12, seed=3, digits=(0, 7)) == 12
    make_folder(tmp_path / "b", 12, seed=3, digits=(0, 7))
    caps = sorted((tmp_path / "a").glob("*.txt"))
    assert len(caps) == 12 and len(list((tmp_path / "a").glob("*.png"))) == 12
    for txt in caps:
        words = txt.read_text().split()
        assert words[3] in (NAMES[0], NAMES[7])
        assert {words[1], words[-2]} == {"white", "black"}  # digit and background differ
        img = np.asarray(Image.open(txt.with_suffix(".png")))
        assert img.shape == (32, 32, 3) and (img[..., 0] == img[..., 2]).all()  # grayscale
        assert (img == np.asarray(Image.open(tmp_path / "b" / txt.with_suffix(".png").name))).all()
    with pytest.raises(ValueError, match="digits"):
        make_folder(tmp_path / "c", 2, digits=(3, 12))
