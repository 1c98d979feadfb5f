"""Remote shards against real server processes: a fault-injecting HTTP server and moto's S3 server.

The same shards are read from local files, `http://`, `pipe:curl` and `s3://`; each fault (reset
mid-shard, 500 once, slow answer, no Range support, 404, missing key, a failing command) is checked
at the level of the data pipeline: identical samples, the retries the server saw, counted skips.
"""
import logging
import os

import pytest

from mgpt4_dist.data.pipeline import DataSourceError, ShardStream, Source, resolve_sources
from mgpt4_dist.data.remote import ShardMissingError, ShardUnavailableError
from mgpt4_dist.data.shards import expand_shard_pattern, read_shard_samples, write_shards
from mgpt4_dist.tiny.scenes import synthetic_samples
from remote_servers import fault_http_server, moto_s3_server, requests_made

RETRY = (3, 0.05)  # retries, backoff: fast for tests


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote_shards")
    write_shards(synthetic_samples(60, seed=2, image_size=32), str(out), samples_per_shard=20, progress=False)
    data = (out / "shard-000001.tar").read_bytes()
    (out / "cut.tar").write_bytes(data[:len(data) // 2])  # a truncated upload
    return str(out)


@pytest.fixture(scope="module")
def http(shard_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("http_log") / "requests.jsonl")
    with fault_http_server(shard_dir, log) as base:
        yield base, log


def _samples(url):
    return [(raw["__key__"], raw["jpg"], raw["json"]) for raw in read_shard_samples(url, *RETRY)]


@pytest.mark.parametrize("modes", ["ok", "reset", "fail500", "slow", "norange+reset"])
def test_http_and_pipe_read_what_local_files_hold_through_faults(shard_dir, http, modes):
    base, log = http
    local = _samples(os.path.join(shard_dir, "shard-000000.tar"))
    assert len(local) == 20
    assert _samples(f"{base}/{modes}/shard-000000.tar") == local
    assert _samples(f"pipe:curl -s -f {base}/{modes}/shard-000000.tar?pipe") == local
    seen = [r for r in requests_made(log) if r["path"] == f"/{modes}/shard-000000.tar"]
    if "reset" in modes:
        # Reset after half the bytes: the retry asks for the rest. A server that ignores Range
        # answers 200 with the whole file, and the reader discards what it already had.
        assert seen[0]["status"] == -1 and seen[1]["range"].startswith("bytes=") and seen[1]["range"] != "bytes=0-"
        assert seen[1]["status"] == (200 if "norange" in modes else 206)
    elif modes == "fail500":
        assert [r["status"] for r in seen] == [500, 200]
    else:
        assert [r["status"] for r in seen] == [200]


def test_missing_and_failing_shards_raise_naming_url_and_cause(http):
    base, log = http
    with pytest.raises(ShardMissingError, match=r"/ok/none\.tar: HTTP 404"):
        list(read_shard_samples(f"{base}/ok/none.tar", *RETRY))
    assert len([r for r in requests_made(log) if r["path"] == "/ok/none.tar"]) == 1  # a 404 is not retried
    with pytest.raises(ShardUnavailableError, match=r"curl .*/ok/none2\.tar: command exited with status 22 "
                                                     r"\(gave up after 3 retries\)"):
        list(read_shard_samples(f"pipe:curl -s -f {base}/ok/none2.tar", *RETRY))
    with pytest.raises(ShardUnavailableError, match="status 127"):  # no retries for a missing tool
        list(read_shard_samples("pipe:no-such-tool-mgpt4 x", *RETRY))


def test_a_truncated_remote_tar_is_detected_like_a_local_one(shard_dir, http):
    base, _ = http
    with pytest.raises(Exception) as local:
        _samples(os.path.join(shard_dir, "cut.tar"))
    with pytest.raises(Exception) as remote:
        _samples(f"{base}/ok/cut.tar")
    assert "truncated or corrupt tar after" in str(remote.value)
    assert str(local.value).split(" after ")[1] == str(remote.value).split(" after ")[1]


def test_start_check_names_the_cause(http):
    base, _ = http
    with pytest.raises(DataSourceError, match=r"'pipe:no-such-tool-mgpt4 \{0\.\.1\}'.*status 127"):
        resolve_sources([("pipe:no-such-tool-mgpt4 {0..1}", 1.0)], *RETRY)
    with pytest.raises(DataSourceError, match="HTTP 404"):
        resolve_sources([(f"{base}/ok/wrong-{{000000..000002}}.tar", 1.0)], *RETRY)


def _stream(sources, **kw):
    return ShardStream(sources, rank=0, world_size=1, num_workers=1, seed=0, resample=False, batch_size=1,
                       image_size=16, clean_captions=True, max_caption_words=50, retries=RETRY[0],
                       retry_backoff_s=RETRY[1], **kw)


def _pass(stream, start=None):
    """(key, position) of one pass over a stream's split, from `start`."""
    got = []
    for _, _, key, pos in stream.samples(0, start or {"epoch": 0, "index": 0, "offset": 0, "skipped": 0}):
        if pos["epoch"] > 0:
            return got, pos
        got.append((key, pos))
    raise AssertionError("unreachable")


def test_missing_shard_is_skipped_counted_and_named_once(shard_dir, http, caplog):
    base, _ = http
    shards = [f"{base}/ok/shard-00000{i}.tar" for i in range(3)] + [f"{base}/ok/gone.tar"]
    stream = _stream([Source(shards, 1.0, "test")])
    with caplog.at_level(logging.WARNING):
        got, end = _pass(stream)
    # `end` is the first sample of the next pass, which may have met gone.tar again on the way.
    again = stream.epoch_split(0, 1).index(shards[3]) == 0
    assert len(got) == 60 and end["skipped_shards"] == 1 + again and end["skipped"] == 0
    warnings = [r.getMessage() for r in caplog.records if "gone.tar" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0] and "skipped_shards" in warnings[0]


def test_a_source_whose_shards_all_fail_stops_with_the_cause(http):
    base, _ = http
    good = Source([f"{base}/ok/shard-000000.tar"], 1.0, "good")
    bad = Source([f"{base}/ok/lost-{i}.tar" for i in range(3)], 1.0, "http://host/lost-{0..2}.tar")
    stream = ShardStream([good, bad], rank=0, world_size=1, num_workers=1, seed=0, resample=True, batch_size=1,
                         image_size=16, clean_captions=True, max_caption_words=50, retries=0, retry_backoff_s=0)
    with pytest.raises(DataSourceError, match=r"source 'http://host/lost-\{0\.\.2\}\.tar' failed: 3 of its shards "
                                              r"in a row .*HTTP 404"):
        for _ in stream.samples(0, {"epoch": 0, "index": 0, "offset": 0, "skipped": 0}):
            pass


def test_resume_mid_shard_is_exact_over_http_and_pipe(shard_dir, http):
    base, _ = http
    names = [f"shard-00000{i}.tar" for i in range(3)]
    local, _ = _pass(_stream([Source([os.path.join(shard_dir, n) for n in names], 1.0)]))
    for url in (f"{base}/reset/{{}}", f"pipe:curl -s -f {base}/ok/{{}}"):
        stream = _stream([Source([url.format(n) for n in names], 1.0)])
        whole, _ = _pass(stream)
        assert [k for k, _ in whole] == [k for k, _ in local]
        resumed, _ = _pass(stream, dict(whole[26][1]))  # mid-shard: 7 samples into the second shard
        assert [k for k, _ in resumed] == [k for k, _ in local[27:]]


# ------------------------------------------------------------------------------------ S3 (moto's server)

@pytest.fixture(scope="module")
def s3(shard_dir):
    import boto3

    with moto_s3_server() as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            client = boto3.client("s3")
            client.create_bucket(Bucket="mgpt4-test")
            for name in sorted(os.listdir(shard_dir)):
                if name.startswith("shard-"):
                    client.upload_file(os.path.join(shard_dir, name), "mgpt4-test", f"laion/{name}")
            yield "s3://mgpt4-test"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_s3_glob_lists_streams_and_resumes_exactly(shard_dir, s3):
    urls = expand_shard_pattern(f"{s3}/laion/*.tar")
    assert urls == [f"{s3}/laion/shard-00000{i}.tar" for i in range(3)]
    assert _samples(urls[1]) == _samples(os.path.join(shard_dir, "shard-000001.tar"))
    local, _ = _pass(_stream([Source([os.path.join(shard_dir, os.path.basename(u)) for u in urls], 1.0)]))
    stream = _stream([Source(urls, 1.0)])
    resumed, _ = _pass(stream, dict(local[44][1]))
    assert [k for k, _ in resumed] == [k for k, _ in local[45:]]


def test_s3_missing_key_is_skipped_and_counted_and_a_wrong_bucket_fails_at_start(s3):
    shards = [f"{s3}/laion/shard-000000.tar", f"{s3}/laion/no-such-key.tar"]
    got, end = _pass(_stream([Source(shards, 1.0)]))
    assert len(got) == 20 and end["skipped_shards"] == 1
    with pytest.raises(ShardMissingError, match="no-such-key"):
        list(read_shard_samples(shards[1], *RETRY))
    with pytest.raises(DataSourceError, match="s3://no-such-bucket-mgpt4/x-0.tar"):
        resolve_sources([("s3://no-such-bucket-mgpt4/x-{0..1}.tar", 1.0)], *RETRY)
    with pytest.raises(Exception, match="matches no file|found no object"):
        resolve_sources([(f"{s3}/laion/nothing-*.tar", 1.0)], *RETRY)
