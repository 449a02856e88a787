import random
import re

from fluxgymd.joblog import MAX_LINE_BYTES, JobLog, LineSplitter, read_tail


def split(*chunks):
    s = LineSplitter()
    out = []
    for c in chunks:
        out += s.feed(c)
    return out + s.close()


def test_newlines_crlf_and_bare_cr_are_all_line_ends():
    assert split(b"a\nb\r\nc\rd\n") == ["a", "b", "c", "d"]


def test_tqdm_redraws_become_separate_lines():
    data = b"start\n\r 10%|#| 1/10\r 20%|##| 2/10\r100%|###| 10/10\n"
    assert split(data) == ["start", " 10%|#| 1/10", " 20%|##| 2/10", "100%|###| 10/10"]


def test_crlf_split_across_chunks_is_one_line_end():
    assert split(b"one\r", b"\ntwo\n") == ["one", "two"]


def test_partial_line_is_kept_until_its_end_or_close():
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\nwor") == ["hello"]
    assert s.close() == ["wor"]


def test_empty_lines_ended_by_newline_are_kept():
    assert split(b"a\n\nb\n") == ["a", "", "b"]


def test_invalid_utf8_is_replaced_not_fatal():
    assert split(b"caf\xe9\n") == ["caf\ufffd"]


def test_runaway_line_is_cut():
    lines = split(b"x" * (MAX_LINE_BYTES * 2 + 10))
    assert [len(l) for l in lines] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]


def test_rotation_keeps_the_cap_and_the_numbering(tmp_path):
    log = JobLog(tmp_path, max_bytes=4096, backups=2, memory_lines=100)
    for i in range(1000):
        log.write([f"line {i:04d}"])
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["train.log", "train.log.1", "train.log.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    assert log.seq == 1000
    assert [l for _, l in log.tail(2)] == ["line 0998", "line 0999"]
    # the newest lines on disk, read backwards across rotated files
    tail = read_tail(tmp_path, 500, backups=2)
    assert tail[-1] == "line 0999"
    assert tail == [f"line {i:04d}" for i in range(1000 - len(tail), 1000)]
    assert len(tail) > 400  # three 4 KiB files hold ~1200 of these lines


def test_since_reports_lines_that_fell_out_of_memory(tmp_path):
    log = JobLog(tmp_path, max_bytes=1 << 20, backups=1, memory_lines=100)
    log.write([str(i) for i in range(1, 251)])
    items, gap = log.since(10, 1000)
    assert gap and items[0] == (151, "151") and items[-1] == (250, "250")
    items, gap = log.since(200, 1000)
    assert not gap and [s for s, _ in items] == list(range(201, 251))


def test_pending_is_the_bar_still_being_drawn():
    s = LineSplitter()
    assert s.feed(b"\r 1/10 [a]\r 2/10 [b]") == [" 1/10 [a]"]
    assert s.pending == " 2/10 [b]"


def reference_split(data: bytes) -> list[str]:
    """The rule, written the slow obvious way: \\r\\n, \\r and \\n end lines; an empty
    line ended by a bare \\r is dropped; what is left at the end is a line."""
    out, start = [], 0
    for m in re.finditer(rb"\r\n|\r|\n", data):
        seg = data[start:m.start()]
        if seg or m.group() != b"\r":
            out.append(seg.decode())
        start = m.end()
    rest = data[start:].rstrip(b"\r")
    return out + ([rest.decode()] if rest else [])


def test_any_chunking_of_any_input_matches_the_reference():
    rng = random.Random(1234)
    for _ in range(5000):
        data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randint(0, 30)))
        s, got, i = LineSplitter(), [], 0
        while i < len(data):
            k = rng.randint(1, 6)
            got += s.feed(data[i:i + k])
            i += k
        got += s.close()
        assert got == reference_split(data), data


class FullDisk:
    def write(self, data):
        raise OSError(28, "No space left on device")

    def flush(self):
        pass

    def close(self):
        pass


def test_a_full_disk_keeps_lines_in_memory_and_recovers(tmp_path):
    log = JobLog(tmp_path, max_bytes=1 << 20, backups=1, memory_lines=100)
    log.write(["before"])
    log._fh = FullDisk()
    log.write(["during"])  # must not raise
    assert log.error == "No space left on device"
    assert [l for _, l in log.tail(3)] == ["before", "during"]
    log.write(["after"])  # reopens the file
    assert log.error is None
    log.close()
    assert (tmp_path / "train.log").read_text() == "before\nafter\n"
