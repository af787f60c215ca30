"""The README's before/after picture: its rows and what they say."""
import pytest
from PIL import Image

from benchmarks import before_after

pytestmark = pytest.mark.usefixtures("one_thread")


def test_picture_shows_full_procache_fewer_steps_and_both_differences(tmp_path, capsys):
    path = before_after.main(["--out", str(tmp_path), "--digits", "3"])
    image = Image.open(path)
    tile = 16 * before_after.SCALE + 4
    assert image.size == (before_after.LABEL_WIDTH + 3 * tile, 5 * tile)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "full compute, DDIM 50" and lines[1].startswith("ProCache, ")
    procache_db = float(lines[1].split(", ")[-1].split()[0])
    fewer_db = float(lines[2].split(", ")[-1].split()[0])
    assert procache_db > fewer_db        # the same block work spent on caching beats fewer steps here
