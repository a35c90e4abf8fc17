import json

import numpy as np
import pytest

import zoo
from tests.tiny import tiny_run, write_corpus
from zoo.data import Windows, build_corpus, build_tokenizer, load_data, val_batches
from zoo.data import corpus as corpus_mod
from zoo.data.tokens import is_val_block, split_blocks


def test_bytes_tokenizer_round_trip_and_stream_decoder():
    tok = zoo.data.ByteTokenizer()
    text = "In the beginning — ünïcode ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and list(tok.encode_array(text)) == ids
    step = tok.stream_decoder()
    assert "".join(step([i]) for i in ids) == text  # multi-byte characters complete across calls


def test_kjv_corpus_streams_the_bible():
    first = next(build_corpus(zoo.load_recipe("recipes/tiny/dense.toml")).chunks())
    assert first.startswith("In the beginning God created the heaven and the earth.\n")


def test_split_is_deterministic_and_has_the_fraction():
    assert sum(is_val_block(i, 0.05) for i in range(1000)) == 50
    block, val = split_blocks(100_000, 0.1)
    assert block == 100_000 // 64 and val == split_blocks(100_000, 0.1)[1] and 0 < sum(val) < len(val)


def test_files_folder_and_jsonl_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 500)  # many chunks: streaming, not one read
    folder = tmp_path / "texts"
    folder.mkdir()
    write_corpus(folder / "a.txt", 300, seed=1)
    with open(folder / "b.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"record {i} of the jsonl file", "id": i}) + "\n")
    r = tiny_run(tmp_path, **{"data.dataset": {"kind": "files", "paths": [str(folder)]}})
    src = build_corpus(r)
    chunks = list(src.chunks())
    assert len(chunks) > 5 and all(len(c) < 600 for c in chunks)
    text = "".join(chunks)
    assert "record 299 of the jsonl file\n" in text and text.count("\n") == 600
    d1 = load_data(r)
    d2 = load_data(r)
    assert len(d1.train) + len(d1.val) == len(text.encode())
    assert np.array_equal(d1.train, d2.train) and np.array_equal(d1.val, d2.val)


def test_missing_file_names_the_key(tmp_path):
    r = tiny_run(tmp_path, **{"data.dataset": {"kind": "files", "paths": [str(tmp_path / "nope.txt")]}})
    with pytest.raises(zoo.RecipeError, match=r"data\.dataset\.paths\[0\]: no such file or folder"):
        load_data(r)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = tiny_run(tmp_path, **{"data.dataset": {"kind": "files", "paths": [str(tmp_path / "empty.txt")]}})
    with pytest.raises(zoo.ZooError, match="is empty"):
        load_data(r)


def test_jsonl_without_the_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    r = tiny_run(tmp_path, **{"data.dataset": {"kind": "files", "paths": [str(tmp_path / "d.jsonl")]}})
    with pytest.raises(zoo.ZooError, match=r"d\.jsonl:1: no string field 'text'"):
        load_data(r)


def test_unknown_tokenizer_is_a_recipe_error(tmp_path):
    with pytest.raises(zoo.RecipeError, match=r'data\.tokenizer\.kind.*did you mean "bpe"'):
        tiny_run(tmp_path, **{"data.tokenizer": {"kind": "bpf"}})


def test_bpe_is_trained_cached_and_checked_against_vocab(tmp_path):
    r = tiny_run(tmp_path, **{"data.tokenizer": {"kind": "bpe", "vocab_size": 300}, "model.vocab_size": 300})
    tok = build_tokenizer(r, build_corpus(r))
    assert tok.vocab_size == 300
    text = "the lord shall be unto them"
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) < len(text)
    cached = list((zoo.data.cache_dir() / "tokenizers").glob("bpe-*.json"))
    assert cached
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    r2 = tiny_run(tmp_path, **{"data.tokenizer": {"kind": "file", "path": str(tmp_path / "tokenizer.json")},
                                  "model.vocab_size": 300})
    assert build_tokenizer(r2).encode(text) == tok.encode(text)
    small = tiny_run(tmp_path, **{"data.tokenizer": {"kind": "bpe", "vocab_size": 300}})
    with pytest.raises(zoo.RecipeError, match=r"model\.vocab_size: .*set model.vocab_size >= 300"):
        build_tokenizer(small, build_corpus(small))


def test_missing_tokenizer_file(tmp_path):
    r = tiny_run(tmp_path, **{"data.tokenizer": {"kind": "file", "path": str(tmp_path / "none.json")}})
    with pytest.raises(zoo.ZooError, match="tokenizer file not found"):
        build_tokenizer(r)


def test_windows_are_a_function_of_seed_and_position():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = Windows(tokens, 7, seed=3), Windows(tokens, 7, seed=3)
    xa, ya = a.batch(0, 500)
    assert (ya[:, :-1] == xa[:, 1:]).all() and (ya == xa + 1).all()  # targets are the next tokens
    xb, _ = b.batch(250, 250)  # starting mid-way gives the same samples
    assert (xa[250:] == xb).all()
    assert len({int(x[0]) for x in xa[: a.n]}) == a.n  # one epoch visits distinct windows
    assert not (Windows(tokens, 7, seed=4).batch(0, 20)[0] == xa[:20]).all()


def test_val_batches_are_fixed_and_too_short_split_is_an_error():
    tokens = np.arange(200, dtype=np.uint16)
    batches = list(val_batches(tokens, 16, 4, 2))
    assert len(batches) == 2 and batches[0][0].shape == (4, 16)
    with pytest.raises(zoo.ZooError, match="validation split has 10 tokens"):
        list(val_batches(tokens[:10], 16, 4, 2))
