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
