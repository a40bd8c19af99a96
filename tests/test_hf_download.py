"""hf_download against a fake Hub on 127.0.0.1 (hf_fixture.py); nothing reaches huggingface.co."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hf_fixture import FakeHfHub, point_hub_client_at
from huggingface_hub import constants as hf_constants

from ailab.upstream.download import (
    DownloadError,
    DownloadProgress,
    DownloadStalled,
    HfSpec,
    choose_gguf,
    download_gguf,
    parse_hf_repo,
    resolve_filename,
)

MiB = 1024 * 1024
Q4 = random.Random(4).randbytes(4 * MiB)
Q8 = random.Random(8).randbytes(3 * MiB)
FILES = {"model-Q4_K_M.gguf": Q4, "model-Q8_0.gguf": Q8, "README.md": b"# A test model\n"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolated_hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token, no offline mode, and any call that forgets its endpoint hits a closed port."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    point_hub_client_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")


@pytest.fixture
def hub() -> Iterator[FakeHfHub]:
    with FakeHfHub(FILES) as fake:
        yield fake


def _ignore(_: DownloadProgress) -> None:
    pass


# --- parse_hf_repo -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
            HfSpec(repo_id="Qwen/Qwen2.5-0.5B-Instruct-GGUF", quant="Q4_K_M"),
        ),
        ("org/repo:model-q8_0.gguf", HfSpec(repo_id="org/repo", filename="model-q8_0.gguf")),
        ("org/repo/model-Q8_0.gguf", HfSpec(repo_id="org/repo", filename="model-Q8_0.gguf")),
        ("org/repo/sub/model.GGUF", HfSpec(repo_id="org/repo", filename="sub/model.GGUF")),
        ("org/repo", HfSpec(repo_id="org/repo")),
        (" org/repo:UD-Q4_K_XL ", HfSpec(repo_id="org/repo", quant="UD-Q4_K_XL")),
    ],
)
def test_parse_accepts_the_documented_forms(spec: str, expected: HfSpec) -> None:
    assert parse_hf_repo(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "repo-without-org",
        "org/",
        "/repo",
        "org/repo:",
        "org/repo/README.md",
        "org/repo/sub:Q4_K_M",
        "org/repo:Q4 K M",
        "org/repo/../x.gguf",
        "https://huggingface.co/org/repo",
    ],
)
def test_parse_rejects_bad_specs_naming_the_accepted_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="accepted forms"):
        parse_hf_repo(spec)


# --- choose_gguf ---------------------------------------------------------------------


def test_quant_matches_case_insensitively_as_a_whole_token() -> None:
    files = ["m-Q4_K.gguf", "m-q4_k_m.gguf", "m-IQ4_XS.gguf", "m-Q4_XS.gguf"]
    assert choose_gguf(HfSpec(repo_id="o/r", quant="Q4_K_M"), files) == "m-q4_k_m.gguf"
    assert choose_gguf(HfSpec(repo_id="o/r", quant="q4_k"), files) == "m-Q4_K.gguf"
    assert choose_gguf(HfSpec(repo_id="o/r", quant="Q4_XS"), files) == "m-Q4_XS.gguf"


def test_bare_repo_takes_its_only_gguf_ignoring_projectors() -> None:
    files = ["README.md", "mmproj-f16.gguf", "model-Q8_0.gguf"]
    assert choose_gguf(HfSpec(repo_id="o/r"), files) == "model-Q8_0.gguf"


def test_bare_repo_with_several_ggufs_takes_q4_k_m() -> None:
    files = ["model-Q8_0.gguf", "model-Q4_K_M.gguf", "model-F16.gguf"]
    assert choose_gguf(HfSpec(repo_id="o/r"), files) == "model-Q4_K_M.gguf"


def test_bare_repo_without_q4_k_m_lists_the_choices() -> None:
    with pytest.raises(DownloadError, match=r"model-F16.gguf, model-Q8_0.gguf"):
        choose_gguf(HfSpec(repo_id="o/r"), ["model-Q8_0.gguf", "model-F16.gguf"])


def test_split_gguf_is_refused_and_its_later_shards_are_not_candidates() -> None:
    files = [f"big-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)] + ["small-Q4_K_M.gguf"]
    assert choose_gguf(HfSpec(repo_id="o/r", quant="Q4_K_M"), files) == "small-Q4_K_M.gguf"
    with pytest.raises(DownloadError, match="split GGUF"):
        choose_gguf(HfSpec(repo_id="o/r", quant="Q8_0"), files)


def test_several_files_matching_one_quant_is_an_error_listing_them() -> None:
    files = ["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"]
    with pytest.raises(DownloadError, match=r"several files match.*a-Q4_K_M.gguf, b-Q4_K_M.gguf"):
        choose_gguf(HfSpec(repo_id="o/r", quant="Q4_K_M"), files)


# --- against the fake Hub ------------------------------------------------------------


def test_resolve_picks_the_file_for_the_quant(hub: FakeHfHub) -> None:
    assert resolve_filename(f"{hub.repo_id}:q8_0", endpoint=hub.endpoint) == "model-Q8_0.gguf"


def test_resolve_lists_available_ggufs_when_the_quant_is_absent(hub: FakeHfHub) -> None:
    with pytest.raises(DownloadError, match=r"model-Q4_K_M.gguf, model-Q8_0.gguf") as caught:
        resolve_filename(f"{hub.repo_id}:IQ2_XXS", endpoint=hub.endpoint)
    assert "IQ2_XXS" in str(caught.value)


def test_download_lands_in_cache_dir_with_identical_content(hub: FakeHfHub, tmp_path: Path) -> None:
    path = download_gguf(f"{hub.repo_id}:Q4_K_M", tmp_path, _ignore, endpoint=hub.endpoint)

    assert path.is_relative_to(tmp_path)
    assert path.name == "model-Q4_K_M.gguf"
    assert path.read_bytes() == Q4


def test_progress_grows_and_ends_done(tmp_path: Path) -> None:
    seen: list[DownloadProgress] = []
    with FakeHfHub(FILES, throttle_bytes_per_s=2 * MiB) as hub:
        download_gguf(f"{hub.repo_id}:Q4_K_M", tmp_path, seen.append, endpoint=hub.endpoint)

    counts = [p.downloaded_bytes for p in seen]
    assert counts == sorted(counts)
    assert any(0 < n < len(Q4) for n in counts)
    assert [p.done for p in seen] == [False] * (len(seen) - 1) + [True]
    last = seen[-1]
    assert (last.downloaded_bytes, last.total_bytes, last.percent) == (len(Q4), len(Q4), 100.0)
    assert last.error is None and last.filename == "model-Q4_K_M.gguf"


def test_second_download_is_served_from_the_cache_without_requests(
    hub: FakeHfHub, tmp_path: Path
) -> None:
    first = download_gguf(f"{hub.repo_id}:Q4_K_M", tmp_path, _ignore, endpoint=hub.endpoint)
    requests_after_first = len(hub.requests)
    seen: list[DownloadProgress] = []

    second = download_gguf(f"{hub.repo_id}:Q4_K_M", tmp_path, seen.append, endpoint=hub.endpoint)

    assert second == first
    assert hub.count("GET", "/resolve/") == 1
    assert len(hub.requests) == requests_after_first
    assert seen[-1].done and seen[-1].downloaded_bytes == len(Q4)


def test_cached_file_is_returned_when_the_hub_is_unreachable(tmp_path: Path) -> None:
    with FakeHfHub(FILES) as hub:
        first = download_gguf(f"{hub.repo_id}:Q8_0", tmp_path, _ignore, endpoint=hub.endpoint)
    dead = f"http://127.0.0.1:{_closed_port()}"

    assert download_gguf(f"{hub.repo_id}:Q8_0", tmp_path, _ignore, endpoint=dead) == first


def test_bare_repo_redownload_asks_the_hub_but_does_not_fetch_the_file_again(
    hub: FakeHfHub, tmp_path: Path
) -> None:
    first = download_gguf(hub.repo_id, tmp_path, _ignore, endpoint=hub.endpoint)
    second = download_gguf(hub.repo_id, tmp_path, _ignore, endpoint=hub.endpoint)

    assert second == first and first.name == "model-Q4_K_M.gguf"
    assert hub.count("GET", "/resolve/") == 1


def test_stalled_download_raises_download_stalled_and_reports_the_error(tmp_path: Path) -> None:
    seen: list[DownloadProgress] = []
    with (
        FakeHfHub(FILES, stall_after_bytes=MiB, stall_s=10) as hub,
        pytest.raises(DownloadStalled, match="stalled"),
    ):
        download_gguf(
            f"{hub.repo_id}:Q4_K_M", tmp_path, seen.append, stall_timeout_s=1, endpoint=hub.endpoint
        )

    assert seen[-1].error is not None and not seen[-1].done


def test_unknown_repo_is_a_download_error_naming_it(hub: FakeHfHub, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"nobody/nothing-GGUF.*not found.*HF_ENDPOINT"):
        download_gguf("nobody/nothing-GGUF:Q4_K_M", tmp_path, _ignore, endpoint=hub.endpoint)


def test_missing_quant_is_a_download_error_listing_the_choices(
    hub: FakeHfHub, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match=r"Q2_K.*model-Q4_K_M.gguf, model-Q8_0.gguf"):
        download_gguf(f"{hub.repo_id}:Q2_K", tmp_path, _ignore, endpoint=hub.endpoint)


def test_missing_file_is_a_download_error_listing_the_choices(
    hub: FakeHfHub, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match=r"no file 'other.gguf'.*model-Q4_K_M.gguf"):
        download_gguf(f"{hub.repo_id}/other.gguf", tmp_path, _ignore, endpoint=hub.endpoint)


def test_unreachable_endpoint_is_a_download_error_saying_what_to_check(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(DownloadError, match=r"Could not reach.*HF_ENDPOINT"):
        download_gguf("org/repo:Q4_K_M", tmp_path, _ignore, endpoint=dead)
