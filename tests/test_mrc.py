import mrcfile
import numpy as np
import pytest

from crisp_ext.errors import InputError
from crisp_ext.io.mrc import read_info, read_micrograph, write_mrc


def _write(path, data, voxel=1.5):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = voxel
    return path


@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6),
                                        (np.float16, 12)])
def test_modes_read_as_float32(tmp_path, dtype, mode):
    rng = np.random.default_rng(0)
    data = (rng.uniform(0, 100, (40, 56))).astype(dtype)
    p = _write(tmp_path / "m.mrc", data)
    with mrcfile.open(p) as m:
        assert int(m.header.mode) == mode
    img, ps = read_micrograph(p)
    assert img.dtype == np.float32 and img.shape == (40, 56)
    assert np.allclose(img, data.astype(np.float32))
    assert ps == pytest.approx(1.5)


def test_one_frame_stack_and_pixel_override(tmp_path):
    data = np.arange(2 * 3 * 5, dtype=np.float32).reshape(1, 6, 5)
    p = _write(tmp_path / "s.mrcs", data, voxel=2.0)
    img, ps = read_micrograph(p, pixel_size=3.3)
    assert img.shape == (6, 5) and ps == 3.3
    assert np.array_equal(img, data[0])
    assert read_info(p).shape == (6, 5)


def test_array_orientation_is_file_order(tmp_path):
    data = np.zeros((30, 50), np.float32)
    data[3, 40] = 7  # row 3, column 40
    img, _ = read_micrograph(_write(tmp_path / "o.mrc", data))
    assert img[3, 40] == 7 and img.shape == (30, 50)


def test_header_without_pixel_size(tmp_path):
    p = _write(tmp_path / "z.mrc", np.zeros((8, 8), np.float32), voxel=0.0)
    assert read_micrograph(p)[1] is None


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_micrograph(tmp_path / "nope.mrc")


def test_truncated_file(tmp_path):
    p = _write(tmp_path / "t.mrc", np.zeros((64, 64), np.float32))
    raw = p.read_bytes()
    p.write_bytes(raw[:1500])
    with pytest.raises(InputError, match="truncated") as err:
        read_micrograph(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_not_an_mrc(tmp_path):
    p = tmp_path / "x.mrc"
    p.write_bytes(b"this is not a micrograph" * 100)
    with pytest.raises(InputError, match="not a valid MRC") as err:
        read_micrograph(p)
    assert str(p) in str(err.value)


def test_movie_stack_rejected(tmp_path):
    p = _write(tmp_path / "movie.mrcs", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match="stack of 3"):
        read_micrograph(p)


def test_write_is_atomic_and_readable(tmp_path):
    p = write_mrc(tmp_path / "w.mrc", np.ones((5, 7)), pixel_size=2.5)
    img, ps = read_micrograph(p)
    assert img.shape == (5, 7) and ps == pytest.approx(2.5)
    assert [q.name for q in tmp_path.iterdir()] == ["w.mrc"]
