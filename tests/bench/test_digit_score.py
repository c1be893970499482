"""benches/digit_score.py: the nearest-centroid reader that scores digit runs."""
import numpy as np
import pytest

from benches.digit_score import Centroids, caption_digit, load_folder
from benches.make_digit_folder import make_folder


def test_reader_reads_real_digits_of_both_polarities(tmp_path):
    make_folder(tmp_path, 200, seed=0, digits=(0, 1, 3, 7))
    images, digits = load_folder(tmp_path)
    clf = Centroids(images[:100], digits[:100])
    assert clf.digits == [0, 1, 3, 7]
    acc = np.mean([clf(a) == d for a, d in zip(images[100:], digits[100:])])
    assert acc >= 0.8, acc
    inverted = [clf(255 - a) == d for a, d in zip(images[100:], digits[100:])]
    assert np.mean(inverted) >= 0.8  # polarity does not matter to the reader
    assert caption_digit("a white digit seven on a black background") == 7
    with pytest.raises(ValueError, match="not a make_digit_folder caption"):
        caption_digit("a red circle")


def test_folder_without_captions_is_named(tmp_path):
    make_folder(tmp_path, 4, seed=0, digits=(0, 1))
    next(tmp_path.glob("*.txt")).unlink()
    with pytest.raises(FileNotFoundError, match="no caption file"):
        load_folder(tmp_path)


def test_grid_lays_samples_out_a_row_per_prompt(tmp_path):
    from PIL import Image

    from benches.digit_score import save_grid

    samples = np.stack([np.full((4, 5, 3), 10 * i, np.uint8) for i in range(6)])  # 2 prompts x 3
    path = save_grid(samples, 2, tmp_path / "g.png", scale=1, gap=1)
    g = np.asarray(Image.open(path))
    assert g.shape == (2 * 4 + 1, 3 * 5 + 2, 3)
    assert (g[0, 0] == 0).all() and (g[5, 6] == 40).all() and (g[8, 14] == 50).all()
    assert (g[4] == 128).all() and (g[:, 5] == 128).all()  # the gaps
    with pytest.raises(ValueError, match="do not fill 4 rows"):
        save_grid(samples, 4, tmp_path / "h.png")
