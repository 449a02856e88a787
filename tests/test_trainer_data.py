"""The dataset: captions, buckets, errors that name the file, a reproducible order."""
import pytest
from PIL import Image

from trainer.data import DatasetError, assign_bucket, buckets, epoch_batches, scan


def img(path, size=(64, 64)):
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_captions_with_the_trigger_word_first(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red\nsquare ")
    img(tmp_path / "b.jpg")
    img(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("fgx, already first")
    items = scan(str(tmp_path), "fgx")
    assert [i.caption for i in items] == ["fgx, a red square", "fgx", "fgx, already first"]
    # the cache key is the file's content: a byte-identical copy shares it
    (tmp_path / "d.png").write_bytes((tmp_path / "a.png").read_bytes())
    again = {i.path.rsplit("/", 1)[1]: i.sha256 for i in scan(str(tmp_path))}
    assert again["a.png"] == again["d.png"] != again["b.jpg"]


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    with pytest.raises(DatasetError, match=r"notes.pdf is not an image this trainer reads"):
        scan(str(tmp_path))


def test_an_unreadable_image_is_named(tmp_path):
    img(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"broken.png cannot be read as an image"):
        scan(str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"broken.png cannot be read as an image"):
        scan(str(tmp_path))


def test_an_empty_folder(tmp_path):
    (tmp_path / "only.txt").write_text("a caption without an image")
    with pytest.raises(DatasetError, match="holds no images"):
        scan(str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        scan(str(tmp_path / "missing"))


def test_buckets_are_about_the_area_and_divisible():
    bs = buckets(512, 16)
    assert (512, 512) in bs
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512 for w, h in bs)
    assert all(w * h >= 0.85 * 512 * 512 for w, h in bs)
    assert assign_bucket(1536, 1024, bs)[0] > assign_bucket(1536, 1024, bs)[1]
    assert assign_bucket(100, 100, bs) == (512, 512)


def test_epoch_order_is_reproducible_and_complete():
    bucket_of = [(64, 64)] * 5 + [(96, 48)] * 3
    a = epoch_batches(bucket_of, repeats=2, batch_size=2, seed=7, epoch=3)
    assert a == epoch_batches(bucket_of, 2, 2, 7, 3)
    assert a != epoch_batches(bucket_of, 2, 2, 7, 4)
    flat = sorted(i for b in a for i in b)
    assert flat == sorted(list(range(8)) * 2)
    assert all(len({bucket_of[i] for i in b}) == 1 for b in a)  # never mixes buckets
